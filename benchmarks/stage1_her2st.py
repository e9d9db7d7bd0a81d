"""Stage-1 tokenizer quality on HER2ST: train on patients A–F, reconstruct patients G–H; beside PCA.

Usage: python benchmarks/stage1_her2st.py [--epochs 8] [--vocab_size 4096] [--out benchmarks/results/stage1.json]
Also measures stage-1 training throughput (spots/s) of both presets on this machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import numpy as np
import torch

import varst_scverse as varst
from varst_scverse._constants import ADATA_KEYS
from varst_scverse._targets import expression_target
from varst_scverse.module import TwoStageVARST

warnings.filterwarnings("ignore")


def _pca_recon(train: np.ndarray, test: np.ndarray, k: int) -> np.ndarray:
    mu = train.mean(0)
    _, _, vt = np.linalg.svd(train - mu, full_matrices=False)
    v = vt[:k].T
    return (test - mu) @ v @ v.T + mu


def _throughput(preset: str, n_genes: int, steps: int = 4, batch: int = 256) -> float:
    torch.manual_seed(0)
    m = TwoStageVARST(n_genes, preset=preset, histology_dim=156)
    y = torch.log1p(torch.poisson(torch.rand(batch, n_genes) * 3))
    opt = torch.optim.AdamW(m.vqvae.parameters(), 1e-3)
    for i in range(steps + 1):
        if i == 1:
            t = time.perf_counter()
        out = m.stage1_loss(y)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--embed_dim", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results/stage1_her2st.json")
    args = p.parse_args()
    t0 = time.time()
    adata = varst.datasets.her2st()
    train_mask = adata.obs[ADATA_KEYS.PATIENT].isin(list("ABCDEF")).to_numpy()
    genes = varst.pp.select_genes(adata, n_top=200, train_mask=train_mask)
    train = adata[train_mask, genes].copy()
    test = adata[~train_mask, genes].copy()
    for a in (train, test):
        a.obsm[ADATA_KEYS.HISTOLOGY] = np.full((a.n_obs, 1), np.nan, dtype=np.float32)  # expression-only spots
    varst.VARST.setup_anndata(train, layer=ADATA_KEYS.COUNTS_LAYER, batch_key=ADATA_KEYS.SECTION)
    vq = {"vocab_size": args.vocab_size, "embed_dim": args.embed_dim}
    model = varst.VARST(train, preset="cpu", vqvae_config=vq)
    t = time.time()
    hist = model.train(stage=1, max_epochs=args.epochs, lr=2e-3, enable_progress_bar=False)
    t_train = time.time() - t
    y_tr = expression_target(train.layers[ADATA_KEYS.COUNTS_LAYER])
    y_te = expression_target(test.layers[ADATA_KEYS.COUNTS_LAYER])
    rec = model.reconstruct(test)
    usage = model.codebook_usage(test)
    pr = usage[usage > 0] / usage.sum()
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "command": "python benchmarks/stage1_her2st.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "train": "patients A-F",
        "test": "patients G-H",
        "train_spots": int(train.n_obs),
        "test_spots": int(test.n_obs),
        "n_genes": len(genes),
        "vqvae_config": {**model.module.vqvae_config, "scales": list(model.module.scales)},
        "epochs": args.epochs,
        "train_seconds": round(t_train, 1),
        "train_spots_per_s": round(args.epochs * 0.9 * train.n_obs / t_train, 1),
        "varst_mean_pearson": varst.tl.evaluate(y_te, rec)["mean_pearson"],
        "prefix_mean_pearson": [
            varst.tl.evaluate(y_te, model.reconstruct(test, n_scales=k))["mean_pearson"]
            for k in range(1, len(model.module.scales))
        ],
        "codebook_utilisation_test": float((usage > 0).mean()),
        "codebook_perplexity_test": float(np.exp(-(pr * np.log(pr)).sum())),
        "codebook_utilisation_last_epoch": float(hist["codebook_utilisation"].iloc[-1]),
        "pca32_mean_pearson": varst.tl.evaluate(y_te, _pca_recon(y_tr, y_te, 32))["mean_pearson"],
        "pca64_mean_pearson": varst.tl.evaluate(y_te, _pca_recon(y_tr, y_te, 64))["mean_pearson"],
        "stage1_spots_per_s_synthetic": {pr_: round(_throughput(pr_, 200), 1) for pr_ in ("cpu", "seed")},
        "wall_seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
