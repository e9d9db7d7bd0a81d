"""Speed of VARST on this machine: training and prediction throughput, FLOP/s against a measured matmul rate."""

from __future__ import annotations

import os
import resource
import time
from typing import Any

import numpy as np


def matmul_gflops(n: int = 1024, iters: int = 10, threads: int | None = None) -> float:
    """Best measured fp32 ``n×n @ n×n`` rate in GFLOP/s with ``torch.matmul`` (on ``threads`` threads)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g)
        b = torch.randn(n, n, generator=g)
        torch.matmul(a, b)
        best = 0.0
        for _ in range(iters):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
        return best
    finally:
        torch.set_num_threads(before)


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (GB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _stage_batch(model, stage: int, batch_size: int, seed: int = 0) -> dict[str, Any]:
    import torch

    adata = model.adata
    rng = np.random.default_rng(seed)
    if stage == 1:
        rows = rng.choice(adata.n_obs, size=min(batch_size, adata.n_obs), replace=False)
        return {"expression": torch.as_tensor(model._target(adata, np.sort(rows)), dtype=torch.float32)}
    sp = model._spatial_inputs(adata)
    has = np.flatnonzero(sp["has_histology"])
    rows = np.sort(rng.choice(has, size=min(batch_size, has.size), replace=False))
    b = model._batch_tensors(sp, rows)
    y = torch.as_tensor(model._target(adata, rows), dtype=torch.float32)
    with torch.no_grad():
        tokens = model.module.tokenize(y)
    return {"expression": y, "tokens": tokens, **b}


def _loss(module, stage: int, b: dict[str, Any]):
    if stage == 1:
        return module.stage1_loss(b["expression"])["loss"]
    return module.stage2_loss(b["expression"], b["histology"], b["coords"], b.get("neighbours"), b["tokens"])["loss"]


def module_training_rate(model, stage: int, batch_size: int, steps: int = 10) -> dict[str, float]:
    """FLOPs per spot (forward + backward, ``FlopCounterMode``) and spots/s of loss + backward + AdamW on one batch.

    Runs on a deep copy of the module, so the trained model is untouched.
    """
    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    module = copy.deepcopy(model.module)
    module.set_training_stage(stage, _allow_untrained=True)
    module.train()
    b = _stage_batch(model, stage, batch_size)
    n = b["expression"].shape[0]
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    counter = FlopCounterMode(display=False)
    with counter:
        _loss(module, stage, b).backward()
    opt.zero_grad(set_to_none=True)
    flops = counter.get_total_flops() / n
    t0 = time.perf_counter()
    for _ in range(steps):
        _loss(module, stage, b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    secs = time.perf_counter() - t0
    return {"flops_per_spot": float(flops), "module_spots_per_s": steps * n / secs}


def generation_flops_per_spot(model, query, use_cache: bool = True, batch: int = 64) -> float:
    """FLOPs per spot of one expected-value generation (all generated scales plus the decode)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sp = model._spatial_inputs(query)
    rows = np.arange(min(batch, query.n_obs))
    b = model._batch_tensors(sp, rows)
    model.module.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model.module.generate(b["histology"], b["coords"], b.get("neighbours"), decode="expected", use_cache=use_cache)
    return counter.get_total_flops() / len(rows)


def predict_rate(model, query, use_cache: bool, n_samples: int = 0, repeats: int = 3) -> float:
    """Spots/s of ``predict_expression`` (expected value; plus ``n_samples`` draws when > 0), best of ``repeats``."""
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.predict_expression(query, n_samples=n_samples, use_cache=use_cache, add_to_adata=False)
        best = max(best, query.n_obs / (time.perf_counter() - t0))
    return best


def ridge_times(adata, fold, genes: list[str], target: str, feature_key: str) -> dict[str, float]:
    """Fit and predict seconds of the HEST ridge probe and of the CV-alpha ridge on one fold."""
    from .._constants import ADATA_KEYS
    from .._targets import expression_target
    from ..tl import RidgeCV, RidgeProbe
    from ._data import section_mask

    tr = section_mask(adata, fold.train)
    te = section_mask(adata, [fold.test])
    col = adata.var_names.get_indexer(genes)
    X = np.asarray(adata.obsm[feature_key][tr], dtype=np.float64)
    Xq = np.asarray(adata.obsm[feature_key][te], dtype=np.float64)
    total = adata.obs[ADATA_KEYS.TOTAL_COUNTS].to_numpy()[tr]
    Y = expression_target(adata.layers[ADATA_KEYS.COUNTS_LAYER][tr][:, col], target, total_counts=total)
    groups = adata.obs[ADATA_KEYS.SECTION].astype(str).to_numpy()[tr]
    out = {}
    for name, est in (("ridge", RidgeProbe()), ("ridge_cv", RidgeCV())):
        t0 = time.perf_counter()
        est.fit(X, Y, groups=groups)
        t1 = time.perf_counter()
        est.predict(Xq)
        t2 = time.perf_counter()
        out[f"{name}_fit_s"] = t1 - t0
        out[f"{name}_predict_s"] = t2 - t1
        out[f"{name}_train_spots"] = int(X.shape[0])
        out[f"{name}_query_spots"] = int(Xq.shape[0])
    return out


def load_average() -> list[float]:
    """1/5/15-minute load averages (the machine is shared; they qualify every timing)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []
