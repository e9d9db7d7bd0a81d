"""Bad inputs: what a user gets from the public VARST API for each malformed input (a report, not a test).

Every case runs on a fresh copy of a small synthetic dataset (120 spots x 16 genes, two sections, 8-d histology)
against one tiny ``cpu``-preset model trained for one epoch per stage. For each case the script records what the user
gets:

* an exception raised by an explicit ``raise`` in ``varst_scverse`` (ValueError, KeyError, TypeError, or an
  ``OSError`` / ``RuntimeError`` subclass with our message): **clear**;
* an exception from anywhere else (torch, numpy, scvi-tools, anndata, a shape error inside our code): **NOT CLEAR**;
* no exception where an error was expected: **NOT CLEAR** (silently accepted);
* accepted cases (sparse, float dtypes, one spot, reordered / missing / no genes): the result is checked against the
  reference prediction; a wrong result is **NOT CLEAR**.

Usage
-----
::

    python benchmarks/bad_inputs.py                       # ~30 s on one CPU thread; writes results/bad_inputs.md
    python benchmarks/bad_inputs.py --out /tmp/bad.md     # elsewhere
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import logging
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import sparse

import varst_scverse as varst
from varst_scverse import VARST
from varst_scverse.model._inputs import neighbour_index

VQ = {"vocab_size": 64, "embed_dim": 16, "hidden_dim": 32, "gene_mixing_dim": 16, "scales": (1, 4, 8, None)}
VAR = {"embed_dim": 32, "num_heads": 2, "num_layers": 2, "feedforward_dim": 64, "condition_embed_dim": 32}
SETUP = {"layer": "counts", "histology_key": "X_histology", "spatial_key": "spatial", "batch_key": "section"}
FAST = {"batch_size": 32, "enable_progress_bar": False}
HIST, XY = SETUP["histology_key"], SETUP["spatial_key"]

PKG_DIR = Path(varst.__file__).resolve().parent
TMP_TAG: list[str] = []  # the case directory, shown as <tmp> in messages
CLEAR_TYPES = (ValueError, KeyError, TypeError, OSError, RuntimeError)
MSG_CHARS = 160


class WrongResult(Exception):
    """An accepted input whose result failed the check (a silent wrong result)."""


@dataclass
class Row:
    """One line of the report."""

    bad_input: str
    call: str
    gets: str
    message: str
    not_clear: bool = False
    details: str = ""
    checked: str = ""


# ---------------------------------------------------------------------------------------------------- classification
def _short_path(path: Path) -> str:
    parts = path.parts
    for anchor in ("site-packages", "src"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1 :])
    return path.name


def _message(err: BaseException) -> str:
    msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    msg = " ".join(str(msg).split())
    return msg.replace(TMP_TAG[0], "<tmp>") if TMP_TAG else msg


def _classify(err: BaseException) -> tuple[str, bool]:
    """What the user gets, and whether it is NOT CLEAR (not an explicit ``raise`` of ours with a clear type)."""
    frames = traceback.extract_tb(err.__traceback__)
    name = type(err).__name__
    if not frames:
        return f"**NOT CLEAR**: `{name}` (no traceback)", True
    last = frames[-1]
    path = Path(last.filename).resolve()
    ours = PKG_DIR in path.parents
    explicit = (last.line or "").lstrip().startswith("raise")
    if ours and explicit and isinstance(err, CLEAR_TYPES):
        return f"`{name}` (clear)", False
    where = f"{_short_path(path)}:{last.lineno}"
    if ours:
        return f"**NOT CLEAR**: `{name}` from an operation inside our code ({where}), not a raise of ours", True
    return f"**NOT CLEAR**: `{name}` from {where}", True


def _warning_text(caught: list[warnings.WarningMessage]) -> str:
    seen = []
    for w in caught:
        if issubclass(w.category, DeprecationWarning | FutureWarning):
            continue
        path = Path(w.filename).resolve()
        origin = "" if PKG_DIR in path.parents else f" (shown at {_short_path(path)})"
        text = f"{w.category.__name__}{origin}: {' '.join(str(w.message).split())}"
        if text not in seen:
            seen.append(text)
    return "; ".join(seen)


def attempt(bad_input: str, call: str, fn: Callable[[], str | None], expect: str = "error") -> Row:
    """Run ``fn`` and describe what the user gets.

    Parameters
    ----------
    bad_input
        The malformed input, in words.
    call
        The public call that receives it.
    fn
        Runs the call; for accepted inputs it checks the result and returns what was checked, or raises
        :class:`WrongResult`.
    expect
        ``"error"`` (a clear error is the right answer), ``"accept"`` (the input is valid) or ``"either"``.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            checked = fn()
        except WrongResult as err:
            row = Row(bad_input, call, "**NOT CLEAR**: silently wrong result", _message(err), True, _message(err))
        except Exception as err:  # noqa: BLE001 - the point is to see every exception
            gets, not_clear = _classify(err)
            tail = "".join(traceback.format_exception(err)).rstrip().splitlines()[-6:]
            row = Row(bad_input, call, gets, _message(err), not_clear, "\n".join(tail) if not_clear else "")
        else:
            if expect == "error":
                row = Row(bad_input, call, "**NOT CLEAR**: no error (silently accepted)", "", True)
                row.details = f"expected an error; the call returned ({checked or 'nothing checked'})"
            else:
                row = Row(bad_input, call, "accepted", "")
            row.checked = checked or ""
    warned = _warning_text(caught)
    if warned:
        row.gets += " + warning"
        row.message = f"{warned} | {row.message}" if row.message else warned
    flag = "NOT CLEAR" if row.not_clear else "ok"
    print(f"[{flag:9s}] {bad_input} :: {call} -> {row.gets} {row.message[:80]} {row.checked[:80]}", flush=True)
    return row


