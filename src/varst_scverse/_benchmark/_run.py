"""The benchmark loop: folds × gene sets × targets, baselines and VARST on the same features, ablations, speed."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _data as D
from . import _methods as M
from . import _speed as S

#: metrics copied from ``tl.evaluate`` into the results
SUMMARY_KEYS: tuple[str, ...] = (
    "mean_pearson",
    "median_pearson",
    "frac_genes_r_gt_0.3",
    "mse",
    "mae",
    "pcc_10",
    "pcc_50",
    "n_genes_evaluated",
    "n_genes_constant",
    "coverage_90",
    "interval_width",
)
INFERENCE_VARIANTS: tuple[str, ...] = (
    "decode_greedy",
    "decode_mean_of_samples_n4",
    "decode_mean_of_samples_n16",
    "decode_mean_of_samples_n32",
    "cfg_2",
    "prefix_1_scale",
    "prefix_2_scales",
    "tokenizer_ceiling_generated",
    "tokenizer_ceiling_all",
    "ridge_blend_0",
    "ridge_blend_1",
)
TRAINING_VARIANTS: tuple[str, ...] = (
    "neighbour_k_0",
    "all_4_scales",
    "aux_decode_0",
    "aux_decode_teacher",
    "coordinates_off",
    "tokenizer_train_only",
    "nar_control",
)
_VARIANT_CONFIG = {
    "neighbour_k_0": {"neighbour_k": 0},
    "all_4_scales": {"generate_scales": None},
    "aux_decode_0": {"aux_decode_weight": 0.0},
    "aux_decode_teacher": {"aux_decode_mode": "teacher"},
    "coordinates_off": {"coordinate_dropout": 1.0},
}


@dataclass
class BenchConfig:
    """Everything that defines a benchmark run (recorded in the JSON)."""

    splits: tuple[str, ...] = ("within_C", "cross_B4")
    genesets: tuple[str, ...] = D.GENESETS
    varst_genesets: tuple[str, ...] = ("top50", "top250")
    varst_cp10k_splits: tuple[str, ...] = ("within_C", "cross_B4")  # splits where VARST also runs on the CP10k target
    detected10_splits: tuple[str, ...] = ("within_C", "cross_B4")
    targets: tuple[str, ...] = D.TARGETS
    seed: int = 0
    stage1_epochs: int = 5
    stage1_max_steps: int | None = None
    stage2_epochs: int = 25
    n_samples: int = 16
    ensemble_size: int = 1  # stage-2 members of every VARST fit (var_config["ensemble_size"])
    # the tokenizer pools the ordered genes into at most this many positions (vqvae_config["gene_positions"]): no change
    # for the top-50/top-250 panels, what makes the ~10k detected10 genes trainable on a CPU; None = one per gene
    gene_positions: int | None = 256
    ablations: bool = False
    ablation_splits: tuple[str, ...] = ("cross_B4", "within_C")
    ablation_geneset: str = "top250"
    ablation_seeds: int = 2
    seed_threshold: float = 0.03
    speed: bool = True
    quick: bool = False
    threads: int = 1
    workers: int = 1  # processes that fit VARST units in parallel (each with ``threads`` threads)
    data_dir: str | None = None
    cache_dir: str | None = None
    resume: bool = False
    time_budget_min: float | None = None
    variants: tuple[str, ...] = INFERENCE_VARIANTS + TRAINING_VARIANTS
    tests: tuple[str, ...] = ()  # run only the folds whose test section is listed (empty: every fold)
    accelerator: str = "cpu"  # Lightning accelerator of the VARST fits ("gpu" on a GPU machine)
    extra: dict[str, Any] = field(default_factory=dict)

    def settings(self) -> M.VARSTSettings:
        return M.VARSTSettings(
            stage1_epochs=self.stage1_epochs,
            stage1_max_steps=self.stage1_max_steps,
            stage2_epochs=self.stage2_epochs,
            n_samples=self.n_samples,
            accelerator=self.accelerator,
            var_config={"ensemble_size": self.ensemble_size} if self.ensemble_size > 1 else {},
            vqvae_config={"gene_positions": self.gene_positions},
        )

    def folds(self, split: str) -> list[D.Fold]:
        """The folds of ``split`` this run covers (all, or those whose test section is in ``tests``)."""
        return [f for f in D.folds(split, quick=self.quick) if not self.tests or f.test in self.tests]


def summary(ev: dict) -> dict[str, float]:
    """The scalar metrics of a ``tl.evaluate`` result."""
    return {k: float(ev[k]) for k in SUMMARY_KEYS if k in ev}


def _score(truth, pred, samples=None, genes=None) -> dict[str, float]:
    import varst_scverse as varst

    return summary(varst.tl.evaluate(truth, pred, samples=samples, gene_names=genes))


class Store:
    """Per-fold results, saved after every unit so that an interrupted run resumes (``--resume``)."""

    def __init__(self, path: Path, resume: bool, fingerprint: dict) -> None:
        self.path = path
        self.data: dict[str, Any] = {"fingerprint": fingerprint, "units": {}}
        if resume and path.is_file():
            old = json.loads(path.read_text())
            if old.get("fingerprint") == fingerprint:
                self.data = old

    def has(self, key: str) -> bool:
        return key in self.data["units"]

    def get(self, key: str) -> Any:
        return self.data["units"][key]

    def put(self, key: str, value: Any) -> None:
        self.data["units"][key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        tmp.replace(self.path)


def _fingerprint(cfg: BenchConfig) -> dict:
    d = asdict(cfg)
    for k in (
        "resume",
        "data_dir",
        "cache_dir",
        "speed",
        "extra",
        "time_budget_min",
        "workers",
        "ablations",
        "variants",
        "ablation_splits",
        "ablation_seeds",
        "tests",
    ):
        d.pop(k, None)
    if d.get("ensemble_size") == 1:
        d.pop("ensemble_size")  # stores written before the option existed still resume
    if d.get("gene_positions") == 256:
        d.pop("gene_positions")  # likewise: the default changes nothing on the panels those stores could run
    return json.loads(json.dumps(d))


def run(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark; return ``{"config", "units", "speed", "seconds"}`` for the report writers."""
    import torch

    M.quiet_lightning()
    from threadpoolctl import threadpool_limits

    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    M.THREADS[0] = int(cfg.threads)
    t_start = time.time()
    try:
        with threadpool_limits(limits=cfg.threads):
            return _run(cfg, log, t_start)
    finally:
        torch.set_num_threads(threads_before)


