"""Input checks for AnnData handed to VARST: every problem gets a message that names it and says how to fix it."""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
from anndata import AnnData
from scipy import sparse


def check_anndata(adata) -> AnnData:
    """Refuse non-AnnData, empty, backed or duplicate-named objects."""
    if not isinstance(adata, AnnData):
        try:
            from spatialdata import SpatialData
        except ImportError:  # pragma: no cover
            SpatialData = ()  # noqa: N806
        if SpatialData and isinstance(adata, SpatialData):
            raise TypeError("VARST takes an AnnData; pass the SpatialData's table, e.g. `sdata.tables['table']`.")
        raise TypeError(f"Expected an AnnData, got {type(adata).__name__}.")
    if adata.n_obs == 0:
        raise ValueError("The AnnData has no spots (n_obs == 0); pass a non-empty AnnData.")
    if adata.isbacked:
        raise ValueError(
            "The AnnData is backed on disk; load it into memory first with `adata = adata.to_memory()` "
            "(or read it without backed=...)."
        )
    if not adata.obs_names.is_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()][:3].tolist()
        raise ValueError(f"Duplicated spot names (obs_names), e.g. {dup}; call `adata.obs_names_make_unique()`.")
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()][:3].tolist()
        raise ValueError(f"Duplicated gene names (var_names), e.g. {dup}; call `adata.var_names_make_unique()`.")
    return adata


def get_layer(adata: AnnData, layer: str | None):
    """The counts matrix from ``layer`` (``None`` = ``X``), with a clear error when it does not exist."""
    if layer is None:
        if adata.X is None:
            raise KeyError("adata.X is empty; pass layer=... naming the layer with raw counts.")
        return adata.X
    if layer not in adata.layers:
        raise KeyError(
            f"Layer {layer!r} not found; available layers: {list(adata.layers.keys())}. Pass layer=None for X."
        )
    return adata.layers[layer]


def check_counts(x, where: str) -> None:
    """Raw counts must be finite, non-negative integers."""
    data = x.data if sparse.issparse(x) else np.asarray(x)
    if data.size == 0:
        return
    if not np.issubdtype(data.dtype, np.number):
        raise TypeError(f"{where} holds {data.dtype} values; expected numeric raw counts.")
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{where} contains NaN or infinite values; raw counts must be finite.")
    if (data < 0).any():
        raise ValueError(f"{where} contains negative values; VARST expects raw counts (non-negative integers).")
    if not np.issubdtype(data.dtype, np.integer) and not np.all(np.equal(np.mod(data, 1), 0)):
        raise ValueError(
            f"{where} contains non-integer values; VARST expects raw counts. If these are normalised or log "
            "values, pass the raw-counts layer instead (layer='counts')."
        )


def get_obsm(adata: AnnData, key: str, what: str) -> np.ndarray:
    """A dense float array from ``adata.obsm[key]`` with a clear error when missing or malformed."""
    if key not in adata.obsm:
        raise KeyError(f"{what} key {key!r} not found in adata.obsm; available keys: {list(adata.obsm.keys())}.")
    arr = adata.obsm[key]
    if hasattr(arr, "to_numpy"):
        arr = arr.to_numpy()
    if sparse.issparse(arr):
        arr = arr.toarray()
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.shape[0] != adata.n_obs:
        raise ValueError(f"adata.obsm[{key!r}] must be a 2-D array with one row per spot; got shape {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"adata.obsm[{key!r}] holds {arr.dtype} values; expected numbers.")
    return arr


def check_histology(hist: np.ndarray, key: str, chunk_rows: int = 8192) -> np.ndarray:
    """Histology features: finite, or a whole row NaN (no image for that spot). Returns the has-histology mask.

    Checked in blocks of ``chunk_rows`` rows so that a large query needs no full-size boolean copies.
    """
    if hist.shape[1] < 1:
        raise ValueError(f"adata.obsm[{key!r}] has zero columns; embed the histology first (varst.pp.embed_histology).")
    row_all = np.zeros(hist.shape[0], dtype=bool)
    n_partial = 0
    for start in range(0, hist.shape[0], chunk_rows):
        block = hist[start : start + chunk_rows]
        if np.isinf(block).any():
            raise ValueError(f"adata.obsm[{key!r}] contains infinite values; fix or re-embed those spots.")
        nan = np.isnan(block)
        all_nan = nan.all(1)
        row_all[start : start + len(block)] = all_nan
        n_partial += int((nan.any(1) & ~all_nan).sum())
    if n_partial:
        raise ValueError(
            f"{n_partial} spots have partly-NaN histology in adata.obsm[{key!r}]. A spot without an image "
            "must have its whole row NaN (expression-only spot); otherwise re-embed those spots."
        )
    return ~row_all


def check_coords(xy: np.ndarray, key: str) -> np.ndarray:
    """Spatial coordinates: two finite columns."""
    if xy.shape[1] != 2:
        raise ValueError(f"adata.obsm[{key!r}] must have 2 columns (x, y); got {xy.shape[1]}.")
    if not np.all(np.isfinite(xy)):
        raise ValueError(f"adata.obsm[{key!r}] contains NaN or infinite coordinates.")
    return xy.astype(np.float64)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn with the location of the user's call: frames inside this package and torch's wrappers are skipped."""
    import torch

    skip = tuple(
        os.path.realpath(p) for p in (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(torch.__file__))
    )
    frame, level = sys._getframe(1), 2  # stacklevel 1 is this function, 2 its caller
    while frame is not None and os.path.realpath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
