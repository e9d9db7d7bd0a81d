"""Per-gene accuracy plots: the distribution of Pearson r, and VARST against a baseline gene by gene.

Inputs are the per-gene r of :func:`varst_scverse.tl.pearson_per_gene` or ``tl.evaluate``; nothing is recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._utils import finish, panel_grid

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _as_series(x, name: str) -> pd.Series:
    """Return a float Series of per-gene r (gene-indexed when given a Series, else indexed ``gene0, gene1, ...``)."""
    if isinstance(x, pd.DataFrame):
        if x.shape[1] != 1:
            raise ValueError(f"{name} must be one column of per-gene r; got a DataFrame with {x.shape[1]} columns.")
        x = x.iloc[:, 0]
    if isinstance(x, pd.Series):
        s = x.astype(np.float64)
        s.index = s.index.astype(str)
    else:
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim != 1:
            raise ValueError(f"{name} must be 1-D (one r per gene); got shape {arr.shape}.")
        s = pd.Series(arr, index=[f"gene{i}" for i in range(arr.size)])
    if s.size == 0:
        raise ValueError(f"{name} is empty.")
    if s.index.has_duplicates:
        raise ValueError(f"{name} has duplicated gene names.")
    return s


def _align(a: pd.Series, b: pd.Series, a_raw, b_raw) -> pd.Series:
    """``b`` in the gene order of ``a``: by name when both are Series, by position otherwise."""
    if isinstance(a_raw, pd.Series | pd.DataFrame) and isinstance(b_raw, pd.Series | pd.DataFrame):
        missing = a.index.difference(b.index)
        extra = b.index.difference(a.index)
        if len(missing) or len(extra):
            raise ValueError(
                f"per_gene and other must hold the same genes; {len(missing)} only in per_gene "
                f"(e.g. {list(missing[:3])}), {len(extra)} only in other (e.g. {list(extra[:3])})."
            )
        return b.reindex(a.index)
    if a.size != b.size:
        raise ValueError(f"per_gene has {a.size} genes but other has {b.size}; they must match.")
    return pd.Series(b.to_numpy(), index=a.index)


def gene_pearson(
    per_gene,
    other=None,
    labels: Sequence[str] = ("VARST", "baseline"),
    top_n: int = 20,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """Per-gene Pearson r: its histogram for one method, or one method against another gene by gene.

    Parameters
    ----------
    per_gene
        Per-gene Pearson r of the first method (``labels[0]``): a gene-indexed :class:`pandas.Series` or an array.
        NaN (r undefined, e.g. a constant gene) are left out and counted in the title.
    other
        Per-gene r of a second method (``labels[1]``) over the same genes — matched by name when both are Series,
        by position otherwise. Then the plot is a scatter of ``labels[0]`` r (y) against ``labels[1]`` r (x) with the
        diagonal, and the mean r of each method in the legend.
    labels
        Names of the two methods.
    top_n
        Genes named: without ``other``, a second panel of the ``top_n`` best genes; with ``other``, the ``top_n``
        genes with the largest difference are labelled on the scatter. 0 names none.
    save
        Write the figure to this path and close it unless ``return_fig``.
    return_fig
        Return the figure.

    Returns
    -------
    The figure if ``return_fig``, else None.

    Examples
    --------
    >>> res = varst.tl.evaluate(...)  # doctest: +SKIP
    >>> varst.pl.gene_pearson(r_varst, other=r_ridge, labels=("VARST", "ridge"))  # doctest: +SKIP
    """
    labels = tuple(labels)
    if len(labels) < (2 if other is not None else 1):
        raise ValueError(f"labels needs a name per method; got {labels}.")
    if top_n < 0:
        raise ValueError(f"top_n must be >= 0; got {top_n}.")
    r = _as_series(per_gene, "per_gene")
    if other is None:
        return _histogram(r, labels[0], top_n, save, return_fig)
    o = _align(r, _as_series(other, "other"), per_gene, other)
    return _comparison(r, o, labels[:2], top_n, save, return_fig)


def _histogram(r: pd.Series, label: str, top_n: int, save, return_fig: bool) -> Figure | None:
    ok = r.dropna()
    n_nan = int(r.size - ok.size)
    top = ok.sort_values(ascending=False).iloc[:top_n]
    fig, axs = panel_grid(1, 2 if len(top) else 1, (5.0, 3.8))
    ax = axs[0, 0]
    bins = np.linspace(min(-0.2, float(ok.min()) if ok.size else 0.0), 1.0, 31)
    ax.hist(ok.to_numpy(), bins=bins, color="tab:blue", alpha=0.85, edgecolor="white")
    mean = float(ok.mean()) if ok.size else float("nan")
    ax.axvline(mean, color="black", linestyle="--", label=f"mean r = {mean:.3f}")
    ax.set_xlabel("Pearson r (per gene)")
    ax.set_ylabel("genes")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(frameon=False)
    title = f"{label}: {ok.size} genes"
    if n_nan:
        title += f" ({n_nan} undefined r left out)"
    ax.set_title(title)
    if len(top):
        bx = axs[0, 1]
        fig.set_figheight(max(3.8, 0.22 * len(top) + 1.0))
        y = np.arange(len(top))[::-1]
        bx.barh(y, top.to_numpy(), color="tab:blue")
        bx.set_yticks(y, labels=top.index.tolist(), fontsize="small")
        bx.set_xlabel("Pearson r")
        bx.set_title(f"{label}: top {len(top)} genes")
    return finish(fig, save, return_fig)


def _comparison(r: pd.Series, o: pd.Series, labels, top_n: int, save, return_fig: bool) -> Figure | None:
    both = pd.DataFrame({"a": r, "b": o}).dropna()
    n_nan = int(r.size - len(both))
    fig, axs = panel_grid(1, 1, (5.2, 5.0))
    ax = axs[0, 0]
    a, b = both["a"].to_numpy(), both["b"].to_numpy()
    better = int((a > b).sum())
    ax.scatter(b, a, s=14, alpha=0.7, color="tab:blue", linewidths=0, label=f"genes (n = {len(both)})")
    vals = np.concatenate([a, b]) if len(both) else np.array([0.0, 1.0])
    lo, hi = min(float(vals.min()), 0.0) - 0.05, max(float(vals.max()), 0.0) + 0.05
    ax.plot([lo, hi], [lo, hi], color="gray", linewidth=1, label="y = x")
    mean_a = float(a.mean()) if len(a) else float("nan")
    mean_b = float(b.mean()) if len(b) else float("nan")
    ax.axhline(mean_a, color="tab:red", linestyle="--", linewidth=1, label=f"mean {labels[0]} r = {mean_a:.3f}")
    ax.axvline(mean_b, color="tab:green", linestyle=":", linewidth=1, label=f"mean {labels[1]} r = {mean_b:.3f}")
    if top_n and len(both):
        diff = (both["a"] - both["b"]).abs().sort_values(ascending=False).iloc[:top_n]
        for g in diff.index:
            ax.annotate(
                g,
                (both.at[g, "b"], both.at[g, "a"]),
                fontsize="x-small",
                alpha=0.8,
                xytext=(2, 2),
                textcoords="offset points",
            )
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel(f"{labels[1]} Pearson r")
    ax.set_ylabel(f"{labels[0]} Pearson r")
    title = f"{labels[0]} better on {better}/{len(both)} genes"
    if n_nan:
        title += f" ({n_nan} with undefined r left out)"
    ax.set_title(title)
    ax.legend(frameon=False, fontsize="small", loc="upper left")
    return finish(fig, save, return_fig)