class Budget:
    """Wall-clock budget for the model work (baselines always run); records what it had to skip."""

    def __init__(self, minutes: float | None, t_start: float) -> None:
        self.limit = None if minutes is None else 60.0 * float(minutes)
        self.t_start = t_start
        self.skipped: list[str] = []

    def ok(self, what: str) -> bool:
        if self.limit is None or time.time() - self.t_start < self.limit:
            return True
        self.skipped.append(what)
        return False

    def minutes(self) -> float:
        return (time.time() - self.t_start) / 60


def _unit_order(keys: list[tuple]) -> list[tuple]:
    """VARST work in priority order: cross_B4 first, then within_C fold by fold with both targets together."""
    return sorted(keys, key=lambda k: (0 if k[0] == "cross_B4" else 1, k[1].test, D.TARGETS.index(k[3])))


def _run(cfg: BenchConfig, log, t_start: float) -> dict[str, Any]:
    cache = Path(cfg.cache_dir) if cfg.cache_dir else D.default_cache_dir()
    adata = D.load_embedded(cfg.data_dir, cache, all_sections=not cfg.quick, log=log)
    tag = "quick" if cfg.quick else "full"
    store = Store(cache / f"partial_{tag}.json", cfg.resume, _fingerprint(cfg))
    settings = cfg.settings()
    budget = Budget(cfg.time_budget_min, t_start)
    tokenizer_mode = "train" if cfg.quick else "all"
    speed_split = "cross_B4" if "cross_B4" in cfg.splits else cfg.splits[0]
    # 1. baselines (cheap) for every fold, gene set and target
    jobs: dict[tuple, dict[str, Any]] = {}
    for split in cfg.splits:
        for fold in cfg.folds(split):
            gsets = D.gene_sets(adata, fold, quick=cfg.quick, cache_dir=cache)
            query = D.query_without_counts(adata, fold.test)
            for gname, genes in gsets.items():
                if gname not in cfg.genesets or (gname == "detected10" and split not in cfg.detected10_splits):
                    continue
                for target in cfg.targets:
                    key = f"{split}_{gname}_{target}|{fold.test}"
                    truth = D.truth(adata, fold, genes, target)
                    job = {"key": key, "fold": fold, "genes": genes, "target": target, "truth": truth, "query": query}
                    job.update(geneset=gname, subsets=panel_subsets(gsets, gname))
                    jobs[(split, fold, gname, target)] = job
                    if store.has(key):
                        continue
                    t0 = time.time()
                    unit: dict[str, Any] = {"genes": genes if len(genes) <= 250 else f"{len(genes)} genes"}
                    base = M.run_baselines(adata, fold, genes, target, seed=cfg.seed)
                    unit["baseline_seconds"] = base.pop("_seconds")
                    unit["methods"] = {m: _score(truth, p, genes=genes) for m, p in base.items()}
                    store.put(key, unit)
                    log(
                        f"[{key}] baselines: ridge_cv {unit['methods']['ridge_cv']['mean_pearson']:.3f} "
                        f"({time.time() - t0:.0f}s; total {budget.minutes():.1f} min)"
                    )
    # 2. VARST, in priority order; 3. speed on the first cross_B4 log1p model; 4. ablations
    speed: dict[str, Any] = store.data.get("speed", {})
    deferred: list[dict[str, Any]] = []

    def ablate(ctxs: list[dict[str, Any]]) -> None:
        for ctx in ctxs:
            log(f"[{ctx['key']}] ablations (total {budget.minutes():.1f} min)")
            abl = _ablation_unit(
                ctx["model"],
                ctx["train"],
                ctx["query"],
                ctx["truth"],
                ctx["genes"],
                ctx["target"],
                adata,
                ctx["fold"],
                settings,
                cfg,
                seed=cfg.seed,
                base_pred=ctx["pred"]["pred"],
                log=log,
                budget=budget,
                key=ctx["key"],
            )
            store.put(ctx["key"] + "|ablation|0", abl)
            ctx.pop("model", None)
            deferred.remove(ctx)

    order = _unit_order(
        [k for k in jobs if k[2] in cfg.varst_genesets and (k[3] != "cp10k" or k[0] in cfg.varst_cp10k_splits)]
    )
    if cfg.workers > 1:
        # plain units (no speed, no ablations) in parallel processes; the rest below, in this process
        plain = [
            jk
            for jk in order
            if "varst" not in store.get(jobs[jk]["key"])["methods"]
            and not (cfg.ablations and jk[2] == cfg.ablation_geneset and jk[0] in cfg.ablation_splits)
            and not (cfg.speed and not speed and jk[0] == speed_split and jk[2] == cfg.ablation_geneset)
        ]
        _parallel_units(plain, jobs, store, adata, cache, settings, cfg, tokenizer_mode, budget, log)
    for i, jk in enumerate(order):
        split, fold, gname, target = jk
        if i > 0 and order[i - 1][0] == "cross_B4" and split != "cross_B4":
            # cross_B4 done: its first-target ablations before the within_C folds, the rest at the end
            ablate([c for c in deferred if c["target"] == cfg.targets[0]])
        job = jobs[jk]
        key = job["key"]
        unit = store.get(key)
        want_ablation = (
            cfg.ablations
            and gname == cfg.ablation_geneset
            and split in cfg.ablation_splits
            and not store.has(key + "|ablation|0")
        )
        want_speed = (
            cfg.speed and not speed and split == speed_split and gname == cfg.ablation_geneset and target == "log1p"
        )
        if "varst" in unit["methods"] and not (want_ablation or want_speed):
            continue
        if not budget.ok(f"VARST {key}"):
            continue
        t0 = time.time()
        fit = _fit_default(adata, fold, job["genes"], target, job["query"], settings, cfg, tokenizer_mode)
        if "varst" not in unit["methods"]:
            _add_varst(unit, _varst_rows(fit, job, adata, cfg))
            _log_unit(log, key, unit, t0, budget)
            store.put(key, unit)
        if want_speed:
            speed = _speed(fit["model"], job["query"], adata, fold, job["genes"], target, fit["secs"], settings, log)
            speed["unit"] = key
            store.data["speed"] = speed
            store.put(key, unit)
        if want_ablation:
            deferred.append({**job, **fit})
    ablate(list(deferred))
    if cfg.ablations and cfg.ablation_seeds > 1:
        _second_seed(cfg, store, adata, settings, tokenizer_mode, log, budget)
    return {
        "config": asdict(cfg),
        "units": store.data["units"],
        "speed": speed,
        "seconds": time.time() - t_start,
        "peak_rss_gb": S.peak_rss_gb(),
        "load_average": S.load_average(),
        "skipped": budget.skipped,
        "notes": cfg.extra.get("notes", []),
    }


