"""`make demo`: HER2ST end to end — train on patient C, predict the H&E-only section B4, compare with baselines.

The tokenizer (stage 1) learns from every section with expression except patient B; the transformer (stage 2) from
the imaged sections C2–C6; B4's counts are hidden from the model and only used to score the prediction.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
import warnings
from pathlib import Path

import numpy as np

_TRAIN_SECTIONS = ("C2", "C3", "C4", "C5", "C6")
_QUERY_SECTION = "B4"
_QUERY_PATIENT = "B"
_FIGURE_GENES = 4
TARGETS = ("log1p", "cp10k")


def _log(msg: str) -> None:
    print(f"[varst demo] {msg}", flush=True)


def run_demo(
    output: str | Path = "demo_output",
    data_dir: str | Path | None = None,
    n_genes: int = 200,
    stage1_epochs: int = 5,
    stage2_epochs: int = 12,
    tokenizer_sections: str = "all",
    seed: int = 0,
    quick: bool = False,
    workers: int | None = None,
) -> dict:
    """Run the demo and return the metrics written to ``output/metrics.json``.

    Parameters
    ----------
    output
        Folder for the predicted AnnData, metrics and figures (created; existing demo files are replaced).
    data_dir
        Folder holding ``her2st/`` (default: ``$VARST_DATA_DIR`` or ``../shared/data``).
    n_genes
        Highly variable genes chosen on the training sections.
    stage1_epochs, stage2_epochs
        Training epochs of the two stages.
    tokenizer_sections
        ``"all"``: stage 1 learns from every section except the query's patient; ``"train"``: only C2–C6.
    seed
        Seed of the model.
    quick
        A reduced run for tests: fewer genes, epochs and sections.
    workers
        Processes for the two models (log1p and CP10k targets): 2 trains them side by side, one thread each (default
        when the machine has at least 2 cores); 1 trains them one after the other with every thread.
    """
    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import varst_scverse as varst
    from varst_scverse._constants import ADATA_KEYS
    from varst_scverse._targets import expression_target

    t_start = time.time()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if quick:
        n_genes, stage1_epochs, stage2_epochs, tokenizer_sections = min(n_genes, 64), 3, 4, "train"
    sections = list(_TRAIN_SECTIONS) + [_QUERY_SECTION]
    _log("reading HER2ST …")
    adata = varst.datasets.her2st(sections=None if tokenizer_sections == "all" else sections, data_dir=data_dir)
    _log(f"{adata.n_obs} spots in {adata.obs[ADATA_KEYS.SECTION].nunique()} sections, {adata.n_vars} genes")

    # histology: the built-in morphology encoder on the imaged sections only
    t0 = time.time()
    imaged = adata[adata.obs[ADATA_KEYS.SECTION].isin(sections)].copy()
    varst.pp.embed_histology(imaged, show_progress=False)
    t_embed = time.time() - t0
    hist = np.full((adata.n_obs, imaged.obsm[ADATA_KEYS.HISTOLOGY].shape[1]), np.nan, dtype=np.float32)
    hist[adata.obs_names.get_indexer(imaged.obs_names)] = imaged.obsm[ADATA_KEYS.HISTOLOGY]
    adata.obsm[ADATA_KEYS.HISTOLOGY] = hist
    _log(f"embedded {imaged.n_obs} spots in {t_embed:.1f}s ({imaged.n_obs / t_embed:.0f} patches/s)")

    # genes from the training sections only; the query patient is held out of everything
    is_train = adata.obs[ADATA_KEYS.SECTION].isin(_TRAIN_SECTIONS).to_numpy()
    genes = varst.pp.select_genes(adata, n_top=n_genes, train_mask=is_train)
    total = np.asarray(adata.layers[ADATA_KEYS.COUNTS_LAYER].sum(1)).reshape(-1)
    is_query = (adata.obs[ADATA_KEYS.SECTION] == _QUERY_SECTION).to_numpy()
    query_full = adata[is_query].copy()
    adata.obs[ADATA_KEYS.TOTAL_COUNTS] = total  # library size over all genes, for the cp10k target
    train = adata[(adata.obs[ADATA_KEYS.PATIENT] != _QUERY_PATIENT).to_numpy(), genes].copy()
    truth_counts = query_full[:, genes].layers[ADATA_KEYS.COUNTS_LAYER]
    truth = {
        "log1p": expression_target(truth_counts, "log1p"),
        "cp10k": expression_target(truth_counts, "cp10k", total_counts=total[is_query]),
    }
    # the query the model sees: H&E features, coordinates and the image — no counts
    query = ad.AnnData(obs=query_full.obs.copy(), uns={"spatial": query_full.uns.get("spatial", {})})
    query.obsm[ADATA_KEYS.HISTOLOGY] = query_full.obsm[ADATA_KEYS.HISTOLOGY]
    query.obsm[ADATA_KEYS.SPATIAL] = query_full.obsm[ADATA_KEYS.SPATIAL]

    workers = min(2, _ncpu()) if workers is None else int(workers)
    fits = _fit_both(train, query, stage1_epochs, stage2_epochs, seed, workers)
    model, pred, prefixes, samples = (fits["log1p"][k] for k in ("model", "pred", "prefixes", "samples"))

    # baselines on the same features, genes and split
    train_c = adata[is_train].copy()
    metrics: dict = {"varst": {}, "varst_transformer": {}, "ridge_cv": {}, "ridge": {}, "depth_oracle": {}}
    per_gene = {}
    for kind in TARGETS:
        fit = fits[kind]
        ev = varst.tl.evaluate(truth[kind], fit["pred"], samples=fit["samples"], gene_names=genes)
        metrics["varst"][kind] = _summary(ev)
        metrics["varst"][kind]["prefix_mean_pearson"] = [
            float(varst.tl.evaluate(truth[kind], p)["mean_pearson"]) for p in fit["prefixes"]
        ]
        per_gene[("varst", kind)] = ev["per_gene_pearson"]
        # the transformer alone, without the ridge probe the cpu preset blends in
        metrics["varst_transformer"][kind] = _summary(varst.tl.evaluate(truth[kind], fit["alone"], gene_names=genes))
        for name in ("ridge_cv", "ridge", "depth_oracle"):
            p = varst.tl.baseline_predict(name, train_c, query_full, genes=genes, target=kind)
            ev = varst.tl.evaluate(truth[kind], p, gene_names=genes)
            metrics[name][kind] = _summary(ev)
            per_gene[(name, kind)] = ev["per_gene_pearson"]

    # outputs
    pred_adata = ad.AnnData(
        X=pred.astype(np.float32),
        obs=query.obs.copy(),
        var=train.var.loc[genes].copy() if set(genes) <= set(train.var_names) else None,
        obsm={k: query.obsm[k] for k in (ADATA_KEYS.HISTOLOGY, ADATA_KEYS.SPATIAL)},
        uns={"spatial": query.uns.get("spatial", {})},
    )
    pred_adata.var_names = list(model.gene_names_)
    pred_adata.layers[ADATA_KEYS.COUNTS_LAYER] = truth_counts
    pred_adata.layers[ADATA_KEYS.PREDICTED] = pred.astype(np.float32)
    pred_adata.layers[ADATA_KEYS.UNCERTAINTY] = samples.std(0).astype(np.float32)
    pred_adata.obsm[ADATA_KEYS.TOKENS] = query.obsm[ADATA_KEYS.TOKENS]
    pred_adata.var["varst_pearson"] = per_gene[("varst", "log1p")]
    pred_adata.var["ridge_cv_pearson"] = per_gene[("ridge_cv", "log1p")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred_adata.write_h5ad(out / f"{_QUERY_SECTION}_predicted.h5ad")
    r = np.nan_to_num(per_gene[("varst", "log1p")], nan=-1)
    best = [model.gene_names_[i] for i in np.argsort(-r)[:_FIGURE_GENES]]
    varst.pl.spatial_prediction(pred_adata, best, library_id=_QUERY_SECTION, save=out / "B4_observed_predicted.png")
    varst.pl.gene_pearson(
        per_gene[("varst", "log1p")],
        per_gene[("ridge_cv", "log1p")],
        labels=("VARST", "ridge (CV alpha)"),
        save=out / "gene_pearson.png",
    )
    varst.pl.training_history(model, save=out / "training_history.png")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    metrics["run"] = {
        "query_section": _QUERY_SECTION,
        "train_sections": list(_TRAIN_SECTIONS),
        "tokenizer_spots": int(train.n_obs),
        "stage2_spots": int(np.isfinite(train.obsm[ADATA_KEYS.HISTOLOGY][:, 0]).sum()),
        "n_genes": len(genes),
        "query_spots": int(query.n_obs),
        "stage1_epochs": stage1_epochs,
        "stage2_epochs": stage2_epochs,
        "seconds": {
            "embed": round(t_embed, 1),
            **{f"{k}_{kind}": round(v, 1) for kind, f in fits.items() for k, v in f["seconds"].items()},
            "total": round(time.time() - t_start, 1),
        },
        "peak_rss_gb": round(peak_gb, 2),
        "machine": f"{platform.machine()}, {_ncpu()} CPU cores",
        "quick": quick,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    model.save(out / "model", overwrite=True)
    _print_table(metrics)
    _log(
        f"wrote {out / f'{_QUERY_SECTION}_predicted.h5ad'}, {out / 'metrics.json'}, figures "
        f"{', '.join(str(p) for p in sorted(out.glob('*.png')))} and the model in {out / 'model'}"
    )
    _log(f"total {metrics['run']['seconds']['total']:.0f}s, peak RSS {peak_gb:.1f} GB")
    return metrics


def _fit_both(train, query, stage1_epochs: int, stage2_epochs: int, seed: int, workers: int) -> dict:
    """The log1p model here and, with ``workers > 1``, the CP10k model at the same time in a spawned process.

    Small models use one core well and two contended threads badly, so two processes of one thread each finish both
    models in about the time of one.
    """
    if workers <= 1:
        return {kind: _fit_and_predict(train, query, kind, stage1_epochs, stage2_epochs, seed) for kind in TARGETS}
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
            other = pool.submit(_fit_and_predict_worker, train, query, "cp10k", stage1_epochs, stage2_epochs, seed)
            fits = {"log1p": _fit_and_predict(train, query, "log1p", stage1_epochs, stage2_epochs, seed)}
            fits["cp10k"] = other.result()
    finally:
        torch.set_num_threads(threads)
    return fits


def _fit_and_predict_worker(train, query, target: str, stage1_epochs: int, stage2_epochs: int, seed: int) -> dict:
    """:func:`_fit_and_predict` in a worker process with one thread; returns everything but the model."""
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    fit = _fit_and_predict(train, query, target, stage1_epochs, stage2_epochs, seed)
    fit.pop("model")
    return fit


def _fit_and_predict(train, query, target: str, stage1_epochs: int, stage2_epochs: int, seed: int) -> dict:
    """Train both stages of a cpu-preset VARST on ``target`` and predict the query (point, prefixes, samples)."""
    import varst_scverse as varst
    from varst_scverse._constants import ADATA_KEYS

    train = train.copy()
    varst.VARST.setup_anndata(train, layer=ADATA_KEYS.COUNTS_LAYER, batch_key=ADATA_KEYS.SECTION)
    model = varst.VARST(train, preset="cpu", target=target, seed=seed)
    _log(f"[{target}] {model}")
    t0 = time.time()
    model.train(stage=1, max_epochs=stage1_epochs, lr=2e-3, enable_progress_bar=False)
    t1 = time.time()
    model.train(stage=2, max_epochs=stage2_epochs, lr=1e-3, enable_progress_bar=False)
    t2 = time.time()
    q = query.copy()
    pred, prefixes = model.predict_expression(q, n_samples=8, return_prefixes=True)
    samples = model.predict_samples(q, n_samples=16)
    alone = model.predict_expression(q, n_samples=0, ridge_blend=0.0, add_to_adata=False)
    t3 = time.time()
    _log(f"[{target}] stage 1 {t1 - t0:.0f}s ({train.n_obs} spots), stage 2 {t2 - t1:.0f}s, predict {t3 - t2:.1f}s")
    if target == "log1p":
        query.obsm[ADATA_KEYS.TOKENS] = q.obsm[ADATA_KEYS.TOKENS]
    return {
        "model": model,
        "pred": pred,
        "prefixes": prefixes,
        "samples": samples,
        "alone": alone,
        "seconds": {"stage1": t1 - t0, "stage2": t2 - t1, "predict": t3 - t2},
    }


def _summary(ev: dict) -> dict:
    keys = (
        "mean_pearson",
        "median_pearson",
        "frac_genes_r_gt_0.3",
        "n_genes_evaluated",
        "mse",
        "mae",
        "pcc_10",
        "pcc_50",
        "coverage_90",
        "interval_width",
    )
    return {k: float(ev[k]) for k in keys if k in ev}


def _print_table(metrics: dict) -> None:
    _log("B4 mean per-gene Pearson (held-out section, counts never seen by the model):")
    for name in ("varst", "varst_transformer", "ridge_cv", "ridge", "depth_oracle"):
        row = metrics.get(name, {})
        cells = "  ".join(
            f"{k}={row[k]['mean_pearson']:.3f}" if "mean_pearson" in row.get(k, {}) else f"{k}=  -  "
            for k in ("log1p", "cp10k")
        )
        _log(f"  {name:<20} {cells}")


def _ncpu() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    """Command-line entry of the demo (``python -m varst_scverse._demo`` / ``varst demo``)."""
    p = argparse.ArgumentParser(prog="varst demo", description=__doc__)
    p.add_argument("--output", default="demo_output")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--n_genes", type=int, default=200)
    p.add_argument("--stage1_epochs", type=int, default=5)
    p.add_argument("--stage2_epochs", type=int, default=12)
    p.add_argument("--tokenizer_sections", choices=("all", "train"), default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="reduced size, for tests")
    p.add_argument(
        "--workers", type=int, default=None, help="2: train the two target models side by side (default on 2+ cores)"
    )
    args = p.parse_args(argv)
    run_demo(**vars(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
