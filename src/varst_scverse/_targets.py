"""Expression targets: the one place where counts become the log scale the model and the metrics use.

HEST's convention is ``log1p(counts)``; ``cp10k`` first scales every spot to 10,000 counts (depth-normalised).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import sparse

TargetKind = Literal["log1p", "cp10k"]
TARGET_KINDS: tuple[str, ...] = ("log1p", "cp10k")


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sparse.issparse(x) else x, dtype=np.float64)


def expression_target(
    counts, kind: TargetKind = "log1p", total_counts: np.ndarray | None = None, target_sum: float = 1e4
) -> np.ndarray:
    """Turn a counts matrix into the model's target scale.

    Parameters
    ----------
    counts
        Spots × genes counts, dense or sparse.
    kind
        ``"log1p"`` for ``log1p(counts)``; ``"cp10k"`` for ``log1p(counts / total * target_sum)``.
    total_counts
        Per-spot library size used by ``"cp10k"``; defaults to the row sums of ``counts``. Pass the totals over
        *all* genes when ``counts`` holds only the selected ones.
    target_sum
        Library size after normalisation for ``"cp10k"``.

    Returns
    -------
    float32 array of the same shape as ``counts``.
    """
    if kind not in TARGET_KINDS:
        raise ValueError(f"Unknown target kind {kind!r}; use one of {TARGET_KINDS}.")
    x = _dense(counts)
    if kind == "cp10k":
        tot = x.sum(axis=1) if total_counts is None else np.asarray(total_counts, dtype=np.float64).reshape(-1)
        if tot.shape[0] != x.shape[0]:
            raise ValueError(f"total_counts has {tot.shape[0]} entries but counts has {x.shape[0]} spots.")
        x = x / np.maximum(tot, 1.0)[:, None] * target_sum
    return np.log1p(x).astype(np.float32)