def panel_subsets(gsets: dict[str, list[str]], gname: str) -> dict[str, list[str]]:
    """The fold's other gene sets that are smaller than ``gname``'s and lie inside it (top-50 inside top-250).

    A VARST trained on the larger panel is also scored on each of them: the model of the wider panel, read on fewer
    genes (``varst_top250`` in the top-50 splits).
    """
    genes = set(gsets[gname])
    return {
        name: list(sub)
        for name, sub in gsets.items()
        if name != gname and len(sub) < len(genes) and genes.issuperset(sub)
    }


def _varst_scores(truth, point, prefixes, samples, genes, alone=None, alone_prefixes=None) -> dict[str, dict]:
    """``varst`` (and ``varst_transformer`` when ``alone`` is given) rows with their per-scale prefix scores."""
    row = _score(truth, point, samples, genes)
    row["prefix_mean_pearson"] = [_score(truth, x)["mean_pearson"] for x in prefixes]
    methods = {"varst": row}
    if alone is not None:
        methods["varst_transformer"] = _score(truth, alone, None, genes)
        methods["varst_transformer"]["prefix_mean_pearson"] = [_score(truth, x)["mean_pearson"] for x in alone_prefixes]
    return methods


def _varst_rows(fit: dict[str, Any], job: dict[str, Any], adata, cfg: BenchConfig) -> dict[str, Any]:
    """The unit entries of a fitted default VARST: its scores, its transformer alone, seconds, spots.

    ``subsets``: the same predictions scored on each smaller gene set of the fold inside this one (see
    :func:`panel_subsets`), as ``{name: {"from": this gene set, "methods": rows}}``.
    """
    p, truth, genes = fit["pred"], job["truth"], job["genes"]
    alone = alone_pre = None
    if fit["model"].module.has_probe:
        # the model's default blends a ridge probe in (var_config["ridge_blend"]); the transformer on its own:
        alone, alone_pre = fit["model"].predict_expression(
            job["query"], n_samples=0, return_prefixes=True, add_to_adata=False, ridge_blend=0.0
        )
    methods = _varst_scores(truth, p["pred"], p["prefixes"], p.get("samples"), genes, alone, alone_pre)
    out = {"methods": methods, "varst_seconds": fit["secs"], "tokenizer_spots": int(fit["train"].n_obs)}
    subsets = {}
    for name, sub in (job.get("subsets") or {}).items():
        idx = np.array([genes.index(g) for g in sub])
        arrays = (truth, p["pred"], p["prefixes"], p.get("samples"), alone, alone_pre)  # genes on the last axis
        t, point, pre, samples, a, a_pre = (None if x is None else x[..., idx] for x in arrays)
        subsets[name] = {"from": job["geneset"], "methods": _varst_scores(t, point, pre, samples, sub, a, a_pre)}
    if subsets:
        out["subsets"] = subsets
    return out


