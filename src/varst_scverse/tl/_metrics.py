"""Evaluation metrics for predicted spatial expression (HEST convention plus uncertainty coverage).

All inputs are on the log scale of the target (see :func:`varst_scverse._targets.expression_target`); the
metrics never transform them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse

#: Relative tolerance under which a column's standard deviation counts as zero (the column is "constant").
_CONSTANT_RTOL = 1e-12

PCC_NOTE = (
    "pcc_k is the mean of the k highest per-gene Pearson r, the k genes being picked on the test spots "
    "themselves (Stem/GenAR style). It is optimistic and not comparable to mean_pearson (HEST convention: the "
    "mean over all evaluated genes)."
)


def _as_2d_float(x, name: str) -> np.ndarray:
    """Return ``x`` as a dense float64 2-D array or raise a clear ``ValueError``."""
    if sparse.issparse(x):
        x = x.toarray()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n_spots, n_genes]; got shape {x.shape}.")
    if not np.all(np.isfinite(x)):
        n_bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise ValueError(f"{name} contains {n_bad} NaN or infinite values; metrics need finite values.")
    return x


def _constant_columns(x: np.ndarray) -> np.ndarray:
    """Boolean mask of the columns of ``x`` whose values do not vary (up to floating-point rounding)."""
    sd = x.std(axis=0)
    scale = np.abs(x).max(axis=0)
    return sd <= _CONSTANT_RTOL * scale


def _pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r between matching columns of two float64 arrays (no checks, no constant handling)."""
    ac = a - a.mean(axis=0)
    bc = b - b.mean(axis=0)
    num = np.einsum("ij,ij->j", ac, bc)
    den = np.sqrt(np.einsum("ij,ij->j", ac, ac) * np.einsum("ij,ij->j", bc, bc))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    return np.clip(r, -1.0, 1.0)


def pearson_per_gene(truth, pred) -> np.ndarray:
    """Pearson correlation per gene across spots, vectorised over genes.

    Parameters
    ----------
    truth
        Observed expression, ``[n_spots, n_genes]``.
    pred
        Predicted expression, same shape.

    Returns
    -------
    float64 array ``[n_genes]``; NaN for genes that are constant in ``truth`` or in ``pred`` (Pearson r is
    undefined there).
    """
    t = _as_2d_float(truth, "truth")
    p = _as_2d_float(pred, "pred")
    if t.shape != p.shape:
        raise ValueError(f"truth has shape {t.shape} but pred has shape {p.shape}; they must match.")
    if t.shape[0] < 2:
        raise ValueError(f"Pearson r needs at least 2 spots; got {t.shape[0]}.")
    r = _pearson_columns(t, p)
    r[_constant_columns(t) | _constant_columns(p)] = np.nan
    return r


def interval_coverage(truth, samples, interval: float = 0.9) -> tuple[float, float]:
    """Coverage and mean width of the central predictive interval estimated from samples.

    Parameters
    ----------
    truth
        Observed expression, ``[n_spots, n_genes]``.
    samples
        Predictive draws, ``[n_samples, n_spots, n_genes]`` (at least 2 draws).
    interval
        Central probability mass of the interval, in ``(0, 1)``; 0.9 gives the 5%–95% quantiles.

    Returns
    -------
    ``(coverage, width)``: the fraction of truth values inside ``[q_lo, q_hi]`` of the samples (per spot and
    gene) and the mean of ``q_hi - q_lo``. The quantiles sit at the plotting positions ``p (n + 1)`` of the ``n``
    sorted draws (numpy's ``"weibull"`` method), where a perfectly calibrated model covers ``interval`` on average
    whatever ``n``; numpy's default interpolation pulls them inwards (a calibrated model would score 0.81 with 16
    draws for a 90% interval). With fewer than ``1 / (1 - interval) - 1`` draws (19 for 90%) the interval is the
    draws' range, which covers ``(n - 1) / (n + 1)`` on average.
    """
    t = _as_2d_float(truth, "truth")
    if not 0.0 < float(interval) < 1.0:
        raise ValueError(f"interval must lie strictly between 0 and 1; got {interval}.")
    s = np.asarray(samples, dtype=np.float64)
    if s.ndim != 3 or s.shape[1:] != t.shape:
        raise ValueError(
            f"samples must have shape [n_samples, {t.shape[0]}, {t.shape[1]}] to match truth; got {s.shape}."
        )
    if s.shape[0] < 2:
        raise ValueError(f"samples needs at least 2 draws to form an interval; got {s.shape[0]}.")
    if not np.all(np.isfinite(s)):
        raise ValueError("samples contains NaN or infinite values.")
    a = (1.0 - float(interval)) / 2.0
    lo, hi = np.quantile(s, [a, 1.0 - a], axis=0, method="weibull")
    inside = (t >= lo) & (t <= hi)
    return float(inside.mean()), float((hi - lo).mean())


