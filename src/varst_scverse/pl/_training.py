"""Training diagnostics: loss curves per stage and how evenly the stage-1 codebook is used.

Written against the model's public attributes (``history_``, ``codebook_usage``) so any object exposing them works.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ._utils import drop_unused, finish, panel_grid

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Metric families, one panel each, in display order: (title, does this column belong to it).
_FAMILIES: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("losses", lambda c: "loss" in c),
    ("codebook use", lambda c: "codebook" in c or "perplexity" in c or "utilis" in c or "utiliz" in c),
    ("token accuracy", lambda c: "accuracy" in c),
    ("other", lambda c: True),
)
_SPLITS = (("train_", "train", "-"), ("validation_", "validation", "--"), ("val_", "validation", "--"))
_X_COLUMNS = ("epoch", "step")


def _stage_key(stage: int | str) -> str:
    s = str(stage)
    return s if s.startswith("stage") else f"stage{s}"


def _split(col: str) -> tuple[str, str, str]:
    """Return ``(base name, split, line style)`` of a history column."""
    for prefix, split, style in _SPLITS:
        if col.startswith(prefix):
            return col[len(prefix) :], split, style
    return col, "", "-"


def _family(col: str) -> str:
    return next(name for name, test in _FAMILIES if test(col))


def _plot_family(ax: Axes, df: pd.DataFrame, x: np.ndarray, cols: list[str], family: str, title: str) -> None:
    bases = list(dict.fromkeys(_split(c)[0] for c in cols))
    twin = None
    if family == "codebook use":
        right = [b for b in bases if "perplexity" in b]
        if right and len(right) < len(bases):
            twin = ax.twinx()
            twin.set_ylabel(", ".join(right))
    handles, positive = [], True
    for col in cols:
        base, split, style = _split(col)
        y = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
        ok = np.isfinite(y)
        if not ok.any():
            continue
        positive &= bool((y[ok] > 0).all())
        target = twin if twin is not None and "perplexity" in base else ax
        label = f"{base} ({split})" if split else base
        if target is twin:
            label += " [right axis]"
        (line,) = target.plot(
            x[ok],
            y[ok],
            style,
            color=f"C{bases.index(base) % 10}",
            marker="o" if ok.sum() < 2 else None,
            label=label,
        )
        handles.append(line)
    if family == "losses" and positive and handles:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("epoch")
    if handles:
        ax.legend(handles=handles, fontsize="x-small", frameon=False)


def training_history(
    model: Any,
    stage: int | str | None = None,
    keys: Sequence[str] | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """Per-epoch training curves, one row per stage and one panel per metric family.

    Families: losses (log scale when all positive), codebook use (utilisation; perplexity on a right-hand axis),
    token accuracy (one line per scale), and any other numeric column. Training metrics are solid lines,
    validation metrics dashed in the same colour.

    Parameters
    ----------
    model
        A trained :class:`varst_scverse.VARST`, or any object with ``history_``: a dict ``{"stage1": DataFrame,
        "stage2": DataFrame}`` with one row per epoch (column ``epoch``) and numeric metric columns.
    stage
        1, 2 (or ``"stage1"``, ``"stage2"``); default every trained stage.
    keys
        Only these history columns; default every numeric column.
    save
        Write the figure to this path and close it unless ``return_fig``.
    return_fig
        Return the figure.

    Returns
    -------
    The figure if ``return_fig``, else None.

    Examples
    --------
    >>> model.train(stage=1, max_epochs=50)  # doctest: +SKIP
    >>> varst.pl.training_history(model, stage=1)  # doctest: +SKIP
    """
    history = getattr(model, "history_", None) or {}
    history = {k: v for k, v in history.items() if isinstance(v, pd.DataFrame) and len(v)}
    if not history:
        raise ValueError("The model has no training history yet; call `model.train(stage=1)` first.")
    if stage is None:
        stages = sorted(history)
    else:
        key = _stage_key(stage)
        if key not in history:
            raise ValueError(
                f"No training history for {key!r} (have {sorted(history)}); call `model.train(stage={key[5:]})` first."
            )
        stages = [key]
    if keys is not None:
        keys = [str(k) for k in keys]
        known = set().union(*(history[s].columns for s in stages))
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise ValueError(f"Unknown history keys {unknown}; available: {sorted(known - set(_X_COLUMNS))}.")
    layout: list[tuple[str, pd.DataFrame, np.ndarray, dict[str, list[str]]]] = []
    for s in stages:
        df = history[s]
        x = df["epoch"].to_numpy(dtype=np.float64) if "epoch" in df else np.arange(len(df), dtype=np.float64)
        cols = [
            c
            for c in df.columns
            if c not in _X_COLUMNS and pd.api.types.is_numeric_dtype(df[c]) and (keys is None or c in keys)
        ]
        fams: dict[str, list[str]] = {}
        for c in cols:
            fams.setdefault(_family(str(c)), []).append(c)
        ordered = {name: fams[name] for name, _ in _FAMILIES if name in fams}
        if ordered:
            layout.append((s, df, x, ordered))
    if not layout:
        raise ValueError("No numeric history columns to plot for the selected stage(s) and keys.")
    ncols = max(len(f) for *_, f in layout)
    fig, axs = panel_grid(len(layout), ncols, (4.4, 3.4))
    for i, (s, df, x, fams) in enumerate(layout):
        for j, (family, cols) in enumerate(fams.items()):
            _plot_family(axs[i, j], df, x, cols, family, f"{s}: {family}")
    drop_unused(axs.ravel())
    return finish(fig, save, return_fig)


def codebook_usage(
    model: Any,
    adata=None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """How often each stage-1 code is used, codes sorted by use, on a log scale.

    The title gives the utilisation (share of codes used at least once) and the perplexity ``exp(entropy)`` of the
    code distribution — the number of equally used codes that would give the same entropy.

    Parameters
    ----------
    model
        A trained :class:`varst_scverse.VARST` (or any object with ``codebook_usage(adata)`` returning counts per
        code), or the counts themselves (``[vocab_size]``).
    adata
        Spots whose tokens are counted; default the model's training data.
    save
        Write the figure to this path and close it unless ``return_fig``.
    return_fig
        Return the figure.

    Returns
    -------
    The figure if ``return_fig``, else None.

    Examples
    --------
    >>> varst.pl.codebook_usage(model)  # doctest: +SKIP
    """
    raw = model.codebook_usage(adata) if hasattr(model, "codebook_usage") else model
    counts = np.asarray(raw, dtype=np.float64).ravel()
    if counts.size == 0 or not np.all(np.isfinite(counts)) or (counts < 0).any():
        raise ValueError("Code usage must be a non-empty vector of non-negative counts.")
    vocab = counts.size
    ordered = np.sort(counts)[::-1]
    used = int((ordered > 0).sum())
    total = float(ordered.sum())
    p = ordered[:used] / total if total > 0 else np.zeros(0)
    perplexity = float(np.exp(-(p * np.log(p)).sum())) if used else 0.0
    fig, axs = panel_grid(1, 1, (6.0, 3.6))
    ax = axs[0, 0]
    if used:
        baseline = float(ordered[used - 1]) / 2.0
        ax.stairs(ordered[:used], np.arange(used + 1), fill=True, baseline=baseline, color="tab:blue", label="used")
        ax.set_yscale("log")
    if used < vocab:
        ax.axvspan(used, vocab, color="lightgray", alpha=0.5, label=f"unused ({vocab - used})")
    ax.set_xlim(0, vocab)
    ax.set_xlabel("code (sorted by use)")
    ax.set_ylabel("uses")
    ax.set_title(
        f"codebook: {used}/{vocab} codes used ({100.0 * used / vocab:.1f}%), perplexity {perplexity:.1f}",
        fontsize="medium",
    )
    ax.legend(frameon=False, fontsize="small")
    return finish(fig, save, return_fig)