def _add_varst(unit: dict[str, Any], rows: dict[str, Any]) -> None:
    """Put the entries of :func:`_varst_rows` into a unit (its methods beside the baselines')."""
    unit["methods"].update(rows["methods"])
    unit.update({k: v for k, v in rows.items() if k != "methods"})


def _log_unit(log, key: str, unit: dict[str, Any], t0: float, budget: Budget) -> None:
    """Log a unit's VARST line."""
    row = unit["methods"]["varst"]
    log(
        f"[{key}] varst {row['mean_pearson']:.3f} (coverage {row.get('coverage_90', float('nan')):.2f})  "
        f"ridge_cv {unit['methods']['ridge_cv']['mean_pearson']:.3f}  "
        f"({time.time() - t0:.0f}s; total {budget.minutes():.1f} min)"
    )


def _worker_unit(cache: str, all_sections: bool, job: dict[str, Any], settings, cfg, tokenizer_mode) -> dict:
    """One VARST unit in a worker process: read the cached embedded HER2ST, fit, predict, score."""
    import torch

    M.quiet_lightning()
    torch.set_num_threads(cfg.threads)
    M.THREADS[0] = int(cfg.threads)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=cfg.threads):
        adata = D.load_embedded(cfg.data_dir, Path(cache), all_sections=all_sections, log=lambda *_: None)
        job = {**job, "query": D.query_without_counts(adata, job["fold"].test)}
        fit = _fit_default(adata, job["fold"], job["genes"], job["target"], job["query"], settings, cfg, tokenizer_mode)
        return _varst_rows(fit, job, adata, cfg)