def evaluate(
    truth,
    pred,
    samples=None,
    gene_names: Sequence[str] | None = None,
    interval: float = 0.9,
    pcc_k: Sequence[int] = (10, 50),
    constant_pred: Literal["exclude", "zero"] = "exclude",
) -> dict[str, Any]:
    """Score predicted expression against observed expression on held-out spots.

    Per-gene Pearson r is computed across the spots, then summarised over genes (HEST-Benchmark convention:
    the mean over genes). Genes constant over the spots in ``truth`` (r undefined) or in ``pred`` are left out
    of the Pearson summaries and counted in ``n_genes_constant``.

    Parameters
    ----------
    truth
        Observed expression on the target's log scale, ``[n_spots, n_genes]`` (dense or sparse).
    pred
        Predicted expression on the same scale and shape.
    samples
        Optional predictive draws ``[n_samples, n_spots, n_genes]``; adds interval coverage and width.
    gene_names
        Optional gene names, length ``n_genes``; used as the index of ``per_gene``.
    interval
        Central probability mass of the predictive interval for the coverage (default 90%).
    pcc_k
        The ``k`` of the Stem/GenAR-style ``pcc_k`` summaries (mean of the ``k`` best genes; optimistic).
    constant_pred
        What to do with genes that vary in ``truth`` but are constant in ``pred``: ``"exclude"`` (default) leaves
        them out like truth-constant genes; ``"zero"`` scores them r = 0, so a method cannot gain by abstaining.

    Returns
    -------
    dict with

    ``mean_pearson``, ``median_pearson``
        Mean / median per-gene r over the evaluated genes (NaN if there are none).
    ``frac_genes_r_gt_0.3``
        Fraction of evaluated genes with r > 0.3.
    ``n_genes_evaluated``, ``n_genes_constant``
        Genes in the Pearson summaries, and genes left out; ``n_genes_constant_truth`` and
        ``n_genes_constant_pred`` split the latter (a gene constant in both counts in both).
    ``mse``, ``mae``
        Mean squared / absolute error over all spots and genes.
    ``pcc_10``, ``pcc_50`` (one per ``pcc_k``)
        Mean of the ``k`` highest per-gene r among the evaluated genes (all of them when fewer than ``k``).
        **Optimistic**: the genes are picked on the test data; see ``pcc_note``.
    ``pcc_note``
        A sentence saying so.
    ``per_gene_pearson``
        float64 array ``[n_genes]``, NaN for constant genes.
    ``per_gene``
        :class:`pandas.DataFrame` indexed by ``gene_names`` (or 0..G-1) with columns ``pearson``, ``mse``,
        ``mae``, ``constant_truth``, ``constant_pred``.
    ``coverage_90``, ``interval_width`` (only with ``samples``)
        Fraction of truth values within the central ``interval`` of the samples (the key is named after the
        interval in percent: ``coverage_80`` for ``interval=0.8``), and the mean interval width.
    ``n_spots``, ``n_genes``
        Shape of the evaluated data.

    Raises
    ------
    ValueError
        On shape mismatches, non-finite values, fewer than 2 spots, a bad ``interval`` or ``pcc_k``.
    """
    t = _as_2d_float(truth, "truth")
    p = _as_2d_float(pred, "pred")
    if t.shape != p.shape:
        raise ValueError(f"truth has shape {t.shape} but pred has shape {p.shape}; they must match.")
    n_spots, n_genes = t.shape
    if n_spots < 2:
        raise ValueError(f"Pearson r needs at least 2 spots; got {n_spots}.")
    if n_genes < 1:
        raise ValueError("truth has no genes.")
    if gene_names is not None:
        gene_names = pd.Index(np.asarray(gene_names).astype(str))
        if len(gene_names) != n_genes:
            raise ValueError(f"gene_names has {len(gene_names)} entries but the data have {n_genes} genes.")
    if constant_pred not in ("exclude", "zero"):
        raise ValueError(f"constant_pred must be 'exclude' or 'zero'; got {constant_pred!r}.")
    ks = [int(k) for k in pcc_k]
    if any(k < 1 for k in ks):
        raise ValueError(f"pcc_k must contain positive integers; got {tuple(pcc_k)}.")

    const_t = _constant_columns(t)
    const_p = _constant_columns(p)
    r = _pearson_columns(t, p)
    r[const_t | const_p] = np.nan
    if constant_pred == "zero":
        scored = r.copy()
        scored[const_p & ~const_t] = 0.0
    else:
        scored = r
    valid = scored[np.isfinite(scored)]
    n_eval = int(valid.size)
    if n_eval == 0:
        warnings.warn("No gene varies in both truth and pred; Pearson summaries are NaN.", RuntimeWarning, stacklevel=2)

    err = p - t
    out: dict[str, Any] = {
        "mean_pearson": float(valid.mean()) if n_eval else float("nan"),
        "median_pearson": float(np.median(valid)) if n_eval else float("nan"),
        "frac_genes_r_gt_0.3": float((valid > 0.3).mean()) if n_eval else float("nan"),
        "n_genes_evaluated": n_eval,
        "n_genes_constant": int(n_genes - n_eval),
        "n_genes_constant_truth": int(const_t.sum()),
        "n_genes_constant_pred": int(const_p.sum()),
        "mse": float(np.mean(err**2)),
        "mae": float(np.mean(np.abs(err))),
    }
    top = np.sort(valid)[::-1]
    for k in ks:
        out[f"pcc_{k}"] = float(top[:k].mean()) if n_eval else float("nan")
    out["pcc_note"] = PCC_NOTE
    out["per_gene_pearson"] = r
    out["per_gene"] = pd.DataFrame(
        {
            "pearson": r,
            "mse": np.mean(err**2, axis=0),
            "mae": np.mean(np.abs(err), axis=0),
            "constant_truth": const_t,
            "constant_pred": const_p,
        },
        index=gene_names if gene_names is not None else pd.RangeIndex(n_genes),
    )
    if samples is not None:
        cov, width = interval_coverage(t, samples, interval=interval)
        out[f"coverage_{round(100 * float(interval))}"] = cov
        out["interval_width"] = width
    out["n_spots"] = int(n_spots)
    out["n_genes"] = int(n_genes)
    return out
