"""Choose the genes to predict from the training spots only."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._constants import ADATA_KEYS
from ._resolve import resolve_adata

#: var column with each eligible gene's rank (0 = most variable; NaN = not eligible)
HVG_RANK = ADATA_KEYS.HVG_RANK
FLAVORS = ("seurat_v3", "variance")


def _train_positions(adata: AnnData, train_mask: Any) -> np.ndarray:
    """Integer positions of the training spots from a boolean mask or a list of obs names."""
    if train_mask is None:
        return np.arange(adata.n_obs)
    if isinstance(train_mask, pd.Series) and train_mask.dtype == bool:
        if not train_mask.index.equals(adata.obs_names):
            train_mask = train_mask.reindex(adata.obs_names)
            if train_mask.isna().any():
                raise ValueError("train_mask (a boolean Series) does not cover every obs name.")
        train_mask = train_mask.to_numpy(dtype=bool)
    arr = np.asarray(train_mask)
    if arr.dtype == bool:
        if arr.ndim != 1 or arr.shape[0] != adata.n_obs:
            raise ValueError(
                f"train_mask has {arr.shape[0] if arr.ndim else 0} entries but adata has {adata.n_obs} spots."
            )
        return np.flatnonzero(arr)
    if arr.ndim == 1 and arr.dtype.kind in "OUS":
        names = pd.Index(arr.astype(str))
        pos = adata.obs_names.get_indexer(names)
        if (pos < 0).any():
            missing = names[pos < 0][:5].tolist()
            raise KeyError(f"{int((pos < 0).sum())} name(s) of train_mask are not obs names, e.g. {missing}.")
        return np.unique(pos)
    raise TypeError("train_mask must be a boolean array over obs, a boolean Series, or a list of obs names.")


def select_genes(
    adata: AnnData | Any,
    n_top: int = 200,
    train_mask: Sequence[bool] | Sequence[str] | np.ndarray | pd.Series | None = None,
    layer: str | None = ADATA_KEYS.COUNTS_LAYER,
    min_frac: float = 0.1,
    flavor: Literal["seurat_v3", "variance"] = "seurat_v3",
    key_added: str = ADATA_KEYS.HIGHLY_VARIABLE,
    subset: bool = False,
    batch_key: str | None = None,
    table_key: str = "table",
) -> list[str]:
    """Select highly variable genes using the training spots only.

    Genes detected (count > 0) in fewer than ``min_frac`` of the training spots are excluded; the rest are ranked by
    variability over the training spots, and the top ``n_top`` are selected. Test spots never influence the choice.

    Parameters
    ----------
    adata
        AnnData or SpatialData (its table) with raw counts.
    n_top
        Number of genes to select.
    train_mask
        Training spots: a boolean array over obs (or a boolean Series indexed by obs names), or a list of obs names.
        Default: all spots.
    layer
        Layer with raw counts (``None`` for ``X``). Falls back to ``X`` when the default ``"counts"`` layer is absent.
    min_frac
        Minimum fraction of training spots in which a gene must be detected.
    flavor
        ``"seurat_v3"``: Seurat v3 variance-stabilising ranking on raw counts (normalised variance after a loess fit of
        variance on mean, via :func:`scanpy.pp.highly_variable_genes`; needs ``scikit-misc``);
        ``"variance"``: variance of ``log1p(counts)`` (the HEST-Benchmark choice).
    key_added
        Boolean var column marking the selected genes. The rank of every eligible gene goes to
        ``var["varst_hvg_rank"]`` (0 = most variable, NaN = excluded by ``min_frac``).
    subset
        Subset ``adata`` to the selected genes in place (original gene order kept).
    batch_key
        obs column (e.g. section) whose batches are each fitted separately by ``"seurat_v3"`` (normalised variances
        averaged over batches); ignored by ``"variance"``.
    table_key
        Table to use when ``adata`` is a SpatialData with several tables.

    Returns
    -------
    The selected gene names, most variable first.

    Raises
    ------
    ValueError
        When fewer than ``n_top`` genes pass ``min_frac``, ``train_mask`` has the wrong length, or no training spot is
        given.
    """
    adata = resolve_adata(adata, table_key=table_key)
    if flavor not in FLAVORS:
        raise ValueError(f"Unknown flavor {flavor!r}; use one of {FLAVORS}.")
    n_top = int(n_top)
    if n_top < 1:
        raise ValueError(f"n_top must be positive, got {n_top}.")
    if not 0.0 <= min_frac <= 1.0:
        raise ValueError(f"min_frac must lie in [0, 1], got {min_frac}.")
    if layer is not None and layer not in adata.layers:
        if layer == ADATA_KEYS.COUNTS_LAYER:
            layer = None
        else:
            raise KeyError(f"No layer {layer!r}; available: {list(adata.layers)} (or layer=None for X).")
    train = _train_positions(adata, train_mask)
    if train.size < 2:
        raise ValueError(f"Need at least 2 training spots, got {train.size}.")
    x = adata.layers[layer] if layer is not None else adata.X
    x = x[train]
    x = sparse.csr_matrix(x)
    if x.nnz and np.min(x.data) < 0:
        raise ValueError("Counts must be non-negative; pass the raw counts layer.")
    detected = np.asarray((x > 0).sum(axis=0)).ravel() / train.size
    eligible = np.flatnonzero(detected >= min_frac)
    if eligible.size < n_top:
        raise ValueError(
            f"Only {eligible.size} of {adata.n_vars} genes are detected in at least {min_frac:.0%} of the "
            f"{train.size} training spots, fewer than n_top={n_top}; lower min_frac or n_top."
        )
    xe = x[:, eligible]
    if flavor == "variance":
        logx = xe.astype(np.float64)
        logx.data = np.log1p(logx.data)
        mean = np.asarray(logx.mean(axis=0)).ravel()
        score = np.asarray(logx.multiply(logx).mean(axis=0)).ravel() - mean**2
    else:
        import scanpy as sc

        tmp = AnnData(X=xe.astype(np.float32))
        if batch_key is not None:
            tmp.obs[batch_key] = adata.obs[batch_key].to_numpy()[train]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                res = sc.pp.highly_variable_genes(
                    tmp, flavor="seurat_v3", n_top_genes=min(n_top, eligible.size), batch_key=batch_key, inplace=False
                )
            except ImportError as err:
                raise ImportError(
                    "flavor='seurat_v3' needs scikit-misc (pip install scikit-misc); or use flavor='variance'."
                ) from err
        score = res["variances_norm"].to_numpy(dtype=np.float64)
    score = np.nan_to_num(score, nan=-np.inf)
    order = np.argsort(-score, kind="stable")
    rank = np.full(adata.n_vars, np.nan)
    rank[eligible[order]] = np.arange(eligible.size, dtype=np.float64)
    chosen = eligible[order[:n_top]]
    selected = np.zeros(adata.n_vars, dtype=bool)
    selected[chosen] = True
    names = adata.var_names[chosen].tolist()
    adata.var[key_added] = selected
    adata.var[HVG_RANK] = rank
    if subset:
        adata._inplace_subset_var(selected)
    return names