def _parallel_units(keys, jobs, store, adata, cache, settings, cfg, tokenizer_mode, budget, log) -> None:
    """Fit the default VARST of ``keys`` in ``cfg.workers`` processes (spawned: no forked OpenMP state).

    A unit starts only when a worker is free and the time budget allows it; the rest are listed as skipped.
    """
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    if not keys:
        return
    pending = list(keys)
    log(f"{len(pending)} VARST units on {cfg.workers} worker processes")
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=mp.get_context("spawn")) as pool:
        futures: dict[Any, str] = {}

        def fill() -> None:
            while pending and len(futures) < cfg.workers:
                jk = pending.pop(0)
                if not budget.ok(f"VARST {jobs[jk]['key']}"):
                    continue
                job = {k: v for k, v in jobs[jk].items() if k != "query"}
                fut = pool.submit(_worker_unit, str(cache), not cfg.quick, job, settings, cfg, tokenizer_mode)
                futures[fut] = jobs[jk]["key"]

        fill()
        while futures:
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            for fut in done:
                key = futures.pop(fut)
                unit = store.get(key)
                _add_varst(unit, fut.result())
                _log_unit(log, key, unit, t0, budget)
                store.put(key, unit)
            fill()


def _fit_default(adata, fold, genes, target, query, settings, cfg, tokenizer_mode) -> dict[str, Any]:
    """Train the default VARST of one fold and target and predict the test section."""
    train = M.varst_training_data(adata, fold, genes, tokenizer_mode)
    model, secs = M.fit_varst(train, target, settings, seed=cfg.seed)
    M.check_gene_order(model, genes)
    t0 = time.perf_counter()
    pred = M.predict_varst(model, query, n_samples=cfg.n_samples)
    secs["predict"] = time.perf_counter() - t0
    return {"model": model, "train": train, "secs": secs, "pred": pred}


