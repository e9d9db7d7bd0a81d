"""``varst benchmark``: VARST beside the field's baselines on HER2ST, same features, same splits, one run.

The protocol of DESIGN.md "How quality is measured":

* splits ``within_C`` (leave one of C2–C6 out; 5 folds) and ``cross_B4`` (train C2–C6, test B4);
* genes chosen on each fold's training sections only: ``top50`` / ``top250`` highly variable genes and
  ``detected10`` (every gene detected in ≥ 10% of the training spots);
* both targets, ``log1p`` (``log1p(counts)``) and ``cp10k`` (``log1p(CP10k)``);
* methods: ``varst`` (cpu preset, expected-value decoding; the stage-1 tokenizer learns from every section with
  expression except the test section and the test patient's other sections), the baselines ``ridge`` (HEST probe),
  ``ridge_cv``, ``mlp``, ``knn``, ``mean`` on the built-in morphology descriptor, the same four with the 6-d RGB
  control (``*_rgb``), ``varst_transformer`` (VARST's transformer without its ridge probe, ``ridge_blend=0``) and
  the ``depth_oracle`` yardstick;
* metrics from :func:`varst_scverse.tl.evaluate`; for ``within_C`` the mean over folds and the fold spread (std).

Writes ``her2st.json``, ``her2st.md`` and (unless ``--no_speed``) ``speed.md`` to ``--out`` (default
``benchmarks/results``). The embedded HER2ST AnnData is cached under ``--cache_dir`` (default
``$VARST_BENCHMARK_CACHE`` or the varst-scverse user cache), never in the repository; per-fold results are saved there
too, so ``--resume`` continues an interrupted run.

Examples
--------
``varst benchmark`` (the full run), ``varst benchmark --ablations``, ``varst benchmark --quick --out /tmp/b``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from ._benchmark._data import GENESETS, TARGETS
from ._benchmark._run import INFERENCE_VARIANTS, TRAINING_VARIANTS, BenchConfig

__all__ = ["main", "run_benchmark", "BenchConfig"]


def _log(msg: str) -> None:
    print(f"[varst benchmark] {msg}", flush=True)


def run_benchmark(cfg: BenchConfig, out: str | Path = "benchmarks/results", command: str | None = None) -> dict:
    """Run the benchmark described by ``cfg`` and write ``her2st.json``, ``her2st.md`` and ``speed.md`` to ``out``.

    ``speed.md`` only when the run measures speed (``cfg.speed``); otherwise an existing one is left as it is.

    Returns the JSON document.
    """
    from ._benchmark import _report, _run

    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    raw = _run.run(cfg, log=_log)
    doc = _report.build_json(raw, command=command or "varst benchmark", started=started)
    written = _report.write_all(doc, raw, Path(out))
    _log(f"wrote {', '.join(written)} to {out} in {raw['seconds'] / 60:.1f} min{_speed_kept(written)}")
    return doc


def _speed_kept(written: list[str]) -> str:
    return "" if "speed.md" in written else " (no speed measured: speed.md left as it was)"


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``varst benchmark``."""
    p = argparse.ArgumentParser(
        prog="varst benchmark",
        description="VARST against the field's baselines on HER2ST (same features and splits).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="benchmarks/results", help="folder for her2st.json, her2st.md, speed.md")
    p.add_argument("--data_dir", default=None, help="folder holding her2st/ (default: $VARST_DATA_DIR, ../shared/data)")
    p.add_argument("--cache_dir", default=None, help="cache of the embedded AnnData and per-fold results")
    p.add_argument("--splits", type=_csv, default=("within_C", "cross_B4"), help="comma-separated splits")
    p.add_argument("--genesets", type=_csv, default=GENESETS, help="gene sets for the baselines")
    p.add_argument("--varst_genesets", type=_csv, default=("top50", "top250"), help="gene sets VARST runs on")
    p.add_argument(
        "--varst_cp10k_splits",
        type=_csv,
        default=("within_C", "cross_B4"),
        help="splits where VARST also runs on the CP10k target (the baselines always do)",
    )
    p.add_argument(
        "--detected10_splits", type=_csv, default=("within_C", "cross_B4"), help="splits with the detected10 gene set"
    )
    p.add_argument("--targets", type=_csv, default=TARGETS)
    p.add_argument("--stage1_epochs", type=int, default=5)
    p.add_argument("--stage1_max_steps", type=int, default=None, help="cap on stage-1 optimizer steps")
    p.add_argument("--stage2_epochs", type=int, default=25)
    p.add_argument("--n_samples", type=int, default=16, help="draws per spot for the 90%% interval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ensemble_size",
        type=int,
        default=1,
        help="stage-2 members of every VARST fit (seeds seed, seed+1, ...; averaged); merge such a run into a report "
        "with --merge_ensembles",
    )
    p.add_argument(
        "--gene_positions",
        type=int,
        default=256,
        help="the tokenizer pools the ordered genes into at most this many positions (vqvae_config['gene_positions']; "
        "0 = one position per gene): no change on the top-50/top-250 panels, what makes detected10 trainable on a CPU",
    )
    p.add_argument(
        "--tests", type=_csv, default=(), help="run only the folds with these test sections (e.g. B4,C3; default: all)"
    )
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator of the VARST fits (cpu, gpu, auto)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and BLAS threads; on a shared 2-core machine 1 thread trained stage 2 ~9x faster than 2 contended "
        "ones (0.8 s vs 7.4 s per step)",
    )
    p.add_argument("--ablations", action="store_true", help="run the ablations (top-250 genes, both targets)")
    p.add_argument("--ablation_splits", type=_csv, default=("cross_B4", "within_C"))
    p.add_argument(
        "--variants", type=_csv, default=INFERENCE_VARIANTS + TRAINING_VARIANTS, help="ablation variants to run"
    )
    p.add_argument("--ablation_seeds", type=int, default=2, help="seeds for variants within 0.03 of the default")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes that fit the VARST units (without speed or ablations) in parallel, each with --threads",
    )
    p.add_argument("--no_speed", action="store_true", help="skip the speed measurements")
    p.add_argument(
        "--time_budget_min",
        type=float,
        default=None,
        help="after this many minutes, skip the remaining model work (VARST fits, ablations) and write the report; "
        "baselines always run; the report lists what was skipped",
    )
    p.add_argument(
        "--report_only",
        action="store_true",
        help="rewrite the report files in --out from the stored results of the last run (adds --note lines)",
    )
    p.add_argument("--replace_notes", action="store_true", help="with --report_only: --note lines replace the old")
    p.add_argument(
        "--merge_ablations",
        action="append",
        default=[],
        help="with --report_only: add the ablation results stored by another run (its partial_full.json, or the "
        "cache folder holding it; e.g. runs of single folds on another machine); repeatable",
    )
    p.add_argument(
        "--merge_varst",
        action="append",
        default=[],
        help="with --report_only: add the VARST rows stored by another run for the units where this run has none "
        "(same genes; e.g. more gene sets run later); repeatable",
    )
    p.add_argument(
        "--merge_seeds",
        action="append",
        default=[],
        help="with --report_only: add the VARST rows of a run with another --seed (same genes and training "
        "settings) as a second seed: the report gains a table of VARST per seed and the mean over seeds; repeatable",
    )
    p.add_argument(
        "--merge_ensembles",
        action="append",
        default=[],
        help="with --report_only: add the VARST rows of a run with --ensemble_size K (same seed, genes and training "
        "settings) as varst_ens<K>: the report gains a table of VARST with one and with K transformers; repeatable",
    )
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    p.add_argument("--resume", action="store_true", help="reuse per-fold results of an interrupted identical run")
    p.add_argument(
        "--quick", action="store_true", help="one fold (B4 from C2-C4), top-50 genes, 1 + 2 epochs: for tests"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``varst benchmark`` / ``python -m varst_scverse.benchmark``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.report_only:
        report_only(
            args.out,
            args.cache_dir,
            args.note,
            replace_notes=args.replace_notes,
            merge_ablations=args.merge_ablations,
            merge_varst=args.merge_varst,
            merge_seeds=args.merge_seeds,
            merge_ensembles=args.merge_ensembles,
        )
        return 0
    if args.ensemble_size < 1:
        raise SystemExit(f"varst benchmark: --ensemble_size must be a positive integer, got {args.ensemble_size}.")
    if args.gene_positions < 0:
        raise SystemExit(
            "varst benchmark: --gene_positions must be 0 (one per gene) or a positive integer, got "
            f"{args.gene_positions}."
        )
    cfg = BenchConfig(
        splits=args.splits,
        genesets=args.genesets,
        varst_genesets=args.varst_genesets,
        varst_cp10k_splits=args.varst_cp10k_splits,
        detected10_splits=args.detected10_splits,
        targets=args.targets,
        seed=args.seed,
        ensemble_size=args.ensemble_size,
        gene_positions=args.gene_positions or None,
        stage1_epochs=args.stage1_epochs,
        stage1_max_steps=args.stage1_max_steps,
        stage2_epochs=args.stage2_epochs,
        n_samples=args.n_samples,
        ablations=args.ablations,
        tests=args.tests,
        accelerator=args.accelerator,
        ablation_splits=args.ablation_splits,
        ablation_seeds=args.ablation_seeds,
        variants=args.variants,
        speed=not args.no_speed,
        threads=args.threads,
        workers=args.workers,
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        resume=args.resume,
        time_budget_min=args.time_budget_min,
        quick=args.quick,
        extra={"notes": list(args.note)},
    )
    if args.quick:
        _quick(cfg)
    run_benchmark(cfg, out=args.out, command=" ".join(["varst benchmark", *map(shlex.quote, argv)]))
    return 0


def _quick(cfg: BenchConfig) -> None:
    """One fold (B4 from C2–C4), top-50 genes, 1 + 2 epochs; the tokenizer learns from the training sections only."""
    cfg.splits = ("cross_B4",)
    cfg.genesets = ("top50",)
    cfg.varst_genesets = ("top50",)
    cfg.stage1_epochs = min(cfg.stage1_epochs, 1)
    cfg.stage2_epochs = min(cfg.stage2_epochs, 2)
    cfg.n_samples = min(cfg.n_samples, 4)
    cfg.ablation_geneset = "top50"
    cfg.ablation_splits = ("cross_B4",)
    cfg.ablation_seeds = 1


def report_only(
    out: str | Path,
    cache_dir: str | Path | None = None,
    notes: list[str] | None = None,
    replace_notes: bool = False,
    merge_ablations: list[str | Path] | None = None,
    merge_varst: list[str | Path] | None = None,
    merge_seeds: list[str | Path] | None = None,
    merge_ensembles: list[str | Path] | None = None,
) -> dict:
    """Rewrite the three files from the stored per-fold results and the run facts of ``out/her2st.json``.

    For a run whose report writer changed afterwards, or to add notes: the command, date, wall time and machine stay
    those of the run. ``merge_ablations``: stored results of other runs (``partial_full.json`` files or the cache
    folders holding them) whose ablation units are added where this run has none; ``merge_varst``: likewise, the
    VARST rows of other runs for the folds, gene sets and targets where this run has none (the baselines stay this
    run's; a unit whose genes differ is refused). ``merge_seeds``: stored results of runs with another ``--seed``
    and the same training settings; their VARST rows become further seeds of the units this run has (the report's
    seed table: VARST per seed, the mean over seeds and the best baseline on the same folds). ``merge_ensembles``:
    stored results of runs with ``--ensemble_size K`` (K > 1), the same seed and the same training settings; their
    VARST rows become ``varst_ens<K>`` and ``varst_ens<K>_transformer`` beside this run's. Say in a note where and how
    they ran.
    """
    import json

    from ._benchmark import _data, _report, _run

    out = Path(out)
    meta = json.loads((out / "her2st.json").read_text())
    cfg = meta["config"]
    cache = Path(cache_dir) if cache_dir else (Path(cfg["cache_dir"]) if cfg.get("cache_dir") else None)
    cache = cache or _data.default_cache_dir()
    name = f"partial_{'quick' if cfg['quick'] else 'full'}.json"
    store = json.loads((cache / name).read_text())
    for other in merge_ablations or []:
        for key, unit in _stored(other, name)["units"].items():
            if "|ablation|" in key:
                store["units"].setdefault(key, unit)
    for other in merge_varst or []:
        for mine, unit in _varst_units(other, _stored(other, name), store):
            if "varst" in mine["methods"]:
                continue
            rows = {k: unit[k] for k in ("varst_seconds", "tokenizer_spots", "subsets") if k in unit}
            rows["methods"] = _report.varst_methods(unit["methods"])
            _run._add_varst(mine, rows)
    for other in merge_seeds or []:
        theirs = _stored(other, name)
        seed = _other_seed(other, theirs, cfg)
        for mine, unit in _varst_units(other, theirs, store):
            mine.setdefault("varst_seeds", {})[str(seed)] = _report.varst_methods(unit["methods"])
    for other in merge_ensembles or []:
        theirs = _stored(other, name)
        k = _ensemble_size(other, theirs, cfg)
        for mine, unit in _varst_units(other, theirs, store):
            for method, row in _report.varst_methods(unit["methods"]).items():
                if method in ("varst", "varst_transformer"):
                    mine["methods"][method.replace("varst", f"varst_ens{k}", 1)] = row
    raw = {
        "config": cfg,
        "units": store["units"],
        "speed": store.get("speed") or meta.get("speed") or {},
        "seconds": 60 * float(meta["wall_time_min"]),
        "peak_rss_gb": meta["peak_rss_gb"],
        "load_average": meta.get("load_average_at_end"),
        "skipped": meta.get("skipped_for_time", []),
        "notes": [*([] if replace_notes else meta.get("notes", [])), *(notes or [])],
    }
    doc = _report.build_json(raw, command=meta["command"], started=meta["date"])
    doc["machine"] = meta["machine"]
    written = _report.write_all(doc, raw, out)
    _log(f"rewrote {', '.join(written)} in {out} from {cache}{_speed_kept(written)}")
    return doc


def _stored(path: str | Path, name: str) -> dict:
    """Another run's store (its ``partial_*.json``, or the cache folder holding it)."""
    import json

    path = Path(path)
    return json.loads((path / name if path.is_dir() else path).read_text())


def _varst_units(other: str | Path, theirs: dict, store: dict):
    """Pairs ``(this run's unit, the other run's unit)`` of every fold unit where the other run has VARST rows.

    ``theirs`` is the other run's store, read from ``other`` (named in errors). Refuses a unit whose genes differ from
    this run's: its scores would not be comparable.
    """
    for key, unit in theirs["units"].items():
        mine = store["units"].get(key)
        if key.count("|") != 1 or mine is None or "varst" not in unit.get("methods", {}):
            continue
        if mine["genes"] != unit["genes"]:
            raise ValueError(f"{other}: unit {key} has other genes than this run's; it cannot be merged.")
        yield mine, unit


#: training settings a run merged as another seed must share with the report's run
_SEED_RUN_SETTINGS = ("stage1_epochs", "stage1_max_steps", "stage2_epochs", "n_samples", "quick")


def _ensemble_size(other: str | Path, theirs: dict, cfg: dict) -> int:
    """The stage-2 ensemble size of a run to merge as ``varst_ens<K>``, after checking its seed and settings."""
    fp = theirs.get("fingerprint") or {}
    k = int(fp.get("ensemble_size", 1))
    if k < 2:
        raise ValueError(f"{other}: not a run with --ensemble_size > 1; merge it with --merge_varst or --merge_seeds.")
    _check_settings(
        other,
        fp,
        cfg,
        ("seed", *_SEED_RUN_SETTINGS),
        "an ensemble is merged only when its first member is this run's model",
    )
    return k


def _other_seed(other: str | Path, theirs: dict, cfg: dict) -> int:
    """The seed of a run to merge as another seed (its store ``theirs``), after checking it differs only in the seed."""
    fp = theirs.get("fingerprint") or {}
    if "seed" not in fp:
        raise ValueError(f"{other}: the store records no run settings (fingerprint); it cannot be merged as a seed.")
    if int(fp["seed"]) == int(cfg["seed"]):
        raise ValueError(
            f"{other}: ran with seed {fp['seed']}, the seed of this report's run; merge runs of the same seed with "
            "--merge_varst."
        )
    _check_settings(other, fp, cfg, _SEED_RUN_SETTINGS, "only the seed may differ between seeds")
    return int(fp["seed"])


def _check_settings(other: str | Path, fp: dict, cfg: dict, keys, why: str) -> None:
    """Refuse to merge the run ``other`` (fingerprint ``fp``) when one of ``keys`` differs from this report's run."""
    differ = [k for k in keys if k in fp and fp[k] != cfg.get(k)]
    if differ:
        detail = ", ".join(f"{k} {fp[k]!r} vs {cfg.get(k)!r}" for k in differ)
        raise ValueError(f"{other}: trained with other settings than this report's run ({detail}); {why}.")


if __name__ == "__main__":
    raise SystemExit(main())