# ---------------------------------------------------------------------------------------------------- fixtures
def _base() -> ad.AnnData:
    return varst.datasets.synthetic(n_spots=120, n_genes=16, n_sections=2, histology_dim=8, seed=0)


BASE = _base()


def fresh() -> ad.AnnData:
    """An unregistered copy of the base data (counts: sparse int32 CSR in ``layers['counts']``)."""
    return BASE.copy()


def setup(adata) -> None:
    """``VARST.setup_anndata`` with the registered keys of the trained model."""
    VARST.setup_anndata(adata, **SETUP)


def new_model(adata=None, **kw) -> VARST:
    """An untrained tiny model on ``adata`` (registered here when it is not yet)."""
    if adata is None:
        adata = fresh()
        setup(adata)
    return VARST(adata, preset="cpu", vqvae_config=kw.pop("vqvae_config", VQ), var_config=kw.pop("var_config", VAR))


def _close(a: np.ndarray, b: np.ndarray, what: str, atol: float = 1e-5) -> str:
    if a.shape != b.shape:
        raise WrongResult(f"{what}: shape {a.shape}, expected {b.shape}")
    diff = float(np.nanmax(np.abs(a - b))) if a.size else 0.0
    if not np.isfinite(a).all() or diff > atol:
        raise WrongResult(f"{what}: max |diff| {diff:.3g} > {atol:g} (finite: {bool(np.isfinite(a).all())})")
    return f"{what}: shape {a.shape}, max |diff| {diff:.2g}"


