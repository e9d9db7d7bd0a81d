"""Peak memory and speed of `predict_expression` on many synthetic spots (streamed in batches).

Usage: python benchmarks/predict_memory.py [--n_spots 200000] [--histology_dim 1024] [--n_samples 1]
Trains a cpu-preset model on 2,000 synthetic spots for one epoch per stage in a child process and saves it (speed and
memory do not depend on training); this process then loads it, as a user predicting a new atlas would, predicts a
query of --n_spots spots and reports its peak RSS (ru_maxrss: the query itself, ``n_spots x histology_dim`` float32,
included) and spots/s, with the KV cache and (on at most 20,000 spots) without it.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings

import anndata as ad
import numpy as np
import torch

import varst_scverse as varst

warnings.filterwarnings("ignore")


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _train_and_save(path: str, histology_dim: int) -> None:
    train = varst.datasets.synthetic(n_spots=2000, n_genes=200, n_sections=2, histology_dim=histology_dim)
    varst.VARST.setup_anndata(train, layer="counts", batch_key="section")
    model = varst.VARST(train, preset="cpu")
    model.train(stage=1, max_epochs=1, enable_progress_bar=False)
    model.train(stage=2, max_epochs=1, enable_progress_bar=False)
    model.save(path, overwrite=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n_spots", type=int, default=200_000)
    p.add_argument("--histology_dim", type=int, default=1024)
    p.add_argument("--n_samples", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=1024)
    p.add_argument("--out", default=None)
    p.add_argument("--train_to", default=None, help=argparse.SUPPRESS)  # child process: train, save, exit
    args = p.parse_args()
    if args.train_to:
        _train_and_save(args.train_to, args.histology_dim)
        return
    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(args.n_spots)))
    xy = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[: args.n_spots] * 100.0
    query = ad.AnnData(obs={"section": ["Q"] * args.n_spots})
    query.obs_names = [f"q{i}" for i in range(args.n_spots)]
    hist = np.empty((args.n_spots, args.histology_dim), dtype=np.float32)  # filled in blocks: no float64 copy
    for start in range(0, args.n_spots, 10_000):
        block = hist[start : start + 10_000]
        block[:] = rng.standard_normal(block.shape, dtype=np.float32)
    query.obsm["X_histology"] = hist
    query.obsm["spatial"] = xy
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--train_to", tmp, "--histology_dim", str(args.histology_dim)]
        subprocess.run(cmd, check=True)
        model = varst.VARST.load(tmp, adata=query)
    rss_before = _rss_gb()
    res = {}
    for cache in (True, False):
        n = args.n_spots if cache else min(args.n_spots, 20_000)
        q = query if cache else query[:n].copy()
        t = time.perf_counter()
        model.predict_expression(q, n_samples=args.n_samples, batch_size=args.batch_size, use_cache=cache)
        res["kv_cache" if cache else "recompute"] = round(n / (time.perf_counter() - t), 1)
    out = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "command": "python benchmarks/predict_memory.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None and k != "train_to"),
        "n_spots": args.n_spots,
        "histology_dim": args.histology_dim,
        "n_samples": args.n_samples,
        "rss_gb_before_predict": round(rss_before, 2),
        "peak_rss_gb": round(_rss_gb(), 2),
        "spots_per_s": res,
    }
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