# ---------------------------------------------------------------------------------------------------------- ablations
def _ablation_unit(
    model,
    train,
    query,
    truth,
    genes,
    target,
    adata,
    fold,
    settings,
    cfg,
    seed,
    base_pred,
    log,
    only: tuple[str, ...] | None = None,
    budget: Budget | None = None,
    key: str = "",
) -> dict[str, Any]:
    """Every ablation variant of one fold and target at one seed, scored against the same truth."""
    M.apply_threads()
    variants = [v for v in cfg.variants if only is None or v in only]
    out: dict[str, Any] = {"default": _score(truth, base_pred, genes=genes)}
    t0 = time.time()
    pred_kw = {"add_to_adata": False}
    for v in variants:
        tv = time.time()
        if budget is not None and v in TRAINING_VARIANTS and not budget.ok(f"ablation {v} {key} seed {seed}"):
            continue
        if v == "decode_greedy":
            out[v] = _score(truth, model.predict_expression(query, n_samples=0, decode="greedy", **pred_kw))
        elif v.startswith("decode_mean_of_samples_n"):
            n = int(v.rsplit("n", 1)[1])
            samples = model.predict_samples(query, n_samples=n)
            out[v] = _score(truth, samples.mean(0), samples)
        elif v.startswith("ridge_blend_"):
            # 0: the transformer alone; 1: the ridge probe alone (the model's own, fitted on its training spots)
            w = float(v.rsplit("_", 1)[1])
            out[v] = _score(truth, model.predict_expression(query, n_samples=0, ridge_blend=w, **pred_kw))
        elif v == "cfg_2":
            out[v] = _score(truth, model.predict_expression(query, n_samples=0, cfg=2.0, **pred_kw))
        elif v.startswith("prefix_"):
            k = int(v.split("_")[1])
            _, pre = model.predict_expression(query, n_samples=0, return_prefixes=True, **pred_kw)
            if k <= pre.shape[0]:
                out[v] = _score(truth, pre[k - 1])
        elif v.startswith("tokenizer_ceiling"):
            # not a prediction: the test spots' own expression through the tokenizer (an upper bound for VARST)
            n = len(model.module.var.scales) if v.endswith("generated") else None
            out[v] = _score(truth, model.reconstruct(D.test_with_counts(adata, fold, genes), n_scales=n))
        elif v in _VARIANT_CONFIG:
            m2, _ = M.fit_varst(train, target, settings, seed=seed, stage1_from=model, var_config=_VARIANT_CONFIG[v])
            pred, pre = model_pred(m2, query)
            out[v] = _score(truth, pred)
            out[v]["prefix_mean_pearson"] = [_score(truth, x)["mean_pearson"] for x in pre]
            del m2
        elif v == "tokenizer_train_only":
            tr2 = M.varst_training_data(adata, fold, genes, "train")
            m2, _ = M.fit_varst(tr2, target, settings, seed=seed)
            out[v] = _score(truth, model_pred(m2, query)[0])
            out[v]["tokenizer_spots"] = int(tr2.n_obs)
            del m2
        elif v == "nar_control":
            pred = M.nar_control(model, train, query, epochs=settings.stage2_epochs, lr=settings.stage2_lr, seed=seed)
            out[v] = _score(truth, pred)
        if v in out:
            log(f"    {v}: {out[v]['mean_pearson']:.3f} ({time.time() - tv:.0f}s)")
    log(f"    ablations seed {seed}: {len(variants)} variants in {time.time() - t0:.0f}s")
    return out


def model_pred(model, query):
    """Expected-value prediction and its prefixes."""
    return model.predict_expression(query, n_samples=0, return_prefixes=True, add_to_adata=False)


def _ablation_means(store: Store, name: str, seed: int) -> dict[str, float]:
    """Mean over folds of each variant's mean Pearson for one split name and seed."""
    acc: dict[str, list[float]] = {}
    for key, val in store.data["units"].items():
        parts = key.split("|")
        if len(parts) == 4 and parts[0] == name and parts[2] == "ablation" and parts[3] == str(seed):
            for v, row in val.items():
                if isinstance(row, dict) and "mean_pearson" in row:
                    acc.setdefault(v, []).append(row["mean_pearson"])
    return {v: float(np.mean(x)) for v, x in acc.items()}


def _second_seed(cfg, store, adata, settings, tokenizer_mode, log, budget: Budget) -> None:
    """Rerun the default model and every variant whose difference from it is under the threshold with seed + 1."""
    seed2 = cfg.seed + 1
    for split in cfg.ablation_splits:
        if split not in cfg.splits:
            continue
        for target in cfg.targets:
            name = f"{split}_{cfg.ablation_geneset}_{target}"
            means = _ablation_means(store, name, cfg.seed)
            if "default" not in means:
                continue
            close = tuple(
                v for v, m in means.items() if v != "default" and abs(m - means["default"]) < cfg.seed_threshold
            )
            if not close:
                continue
            log(f"[{name}] second seed for {len(close)} variants within {cfg.seed_threshold} of the default: {close}")
            for fold in cfg.folds(split):
                key = f"{name}|{fold.test}|ablation|1"
                if store.has(key) or not budget.ok(f"second seed {key}"):
                    continue
                t0 = time.time()
                genes = store.get(f"{name}|{fold.test}")["genes"]
                truth = D.truth(adata, fold, genes, target)
                query = D.query_without_counts(adata, fold.test)
                train = M.varst_training_data(adata, fold, genes, tokenizer_mode)
                model, _ = M.fit_varst(train, target, settings, seed=seed2)
                pred = model_pred(model, query)[0]
                abl = _ablation_unit(
                    model,
                    train,
                    query,
                    truth,
                    genes,
                    target,
                    adata,
                    fold,
                    settings,
                    cfg,
                    seed2,
                    pred,
                    log,
                    only=close,
                    budget=budget,
                    key=key,
                )
                store.put(key, abl)
                log(f"[{key}] {time.time() - t0:.0f}s; total {budget.minutes():.1f} min")