# ---------------------------------------------------------------------------------------------------- cases
def run_cases(model: VARST, ref: np.ndarray, ref_tokens: np.ndarray, tmp: Path) -> list[Row]:
    """Every bad input of the reliability issue, plus a few extras."""
    rows: list[Row] = []
    add = rows.append

    def predict(q, **kw) -> np.ndarray:
        return model.predict_expression(q, n_samples=0, add_to_adata=kw.pop("add_to_adata", False), **kw)

    # --- missing keys
    def missing_layer_setup():
        a = fresh()
        del a.layers["counts"]
        setup(a)

    add(attempt("missing layer `counts`", "`setup_anndata(adata, layer='counts')`", missing_layer_setup))

    def missing_layer_tokens():
        a = fresh()
        del a.layers["counts"]
        model.get_tokens(a)

    add(attempt("missing layer `counts` (query)", "`model.get_tokens(query)`", missing_layer_tokens))

    for key, label in ((HIST, "histology"), (XY, "spatial")):

        def missing_setup(key=key):
            a = fresh()
            del a.obsm[key]
            setup(a)

        def missing_predict(key=key):
            a = fresh()
            del a.obsm[key]
            predict(a)

        add(attempt(f"missing {label} obsm key `{key}`", "`setup_anndata`", missing_setup))
        add(attempt(f"missing {label} obsm key `{key}` (query)", "`model.predict_expression(query)`", missing_predict))

    # --- non-finite histology / coordinates
    def bad_obsm(key: str, row: int, col: int, value: float) -> ad.AnnData:
        a = fresh()
        arr = np.array(a.obsm[key], dtype=np.float64 if key == XY else np.float32)
        arr[row, col] = value
        a.obsm[key] = arr
        return a

    for label, key, value in (
        ("NaN in histology (partly-NaN row)", HIST, np.nan),
        ("inf in histology", HIST, np.inf),
        ("NaN in coordinates", XY, np.nan),
        ("inf in coordinates", XY, np.inf),
    ):
        add(attempt(label, "`setup_anndata`", lambda key=key, value=value: setup(bad_obsm(key, 3, 1, value))))
        add(
            attempt(
                f"{label} (query)",
                "`model.predict_expression(query)`",
                lambda key=key, value=value: predict(bad_obsm(key, 3, 1, value)),
            )
        )

    def all_nan_row():
        a = fresh()
        a.obsm[HIST] = np.array(a.obsm[HIST], dtype=np.float32)
        a.obsm[HIST][5] = np.nan
        pred = predict(a)
        if not np.isnan(pred[5]).all():
            raise WrongResult("the spot without histology got a prediction")
        # by design the spots that have spot 5 among their neighbours see a different neighbour context (spots
        # without histology are skipped in the neighbour mean); every other spot must be unchanged
        k = model.module.var_config["neighbour_k"]
        sections = pd.Categorical(a.obs[SETUP["batch_key"]]).codes
        near = (neighbour_index(np.asarray(a.obsm[XY]), sections, k) == 5).any(1) if k else np.zeros(len(a), bool)
        far = ~near
        far[5] = False
        msg = _close(pred[far], ref[far], f"the {far.sum()} spots without spot 5 among their {k} neighbours")
        return f"spot 5 all NaN; {msg}; its {near.sum()} neighbours changed (neighbour context)"

    add(
        attempt(
            "(extra) whole histology row NaN = spot without image (documented)",
            "`predict_expression`",
            all_nan_row,
            "accept",
        )
    )

    # --- bad counts
    def bad_counts(kind: str) -> ad.AnnData:
        a = fresh()
        c = a.layers["counts"].astype(np.float32)
        if kind == "nan":
            c.data[0] = np.nan
        elif kind == "inf":
            c.data[0] = np.inf
        elif kind == "negative":
            c = a.layers["counts"].copy()
            c.data[0] = -1
        elif kind == "log1p":
            c = c.log1p()
        elif kind == "half":
            c.data[0] += 0.5
        a.layers["counts"] = c
        return a

    for kind, label in (
        ("nan", "NaN in counts"),
        ("inf", "inf in counts"),
        ("negative", "negative counts (int)"),
        ("log1p", "non-integer counts (log1p-normalised layer)"),
        ("half", "non-integer counts (one value + 0.5)"),
    ):
        add(attempt(label, "`setup_anndata`", lambda kind=kind: setup(bad_counts(kind))))
        add(
            attempt(
                f"{label} (query)", "`model.get_tokens(query)`", lambda kind=kind: model.get_tokens(bad_counts(kind))
            )
        )

    # --- histology width
    def wide_histology():
        a = fresh()
        h = np.asarray(a.obsm[HIST])
        a.obsm[HIST] = np.hstack([h, h[:, :2]])
        predict(a)

    add(attempt("histology width 10 at predict time (trained on 8)", "`predict_expression(query)`", wide_histology))

    # --- genes at predict time
    def genes_missing_predict():
        a = fresh()[:, 3:].copy()
        pred = model.predict_expression(a, n_samples=0)
        got = a.obsm["varst_predicted"]
        if list(got.columns) != model.gene_names_:
            raise WrongResult("obsm['varst_predicted'] columns are not the model's genes")
        return (
            _close(pred, ref, "13 of 16 genes: returned in the model's gene order, vs reference")
            + "; written to obsm['varst_predicted'] (DataFrame, all 16 model genes)"
        )

    add(
        attempt(
            "genes missing at predict time (3 of 16 dropped)",
            "`predict_expression(query)`",
            genes_missing_predict,
            "accept",
        )
    )

    def genes_missing_tokens():
        model.get_tokens(fresh()[:, 3:].copy())

    add(attempt("genes missing (query)", "`model.get_tokens(query)` / `reconstruct`", genes_missing_tokens))

    perm = np.random.default_rng(3).permutation(BASE.n_vars)

    def genes_reordered_predict():
        a = fresh()[:, perm].copy()
        pred = model.predict_expression(a, n_samples=0)
        msg = _close(pred, ref[:, perm], "returned in the query's order == reference[:, perm]")
        _close(a.layers["varst_predicted"], ref[:, perm], "layer")
        return msg + "; layers['varst_predicted'] also in the query's order"

    add(
        attempt(
            "genes in another order at predict time", "`predict_expression(query)`", genes_reordered_predict, "accept"
        )
    )

    def genes_reordered_tokens():
        a = fresh()[:, perm].copy()
        tok = model.get_tokens(a)
        if not np.array_equal(tok, ref_tokens):
            raise WrongResult(f"tokens differ from the original order in {(tok != ref_tokens).mean():.1%} of places")
        rec = model.reconstruct(a)
        rec_ref = model.reconstruct(fresh())
        return "tokens identical; " + _close(rec, rec_ref[:, perm], "reconstruct in the query's order")

    add(
        attempt(
            "genes in another order (query)",
            "`get_tokens(query)`, `reconstruct(query)`",
            genes_reordered_tokens,
            "accept",
        )
    )

    def no_genes():
        src = fresh()
        q = ad.AnnData(obs=src.obs.copy(), obsm={HIST: src.obsm[HIST].copy(), XY: src.obsm[XY].copy()})
        pred = model.predict_expression(q, n_samples=0)
        return f"query {q.n_obs} x {q.n_vars}; " + _close(pred, ref, "histology-only prediction vs reference")

    add(attempt("query with no genes at all (n_vars = 0)", "`predict_expression(query)`", no_genes, "accept"))

    # --- sizes, names
    def empty_setup():
        setup(fresh()[:0].copy())

    def empty_predict():
        predict(fresh()[:0].copy())

    add(attempt("empty AnnData (0 spots)", "`setup_anndata`", empty_setup))
    add(attempt("empty AnnData (0 spots, query)", "`predict_expression(query)`", empty_predict))

    def one_spot():
        a = fresh()[:1].copy()
        setup(a)
        pred = model.predict_expression(a, n_samples=3)
        if pred.shape != (1, BASE.n_vars) or not np.isfinite(pred).all():
            raise WrongResult(f"1-spot prediction has shape {pred.shape}, finite={np.isfinite(pred).all()}")
        unc = a.layers["varst_uncertainty"]
        return f"setup ok; prediction shape {pred.shape}, finite; uncertainty finite={bool(np.isfinite(unc).all())}"

    add(attempt("one spot", "`setup_anndata` + `predict_expression` (n_samples=3)", one_spot, "accept"))

    def one_spot_train():
        a = fresh()[:1].copy()
        setup(a)
        m = new_model(a)
        m.train(stage=1, max_epochs=1, **FAST)
        finite = all(bool(torch.isfinite(t).all()) for t in m.module.state_dict().values() if t.is_floating_point())
        rec = m.reconstruct(a)
        if not finite or not np.isfinite(rec).all():
            raise WrongResult(f"after stage 1 on one spot: finite weights {finite}, finite reconstruction {rec}")
        return f"stage 1 trained on one spot; weights finite, reconstruction {rec.shape} finite"

    add(attempt("(extra) one spot as training data", "`VARST(adata)` + `train(stage=1)`", one_spot_train, "either"))

    def dup_names(predicting: bool):
        a = fresh()
        names = a.obs_names.tolist()
        names[1] = names[0]
        a.obs_names = names
        predict(a) if predicting else setup(a)

    add(attempt("duplicated obs names", "`setup_anndata`", lambda: dup_names(False)))
    add(attempt("duplicated obs names (query)", "`predict_expression(query)`", lambda: dup_names(True)))

    def dup_genes():
        a = fresh()
        names = a.var_names.tolist()
        names[1] = names[0]
        a.var_names = names
        setup(a)

    add(attempt("(extra) duplicated var names", "`setup_anndata`", dup_genes))

    # --- formats and dtypes
    def dense_counts():
        a = fresh()
        a.layers["counts"] = a.layers["counts"].toarray()
        setup(a)
        tok = model.get_tokens(a)
        if not np.array_equal(tok, ref_tokens):
            raise WrongResult("dense counts give other tokens than sparse counts")
        s = fresh()
        setup(s)
        md, ms = new_model(a).module, new_model(s).module
        if not torch.equal(md.gene_order, ms.gene_order):
            raise WrongResult("VARST(dense) and VARST(sparse) cluster the genes into different orders")
        sd_dense, sd_sparse = md.state_dict(), ms.state_dict()
        diff = max(float((sd_dense[k].double() - sd_sparse[k].double()).abs().max()) for k in sd_sparse)
        if diff > 1e-6:
            raise WrongResult(f"VARST(dense) and VARST(sparse) initial states differ by up to {diff:.3g}")
        return (
            "setup ok; tokens identical to sparse CSR; VARST(dense) vs VARST(sparse): same gene order, initial "
            f"state max |diff| {diff:.1g} (float32 rounding of the gene standardisation)"
        )

    add(
        attempt(
            "dense counts (reference: sparse CSR int32)",
            "`setup_anndata`, `VARST()`, `get_tokens`",
            dense_counts,
            "accept",
        )
    )

    def csc_counts():
        a = fresh()
        a.layers["counts"] = sparse.csc_matrix(a.layers["counts"])
        setup(a)
        tok = model.get_tokens(a)
        if not np.array_equal(tok, ref_tokens):
            raise WrongResult("CSC counts give other tokens than CSR counts")
        return "setup ok; tokens identical to CSR"

    add(attempt("sparse CSC counts", "`setup_anndata`, `get_tokens`", csc_counts, "accept"))

    for dtype in (np.float16, np.float64):

        def float_counts(dtype=dtype):
            a = fresh()
            a.layers["counts"] = a.layers["counts"].toarray().astype(dtype)
            setup(a)
            tok = model.get_tokens(a)
            if not np.array_equal(tok, ref_tokens):
                raise WrongResult(f"{np.dtype(dtype).name} counts give other tokens than int32 counts")
            return "setup ok; tokens identical to int32 counts"

        def float_histology(dtype=dtype):
            a = fresh()
            a.obsm[HIST] = np.asarray(a.obsm[HIST]).astype(dtype)
            setup(a)
            pred = predict(a)
            atol = 5e-2 if dtype == np.float16 else 1e-5
            return "setup ok; " + _close(pred, ref, f"prediction vs float32 histology (atol {atol:g})", atol=atol)

        name = np.dtype(dtype).name
        add(attempt(f"{name} counts (dense)", "`setup_anndata`, `get_tokens`", float_counts, "accept"))
        add(attempt(f"{name} histology", "`setup_anndata`, `predict_expression`", float_histology, "accept"))

    def float32_coords():
        a = fresh()
        a.obsm[XY] = np.asarray(a.obsm[XY]).astype(np.float32)
        return _close(predict(a), ref, "prediction vs float64 coordinates")

    add(attempt("(extra) float32 coordinates", "`predict_expression`", float32_coords, "accept"))

    h5ad = tmp / "backed.h5ad"
    fresh().write_h5ad(h5ad)
    add(
        attempt(
            "backed AnnData (`read_h5ad(..., backed='r')`)",
            "`setup_anndata`",
            lambda: setup(ad.read_h5ad(h5ad, backed="r")),
        )
    )
    add(
        attempt(
            "backed AnnData (query)",
            "`predict_expression(query)`",
            lambda: predict(ad.read_h5ad(h5ad, backed="r")),
        )
    )

    # --- configuration and call order
    def bogus_key():
        a = fresh()
        setup(a)
        VARST(a, preset="cpu", vqvae_config={"bogus": 1}, var_config=VAR)

    add(attempt("unknown config key", "`VARST(adata, vqvae_config={'bogus': 1})`", bogus_key))

    def vocab_disagree():
        new_model(vqvae_config={**VQ, "vocab_size": 64}, var_config={**VAR, "vocab_size": 32})

    add(attempt("vocab_size 64 in vqvae_config, 32 in var_config", "`VARST(...)`", vocab_disagree))

    add(
        attempt(
            "stage 2 before stage 1", "`model.train(stage=2)`", lambda: new_model().train(stage=2, max_epochs=1, **FAST)
        )
    )
    add(
        attempt(
            "predict before stage 2 (untrained model)",
            "`model.predict_expression()`",
            lambda: new_model().predict_expression(),
        )
    )
    add(attempt("(extra) tokens before stage 1", "`model.get_tokens()`", lambda: new_model().get_tokens()))

    def bad_indices():
        predict(fresh(), indices=[0, 1, BASE.n_obs + 5])

    add(attempt("(extra) out-of-range spot indices", "`predict_expression(query, indices=[0, 1, 125])`", bad_indices))

    add(
        attempt(
            "(extra) out-of-range spot indices",
            "`get_tokens(query, indices=[0, 125])`",
            lambda: model.get_tokens(fresh(), indices=[0, BASE.n_obs + 5]),
        )
    )

    def missing_batch_column():
        a = fresh()
        del a.obs["section"]
        pred = predict(a)
        if pred.shape != ref.shape or not np.isfinite(pred).all():
            raise WrongResult(f"shape {pred.shape}, finite={np.isfinite(pred).all()}")
        return f"prediction shape {pred.shape}, finite (all spots treated as one section)"

    add(
        attempt(
            "(extra) batch_key column missing in the query (documented)",
            "`predict_expression(query)`",
            missing_batch_column,
            "accept",
        )
    )

    # --- persistence
    saved = tmp / "model"
    model.save(saved)

    def truncated():
        d = tmp / "truncated"
        d.mkdir()
        for f in saved.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        w = d / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        VARST.load(d, adata=fresh())

    add(attempt("truncated `model.safetensors` (half the bytes)", "`VARST.load(dir, adata)`", truncated))
    add(
        attempt(
            "missing directory",
            "`VARST.load('does/not/exist', adata)`",
            lambda: VARST.load(tmp / "nope", adata=fresh()),
        )
    )

    def save_existing():
        before = {f.name: f.read_bytes() for f in saved.iterdir()}
        try:
            model.save(saved)
        finally:
            after = {f.name: f.read_bytes() for f in saved.iterdir()}
            if before != after:
                raise WrongResult("the existing directory was changed")

    add(attempt("`model.save` into an existing directory", "`model.save(dir)` (no overwrite=True)", save_existing))

    # --- SpatialData where an AnnData is expected
    try:
        from spatialdata import SpatialData
    except ImportError:  # pragma: no cover
        add(Row("SpatialData object instead of AnnData", "-", "skipped", "spatialdata is not installed"))
    else:

        def sdata() -> SpatialData:
            return SpatialData(tables={"table": fresh()})

        add(
            attempt(
                "SpatialData object instead of AnnData",
                "`setup_anndata(sdata)`",
                lambda: VARST.setup_anndata(sdata(), **SETUP),
            )
        )
        add(attempt("SpatialData object instead of AnnData", "`VARST(sdata)`", lambda: VARST(sdata(), preset="cpu")))
        add(
            attempt(
                "SpatialData object instead of AnnData", "`model.predict_expression(sdata)`", lambda: predict(sdata())
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------------- report
def _cell(text: str, limit: int | None = None) -> str:
    text = " ".join(str(text).split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev.stdout.strip() + (" + uncommitted changes in src/" if dirty.stdout.strip() else "")


def write_report(rows: list[Row], out: Path, seconds: float, command: str) -> None:
    """Write the markdown table, then the traceback tails of the NOT CLEAR rows."""
    n_bad = sum(r.not_clear for r in rows)
    lines = [
        "# Bad inputs: what the user gets",
        "",
        f"`{command}` · {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} · varst-scverse "
        f"{importlib.metadata.version('varst-scverse')} (git {_git_rev()}) · torch {torch.__version__} · anndata "
        f"{importlib.metadata.version('anndata')} · Python {platform.python_version()} · {seconds:.0f} s after imports",
        "",
        "Data: `varst.datasets.synthetic(n_spots=120, n_genes=16, n_sections=2, histology_dim=8, seed=0)`, a fresh "
        "copy per case (counts: sparse CSR int32 in `layers['counts']`); model: `preset='cpu'` with the tiny configs "
        "of `tests/test_model.py`, one epoch per stage. Reference prediction: "
        "`predict_expression(query, n_samples=0)` on the unmodified data. *(clear)*: raised by an explicit `raise` "
        "in `varst_scverse`; **NOT CLEAR**: raised elsewhere (torch, numpy, scvi-tools, …), raised by an operation "
        "inside our code, no error where one was due, or a wrong result. *(query)*: the bad input is in the AnnData "
        "handed to a trained model. *(extra)*: not in the issue's list. A warning's *shown at* is the location "
        "Python prints with it (set by the warning's `stacklevel`).",
        "",
        f"**{len(rows)} cases, {n_bad} NOT CLEAR.**",
        "",
        "| bad input | call | what the user gets (exception type) | message (first ~160 characters) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        message = _cell(r.message, MSG_CHARS)
        if r.checked:  # what an accepted case was checked for, in full
            message = f"{message} — checked: {_cell(r.checked)}" if message else f"checked: {_cell(r.checked)}"
        lines.append(f"| {_cell(r.bad_input)} | {_cell(r.call)} | {_cell(r.gets)} | {message} |")
    if n_bad:
        lines += ["", "## NOT CLEAR: details", ""]
        for r in rows:
            if r.not_clear:
                lines += [f"### {r.bad_input} — {r.call}", "", "```", r.details or r.message, "```", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bad_inputs.md")
    args = p.parse_args()
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    for name in ("lightning", "lightning.pytorch", "lightning_fabric", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)

    train = fresh()
    setup(train)
    model = VARST(train, preset="cpu", vqvae_config=VQ, var_config=VAR, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(stage=1, max_epochs=1, **FAST)
        model.train(stage=2, max_epochs=1, **FAST)
    ref = model.predict_expression(fresh(), n_samples=0, add_to_adata=False)
    ref_tokens = model.get_tokens(fresh())
    print(f"trained in {time.perf_counter() - t0:.1f} s; reference prediction {ref.shape}", flush=True)

    with tempfile.TemporaryDirectory(prefix="varst_bad_inputs_") as tmp:
        TMP_TAG.append(tmp)
        rows = run_cases(model, ref, ref_tokens, Path(tmp))
    seconds = time.perf_counter() - t0
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0])), *sys.argv[1:]])
    write_report(rows, args.out, seconds, command)
    n_bad = sum(r.not_clear for r in rows)
    print(f"{len(rows)} cases, {n_bad} NOT CLEAR; {seconds:.0f} s after imports; wrote {args.out}")


if __name__ == "__main__":
    main()
