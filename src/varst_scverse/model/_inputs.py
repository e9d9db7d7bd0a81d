"""Per-spot model inputs from an AnnData: target expression, histology, per-section coordinates, neighbour context.

One place turns registered AnnData fields into the arrays the torch module reads, for training and for queries.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform


def normalise_coords(xy: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Centre each section on its mean and scale it by its largest absolute offset, into about ``[-1, 1]``."""
    out = np.zeros_like(xy, dtype=np.float32)
    groups = np.zeros(len(xy), dtype=int) if groups is None else np.asarray(groups)
    for g in np.unique(groups):
        m = groups == g
        c = xy[m] - xy[m].mean(0)
        scale = np.abs(c).max()
        out[m] = c / (scale if scale > 0 else 1.0)
    return out


def neighbour_index(xy: np.ndarray, groups: np.ndarray | None, k: int) -> np.ndarray:
    """Indices ``[n, k]`` of each spot's k nearest spots in the same section (itself when the section is small)."""
    from sklearn.neighbors import NearestNeighbors

    n = len(xy)
    idx = np.repeat(np.arange(n)[:, None], k, axis=1)
    groups = np.zeros(n, dtype=int) if groups is None else np.asarray(groups)
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        kk = min(k + 1, len(rows))
        if kk < 2:
            continue
        _, nb = NearestNeighbors(n_neighbors=kk).fit(xy[rows]).kneighbors(xy[rows])
        nb = rows[nb[:, 1:]]
        idx[rows, : nb.shape[1]] = nb
        if nb.shape[1] < k:  # pad by repeating the nearest
            idx[rows, nb.shape[1] :] = nb[:, :1]
    return idx


def neighbour_mean(hist: np.ndarray, nb_idx: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
    """Mean histology of the neighbours of ``rows``; neighbours without histology are skipped (own row if none)."""
    own = hist[rows]
    nb = hist[nb_idx[rows]]  # [b, k, H]
    valid = ~np.isnan(nb[..., 0])
    cnt = valid.sum(1, keepdims=True)
    total = np.where(valid[..., None], nb, 0.0).sum(1)
    return np.where(cnt > 0, total / np.maximum(cnt, 1), own).astype(np.float32)


def cluster_gene_order(y: np.ndarray) -> np.ndarray:
    """Order genes by average-linkage clustering of their correlation so that neighbours are co-expressed."""
    g = y.shape[1]
    if g < 3 or y.shape[0] < 2:  # nothing to cluster, or no correlation from a single spot: keep the given order
        return np.arange(g)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(y, rowvar=False)
    corr = np.nan_to_num(corr, nan=0.0)
    np.fill_diagonal(corr, 1.0)
    dist = np.clip(1.0 - corr, 0.0, 2.0)
    dist = (dist + dist.T) / 2
    np.fill_diagonal(dist, 0.0)
    cond = squareform(dist, checks=False)
    link = hierarchy.linkage(cond, method="average")
    link = hierarchy.optimal_leaf_ordering(link, cond)
    return hierarchy.leaves_list(link).astype(np.int64)


def dense_rows(x, rows) -> np.ndarray:
    """Rows of a dense or sparse matrix as a float32 dense array."""
    sub = x[rows]
    return np.asarray(sub.toarray() if sparse.issparse(sub) else sub, dtype=np.float32)