# ---------------------------------------------------------------------------------------------------------- speed
def _speed(model, query, adata, fold, genes, target, secs, settings, log) -> dict[str, Any]:
    import torch

    t0 = time.time()
    tick = [time.time()]

    def lap(what: str) -> None:
        log(f"    speed: {what} ({time.time() - tick[0]:.0f}s)")
        tick[0] = time.time()

    M.apply_threads()
    out: dict[str, Any] = {"stage1_epochs": settings.stage1_epochs, "stage2_epochs": settings.stage2_epochs}
    out["threads"] = int(torch.get_num_threads())
    out["stage1_epochs_run"] = secs.get("stage1_epochs_run", settings.stage1_epochs)
    out["stage1_pipeline_spots_per_s"] = secs["stage1_spots"] * out["stage1_epochs_run"] / secs["stage1"]
    if settings.stage1_max_steps:
        steps = settings.stage1_max_steps * 256 / secs["stage1"]
        out["stage1_pipeline_spots_per_s"] = min(out["stage1_pipeline_spots_per_s"], steps)
    out["stage2_pipeline_spots_per_s"] = secs["stage2_spots"] * settings.stage2_epochs / secs["stage2"]
    out["stage1_spots"], out["stage2_spots"] = int(secs["stage1_spots"]), int(secs["stage2_spots"])
    for stage, bs in ((1, 256), (2, 64)):
        r = S.module_training_rate(model, stage, bs, steps=3)
        out[f"stage{stage}_module_spots_per_s"] = r["module_spots_per_s"]
        out[f"stage{stage}_flops_per_spot"] = r["flops_per_spot"]
        lap(f"stage {stage} module rate")
    out["query_spots"] = int(query.n_obs)
    for cache in (True, False):
        tag = "cache" if cache else "recompute"
        out[f"predict_{tag}_spots_per_s"] = S.predict_rate(model, query, use_cache=cache, repeats=2)
        out[f"predict_{tag}_flops_per_spot"] = S.generation_flops_per_spot(model, query, use_cache=cache)
        lap(f"predict {tag}")
    out["predict_cache_16_samples_spots_per_s"] = S.predict_rate(model, query, use_cache=True, n_samples=16, repeats=1)
    lap("predict with 16 samples")
    # the full 4-scale sequence, where a KV cache has more to save: an untrained stage 2 is as fast as a trained one
    m4 = M.untrained_stage2(model, var_config={"generate_scales": None})
    for cache in (True, False):
        tag = "cache" if cache else "recompute"
        out[f"predict4_{tag}_spots_per_s"] = S.predict_rate(m4, query, use_cache=cache, repeats=2)
        out[f"predict4_{tag}_flops_per_spot"] = S.generation_flops_per_spot(m4, query, use_cache=cache)
        lap(f"predict all scales {tag}")
    out["generated_tokens"] = int(model.module.n_generated_tokens)
    out["generated_tokens_all_scales"] = int(m4.module.n_generated_tokens)
    out["matmul_fp32_gflops_2_threads"] = S.matmul_gflops(threads=2)
    out["matmul_fp32_gflops_1_thread"] = S.matmul_gflops(threads=1)
    lap("matmul")
    out.update(S.ridge_times(adata, fold, genes, target, D.HIST_KEY))
    lap("ridge")
    out["load_average_at_speed"] = S.load_average()
    log(f"    speed measured in {time.time() - t0:.0f}s")
    return out
