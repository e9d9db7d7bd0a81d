"""Speed of VARST on this CPU: the speed targets of issue #3, for the ``cpu`` and ``seed`` presets.

What it measures (all on ``varst.datasets.synthetic`` data: ``--n_spots`` spots x ``--n_genes`` genes, 241 tokens for
200 genes, ``--histology_dim``-d histology features as from UNI):

1. the measured fp32 ``torch.matmul`` rate at each thread count of ``--train_threads`` (best of ``--matmul_ns``);
2. training, per preset and stage: FLOPs per spot of forward + backward (``FlopCounterMode``) and the module-only
   spots/s of loss + backward + AdamW on one batch (``_speed.module_training_rate``) at each thread count; the
   achieved GFLOP/s and its fraction of the matmul rate at the same thread count;
3. the Lightning pipeline (``VARST.train``, one epoch per stage) for ``--pipeline_presets``, next to the module rate;
4. prediction: ``predict_expression`` spots/s with the KV cache and without it (``use_cache=False``), for each
   ``n_samples`` and batch size, the FLOPs per spot of each call, the speed-up of the cache, and the largest
   difference between cached and recomputed predictions; the number of sequential transformer passes per spot.

Speed does not depend on what the weights hold: the ``cpu`` preset is trained for one epoch per stage (the pipeline
run), the ``seed`` preset not at all (its stage flags are set so that prediction runs).

Usage
-----
::

    python benchmarks/speed_cpu.py            # ~8 min, idle 2 cores; writes benchmarks/results/speed_cpu.{json,md}
    python benchmarks/speed_cpu.py --smoke    # toy sizes, < 1 min, 1 thread; writes to a temporary directory
    python benchmarks/speed_cpu.py --help     # sizes, steps, threads, presets

Run it on an otherwise idle machine: the load averages before and after are in both outputs, and every timing is
only as good as the machine was quiet.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as lpl
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import varst_scverse as varst
from varst_scverse._benchmark import _speed as S

#: toy widths for ``--smoke`` (each preset keeps its own structure: scales generated, neighbours, aux loss)
_SMOKE_VQ = {"vocab_size": 64, "embed_dim": 16, "hidden_dim": 32, "gene_mixing_dim": 16}
_SMOKE_VAR = {"embed_dim": 32, "num_heads": 2, "num_layers": 1, "feedforward_dim": 64, "condition_embed_dim": 32}

# issue #3 targets
TARGET_SEED_STAGE2_FRACTION = 0.35
TARGET_CACHE_SPEEDUP = 1.2
TARGET_CPU_SPOTS_PER_S = 2000.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _strs(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # stage 2: the frozen tokenizer stays in eval
    warnings.filterwarnings("ignore", category=FutureWarning)


# ---------------------------------------------------------------------------------------------------------- machine
def cpu_model_name() -> str:
    """``lscpu``'s model name (``/proc/cpuinfo`` as a fallback), else ``platform.processor()``."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        for line in out.splitlines():
            if line.strip().lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # pragma: no cover - older torch
        capability = "unknown"
    return {
        "cpu_model": cpu_model_name(),
        "processor": platform.processor(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "cpu_capability": capability,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "varst_scverse": getattr(varst, "__version__", "unknown"),
        "torch_threads_default": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """What to run for one preset."""

    preset: str
    batch1: int
    batch2: int
    steps: int
    n_query: int
    batch_sizes: list[int]
    n_samples: list[int]
    repeats: int
    flop_spots: int
    pipeline: bool
    generate_only: bool
    vqvae_config: dict[str, Any] | None = None
    var_config: dict[str, Any] | None = None


def build_plans(args: argparse.Namespace) -> list[Plan]:
    plans = []
    for preset in _strs(args.presets):
        seed = preset == "seed"
        plans.append(
            Plan(
                preset=preset,
                batch1=args.batch1,
                batch2=args.seed_batch2 if seed else args.batch2,
                steps=args.seed_steps if seed else args.steps,
                n_query=args.seed_query if seed else args.n_query,
                batch_sizes=_ints(args.seed_batch_sizes if seed else args.batch_sizes),
                n_samples=_ints(args.seed_n_samples if seed else args.n_samples),
                repeats=args.seed_repeats if seed else args.repeats,
                flop_spots=args.seed_flop_spots if seed else args.flop_spots,
                pipeline=preset in _strs(args.pipeline_presets),
                generate_only=preset in _strs(args.generate_only_presets),
                vqvae_config=dict(_SMOKE_VQ) if args.smoke else None,
                var_config=dict(_SMOKE_VAR) if args.smoke else None,
            )
        )
    return plans


# ---------------------------------------------------------------------------------------------------------- training
class BatchTimer(lpl.Callback):
    """Wall time and spots of the training batches after the first ``warmup`` (validation time taken out)."""

    def __init__(self, warmup: int = 1) -> None:
        self.warmup = warmup
        self.t_start: float | None = None
        self.ends: list[float] = []
        self.sizes: list[int] = []
        self.val_spans: list[tuple[float, float]] = []
        self._val_t0: float | None = None
        self.threads: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: D102
        self.threads = torch.get_num_threads()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        if self.t_start is None:
            self.t_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        self.ends.append(time.perf_counter())
        self.sizes.append(int(batch["expression"].shape[0]))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:  # noqa: D102
        self._val_t0 = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:  # noqa: D102
        if self._val_t0 is not None:
            self.val_spans.append((self._val_t0, time.perf_counter()))

    def result(self) -> dict[str, Any]:
        if not self.ends:
            return {"pipeline_spots_per_s": float("nan"), "timed_batches": 0}
        if len(self.ends) > self.warmup:
            t0, sizes = self.ends[self.warmup - 1] if self.warmup else self.t_start, self.sizes[self.warmup :]
        else:  # too few batches for a warm-up: time them all
            t0, sizes = self.t_start, self.sizes
        t1 = self.ends[-1]
        secs = t1 - t0 - sum(b - a for a, b in self.val_spans if a >= t0 and b <= t1)
        return {
            "pipeline_spots_per_s": sum(sizes) / secs,
            "timed_batches": len(sizes),
            "timed_spots": int(sum(sizes)),
            "timed_s": secs,
            "warmup_batches": self.warmup if len(self.ends) > self.warmup else 0,
            "threads": self.threads,
        }


def pipeline_run(model: varst.VARST, stage: int, batch_size: int, epochs: int, threads: int) -> dict[str, Any]:
    """One ``VARST.train`` run of ``stage``; spots/s over the batches after the first."""
    torch.set_num_threads(threads)
    timer = BatchTimer(warmup=1)
    t0 = time.perf_counter()
    model.train(
        stage=stage,
        max_epochs=epochs,
        batch_size=batch_size,
        lr=1e-3,
        enable_progress_bar=False,
        logger=False,
        callbacks=[timer],
    )
    out = {"batch_size": batch_size, "epochs": epochs, "train_call_wall_s": time.perf_counter() - t0}
    out.update(timer.result())
    return out


def mark_trained(model: varst.VARST) -> None:
    """Let an untrained model predict: speed does not depend on the weights."""
    model.module.stage1_trained = True
    model.module.set_training_stage(2, _allow_untrained=True)
    model.module.stage2_trained = True
    model.module.eval()
    model.is_trained_ = {1: True, 2: True}


def training_rates(
    model: varst.VARST, plan: Plan, thread_counts: list[int], matmul: dict[str, dict[str, float]]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage, bs in ((1, plan.batch1), (2, plan.batch2)):
        row: dict[str, Any] = {"batch_size": bs, "timed_steps": plan.steps, "threads": {}}
        for t in thread_counts:
            torch.set_num_threads(t)
            t0 = time.perf_counter()
            r = S.module_training_rate(model, stage, bs, steps=plan.steps)
            gc.collect()
            row["gflop_per_spot"] = r["flops_per_spot"] / 1e9
            gflops = r["flops_per_spot"] * r["module_spots_per_s"] / 1e9
            peak = matmul.get(str(t), {}).get("best", float("nan"))
            row["threads"][str(t)] = {
                "module_spots_per_s": r["module_spots_per_s"],
                "gflops": gflops,
                "matmul_gflops": peak,
                "fraction_of_matmul": gflops / peak if peak else float("nan"),
                "wall_s": time.perf_counter() - t0,
            }
            log(
                f"  {plan.preset} stage {stage} module, {t} thread(s), batch {bs}: {r['module_spots_per_s']:.2f} "
                f"spots/s, {row['gflop_per_spot']:.3f} GFLOP/spot -> {gflops:.1f} GFLOP/s "
                f"({100 * gflops / peak:.0f}% of matmul) [{time.perf_counter() - t0:.0f}s]"
            )
        out[f"stage{stage}"] = row
    return out


# ---------------------------------------------------------------------------------------------------------- inference
def passes(model: varst.VARST) -> dict[str, Any]:
    """Sequential transformer passes per generation, from the model's own scales."""
    mod = model.module
    gen = [int(s) for s in mod.var.scales]
    cum = np.cumsum(gen)
    return {
        "all_scales": [int(s) for s in mod.scales],
        "generated_scales": gen,
        "n_tokens": int(mod.n_tokens),
        "n_generated_tokens": int(mod.n_generated_tokens),
        "passes_per_generation_cached": len(gen),
        "passes_per_generation_recompute": len(gen),
        "tokens_through_transformer_cached": int(cum[-1]),
        "tokens_through_transformer_recompute": int(cum.sum()),
        "passes_token_by_token_generated": int(mod.n_generated_tokens),
        "passes_token_by_token_all_tokens": int(mod.n_tokens),
        "generations_per_predict_call": {"n_samples=0": 1, "n_samples>=1": 2},
    }


def predict_flops_per_spot(model: varst.VARST, query, n_spots: int, **kw) -> float:
    """FLOPs per spot of one ``predict_expression`` call (as counted by ``FlopCounterMode``) on ``n_spots`` spots."""
    n = max(1, min(n_spots, query.n_obs))
    counter = FlopCounterMode(display=False)
    with counter:
        model.predict_expression(query, indices=np.arange(n), add_to_adata=False, **kw)
    return counter.get_total_flops() / n


def time_predict(model: varst.VARST, query, repeats: int, **kw) -> tuple[float, np.ndarray]:
    """Best spots/s of ``predict_expression`` over ``repeats`` calls, and the prediction."""
    best, pred = 0.0, None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        pred = model.predict_expression(query, add_to_adata=False, **kw)
        best = max(best, query.n_obs / (time.perf_counter() - t0))
    return best, pred


@torch.inference_mode()
def time_generate(model: varst.VARST, query, batch_size: int, decode: str, repeats: int) -> float:
    """Spots/s of ``module.generate`` alone (one draw, KV cache) on inputs already prepared as tensors."""
    sp = model._spatial_inputs(query)
    rows = np.arange(query.n_obs)
    batches = [model._batch_tensors(sp, rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    model.module.eval()
    best = 0.0
    for _ in range(max(1, repeats)):
        gen = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for b in batches:
            model.module.generate(
                b["histology"], b["coords"], b.get("neighbours"), decode=decode, n_samples=1, generator=gen
            )
        best = max(best, query.n_obs / (time.perf_counter() - t0))
    return best


def inference(model: varst.VARST, query, plan: Plan, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    out: dict[str, Any] = {"query_spots": int(query.n_obs), "threads": threads, "passes": passes(model), "rows": []}
    # warm-up: first calls allocate and pick kernels
    model.predict_expression(query, indices=np.arange(min(8, query.n_obs)), n_samples=0, add_to_adata=False)
    flops: dict[tuple[int, bool], float] = {}
    for ns in plan.n_samples:
        for cache in (True, False):
            flops[(ns, cache)] = predict_flops_per_spot(
                model, query, plan.flop_spots, n_samples=ns, use_cache=cache, batch_size=plan.flop_spots
            )
    for ns in plan.n_samples:
        for bs in plan.batch_sizes:
            res = {}
            for cache in (True, False):
                t0 = time.perf_counter()
                rate, pred = time_predict(
                    model, query, plan.repeats, n_samples=ns, use_cache=cache, batch_size=bs, decode="expected"
                )
                res[cache] = (rate, pred)
                f = flops[(ns, cache)]
                out["rows"].append(
                    {
                        "n_samples": ns,
                        "use_cache": cache,
                        "batch_size": bs,
                        "spots_per_s": rate,
                        "gflop_per_spot": f / 1e9,
                        "gflops": f * rate / 1e9,
                        "wall_s": time.perf_counter() - t0,
                    }
                )
                log(
                    f"  {plan.preset} predict n_samples={ns} batch {bs} {'cache' if cache else 'recompute'}: "
                    f"{rate:,.1f} spots/s, {f / 1e9:.3f} GFLOP/spot [{time.perf_counter() - t0:.0f}s]"
                )
            diff = float(np.nanmax(np.abs(res[True][1] - res[False][1])))
            for row in out["rows"][-2:]:
                row["speedup_cache"] = res[True][0] / res[False][0]
                # the most the cache can save on counted FLOPs (the transformer re-reads only the coarser scales)
                row["flop_ratio_recompute_vs_cache"] = flops[(ns, False)] / flops[(ns, True)]
                row["max_abs_diff_cache_vs_recompute"] = diff
            log(f"  {plan.preset} cache speed-up {res[True][0] / res[False][0]:.2f}x, max |diff| {diff:.2e}")
    if plan.generate_only:
        out["generate_only"] = []
        for bs in plan.batch_sizes:
            for decode in ("sample", "expected"):
                rate = time_generate(model, query, bs, decode, plan.repeats)
                out["generate_only"].append({"decode": decode, "batch_size": bs, "spots_per_s": rate})
                log(f"  {plan.preset} generate only ({decode}, 1 draw, cache) batch {bs}: {rate:,.1f} spots/s")
    return out


# ---------------------------------------------------------------------------------------------------------- targets
def evaluate_targets(results: dict[str, Any], threads: int) -> list[dict[str, Any]]:
    out = []
    seed = results["presets"].get("seed", {})
    st2 = seed.get("training", {}).get("stage2")
    if st2:
        fr = {t: v["fraction_of_matmul"] for t, v in st2["threads"].items()}
        main = fr.get(str(threads), next(iter(fr.values())))
        detail = ", ".join(f"{100 * v:.0f}% at {t} thread(s)" for t, v in fr.items())
        out.append(
            {
                "target": f"seed preset stage-2 training (module) >= {100 * TARGET_SEED_STAGE2_FRACTION:.0f}% of the "
                "measured fp32 matmul rate",
                "measured": detail,
                "met": bool(main >= TARGET_SEED_STAGE2_FRACTION),
            }
        )
    for preset, res in results["presets"].items():
        rows = res.get("inference", {}).get("rows", [])
        ups = sorted({(r["n_samples"], r["batch_size"], r["speedup_cache"]) for r in rows if "speedup_cache" in r})
        if ups:
            ok = [u[2] >= TARGET_CACHE_SPEEDUP for u in ups]
            detail = ", ".join(f"{u[2]:.2f}x (n_samples={u[0]}, batch {u[1]})" for u in ups)
            met: bool | str = all(ok) if (all(ok) or not any(ok)) else f"partly ({sum(ok)} of {len(ok)})"
            out.append(
                {
                    "target": f"{preset} preset: KV cache >= {TARGET_CACHE_SPEEDUP}x faster than recompute",
                    "measured": detail,
                    "met": met,
                }
            )
    cpu = results["presets"].get("cpu", {}).get("inference", {})
    one = [r for r in cpu.get("rows", []) if r["n_samples"] == 1 and r["use_cache"]]
    if one:
        best = max(one, key=lambda r: r["spots_per_s"])
        need = TARGET_CPU_SPOTS_PER_S * best["gflop_per_spot"]
        detail = (
            f"{best['spots_per_s']:,.0f} spots/s (predict_expression, batch {best['batch_size']}: expected value + "
            f"1 draw, {best['gflop_per_spot']:.3f} GFLOP/spot; 2,000 spots/s would need {need:.0f} GFLOP/s)"
        )
        gen = [g for g in cpu.get("generate_only", []) if g["decode"] == "sample"]
        if gen:
            g = max(gen, key=lambda r: r["spots_per_s"])
            detail += f"; one sampled draw alone (module.generate): {g['spots_per_s']:,.0f} spots/s"
        out.append(
            {
                "target": f"cpu preset >= {TARGET_CPU_SPOTS_PER_S:,.0f} spots/s at n_samples=1",
                "measured": detail,
                "met": bool(best["spots_per_s"] >= TARGET_CPU_SPOTS_PER_S),
            }
        )
    return out


# ---------------------------------------------------------------------------------------------------------- report
def _f(x: Any, fmt: str = ".1f") -> str:
    if x is None:
        return "–"
    try:
        if np.isnan(x):
            return "–"
    except TypeError:
        return str(x)
    return format(x, fmt)


def _rate(x: Any) -> str:
    if x is None:
        return "–"
    return _f(x, ",.0f") if x >= 100 else _f(x, ".3g")


def write_markdown(results: dict[str, Any], path: Path) -> None:
    m = results["machine"]
    s = results["settings"]
    la0, la1 = results.get("load_average_before", []), results.get("load_average_after", [])
    trained = ", ".join(p for p, res in results.get("presets", {}).items() if res.get("pipeline"))
    lines = [
        "# VARST speed on a CPU (issue #3 targets)",
        "",
        f"- machine: {m['cpu_model']} ({m['machine']}, {m['cpu_capability']}), {m['cpu_count']} cores "
        f"({m['usable_cores']} usable)",
        f"- torch {m['torch']}, varst-scverse {m['varst_scverse']}, Python {m['python']}",
        f"- torch threads: {s['threads']} for the pipeline and prediction; module training rates at "
        f"{s['train_threads']} thread(s)",
        f"- command: `{results['command']}`",
        f"- date: {results['date']}; duration {results.get('seconds', float('nan')) / 60:.1f} min; peak RSS "
        f"{_f(results.get('peak_rss_gb'), '.2f')} GB",
        f"- load average (1/5/15 min) before: {la0}, after: {la1}",
        f"- data: `varst.datasets.synthetic`, {s['n_spots']} spots x {s['n_genes']} genes, {s['histology_dim']}-d "
        "histology features; prediction on a separate synthetic query",
        f"- weights: trained for {s['pipeline_epochs']} epoch(s) per stage through `VARST.train` (the pipeline run) "
        f"for the preset(s) {trained or 'none'}, untrained for the others; speed does not depend on what the weights "
        "hold",
    ]
    if s.get("smoke"):
        lines.append("- **--smoke: toy widths and sizes; these numbers measure nothing**")
    mm = results.get("matmul_gflops", {})
    if mm:
        ns = sorted({k for v in mm.values() for k in v if k != "best"}, key=int)
        lines += ["", "## fp32 matmul rate (`torch.matmul`, best of the iterations)", ""]
        lines += ["| threads | " + " | ".join(f"n={n} GFLOP/s" for n in ns) + " | best |"]
        lines += ["|---|" + "---|" * len(ns) + "---|"]
        for t, v in mm.items():
            lines.append(f"| {t} | " + " | ".join(_f(v.get(n)) for n in ns) + f" | {_f(v.get('best'))} |")
    presets = results.get("presets", {})
    if presets:
        lines += ["", "## Models", "", "| preset | stage-1 params | stage-2 params | scales | generated | tokens |"]
        lines += ["|---|---|---|---|---|---|"]
        for p, res in presets.items():
            i = res.get("model")
            if i:
                lines.append(
                    f"| {p} | {i['stage1_parameters']:,} | {i['stage2_parameters']:,} | {i['scales']} | "
                    f"{i['generated_scales']} | {i['n_generated_tokens']} of {i['n_tokens']} |"
                )
    threads = [str(t) for t in s["train_threads"]]
    lines += ["", "## Training", ""]
    lines += [
        "FLOPs per spot: forward + backward (`FlopCounterMode`). Module: loss + backward + AdamW on one batch already "
        "in memory (`_speed.module_training_rate`: the counted pass is the warm-up). Pipeline: `VARST.train` through "
        f"Lightning, one epoch, batches after the first, at {s['threads']} thread(s).",
        "",
    ]
    hdr = ["preset", "stage", "batch", "GFLOP/spot"]
    hdr += [f"module spots/s @{t}" for t in threads] + [f"GFLOP/s @{t}" for t in threads]
    hdr += [f"% matmul @{t}" for t in threads] + ["pipeline spots/s", "module/pipeline"]
    lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for p, res in presets.items():
        for stage in ("stage1", "stage2"):
            row = res.get("training", {}).get(stage)
            if not row:
                continue
            th = row["threads"]
            pipe = res.get("pipeline", {}).get(stage, {})
            pr = pipe.get("pipeline_spots_per_s")
            mod = th.get(str(s["threads"]), {}).get("module_spots_per_s")
            cells = [p, stage[-1], str(row["batch_size"]), _f(row["gflop_per_spot"], ".3g")]
            cells += [_rate(th.get(t, {}).get("module_spots_per_s")) for t in threads]
            cells += [_f(th.get(t, {}).get("gflops")) for t in threads]
            cells += [_f(100 * th[t]["fraction_of_matmul"], ".0f") + "%" if t in th else "–" for t in threads]
            cells += [_rate(pr), _f(mod / pr, ".2f") + "x" if pr and mod else "–"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Prediction", ""]
    lines += [
        "`predict_expression(query, n_samples=..., use_cache=..., batch_size=..., decode='expected')`, best of the "
        "repeats, whole call (inputs, neighbours, generation, decode). With `n_samples=1` it runs the expected-value "
        "generation **and** one sampled generation (two generations per spot; reported as is). GFLOP/spot counted by "
        "`FlopCounterMode` over the same call (matmuls and attention only; sampling, softmax and norms are not "
        "counted). Speed-up = cached / recomputed spots/s; FLOP ratio = recomputed / cached GFLOP per spot (what the "
        "cache can save at most); max |diff| between the two point predictions.",
        "",
    ]
    hdr = ["preset", "query spots", "n_samples", "cache", "batch", "spots/s", "GFLOP/spot", "GFLOP/s", "speed-up"]
    hdr += ["FLOP ratio", "max abs diff"]
    lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for p, res in presets.items():
        inf = res.get("inference", {})
        for r in inf.get("rows", []):
            # speed-up and difference belong to the pair; shown once, on the cached row
            up = _f(r.get("speedup_cache"), ".2f") + "x" if r["use_cache"] else ""
            fr = _f(r.get("flop_ratio_recompute_vs_cache"), ".2f") + "x" if r["use_cache"] else ""
            diff = _f(r.get("max_abs_diff_cache_vs_recompute"), ".1e") if r["use_cache"] else ""
            lines.append(
                f"| {p} | {inf['query_spots']} | {r['n_samples']} | {'KV cache' if r['use_cache'] else 'recompute'} "
                f"| {r['batch_size']} | {_rate(r['spots_per_s'])} | {_f(r['gflop_per_spot'], '.3g')} | "
                f"{_f(r['gflops'])} | {up} | {fr} | {diff} |"
            )
    gen_rows = [(p, g) for p, res in presets.items() for g in res.get("inference", {}).get("generate_only", [])]
    if gen_rows:
        lines += ["", "`module.generate` alone (one generation per spot, KV cache, inputs already tensors):", ""]
        lines += ["| preset | decode | batch | spots/s |", "|---|---|---|---|"]
        lines += [f"| {p} | {g['decode']} | {g['batch_size']} | {_rate(g['spots_per_s'])} |" for p, g in gen_rows]
    pas = [(p, res["inference"]["passes"]) for p, res in presets.items() if "passes" in res.get("inference", {})]
    if pas:
        lines += ["", "Sequential transformer passes per spot and generation (read from the model):", ""]
        lines += [
            "| preset | generated scales | passes, KV cache | tokens through the transformer, cache / recompute "
            "| token-by-token passes (generated / all tokens) |",
            "|---|---|---|---|---|",
        ]
        for p, v in pas:
            lines.append(
                f"| {p} | {v['generated_scales']} | {v['passes_per_generation_cached']} | "
                f"{v['tokens_through_transformer_cached']} / {v['tokens_through_transformer_recompute']} | "
                f"{v['passes_token_by_token_generated']} / {v['passes_token_by_token_all_tokens']} |"
            )
        lines.append("")
        lines.append("`predict_expression` with `n_samples >= 1` runs two generations per spot, so twice the passes.")
    tg = results.get("targets", [])
    if tg:
        lines += ["", "## Targets (issue #3)", "", "| target | measured | met |", "|---|---|---|"]
        for t in tg:
            met = t["met"] if isinstance(t["met"], str) else ("met" if t["met"] else "not met")
            lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    if results.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e['where']}: `{e['error']}`" for e in results["errors"]]
    lines += ["", "## Notes", "", "- (runner: add notes here)", ""]
    path.write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="toy sizes and widths, 1 thread, < 1 min (overrides the size options); temp dir output",
    )
    p.add_argument("--out", default=None, help="output directory (default benchmarks/results; --smoke: a temp dir)")
    p.add_argument("--presets", default="cpu,seed")
    p.add_argument("--n_spots", type=int, default=3000, help="training spots (pipeline epoch and module batches)")
    p.add_argument("--n_genes", type=int, default=200, help="200 genes -> 1 + 8 + 32 + 200 = 241 tokens")
    p.add_argument("--histology_dim", type=int, default=1024, help="1024 = UNI's width")
    p.add_argument("--n_sections", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the pipeline and prediction")
    p.add_argument("--train_threads", default="2,1", help="thread counts of the module training rates and matmul")
    p.add_argument("--matmul_ns", default="1024,2048", help="matmul sizes; the best rate is the reference")
    p.add_argument("--matmul_iters", type=int, default=10)
    p.add_argument("--batch1", type=int, default=256, help="stage-1 batch (both presets)")
    p.add_argument("--batch2", type=int, default=64, help="stage-2 batch of the cpu preset")
    p.add_argument(
        "--seed_batch2",
        type=int,
        default=16,
        help="stage-2 batch of the seed preset (~95 GFLOP/spot: batch 64 is about a minute per step on 2 cores)",
    )
    p.add_argument("--steps", type=int, default=10, help="timed module steps, cpu preset (after the counted pass)")
    p.add_argument("--seed_steps", type=int, default=2, help="timed module steps, seed preset")
    p.add_argument(
        "--pipeline_presets", default="cpu", help="presets trained through VARST.train (seed: about an hour on 2 cores)"
    )
    p.add_argument("--pipeline_epochs", type=int, default=1)
    p.add_argument("--n_query", type=int, default=2048, help="query spots, cpu preset")
    p.add_argument("--batch_sizes", default="64,512", help="prediction batch sizes, cpu preset")
    p.add_argument("--n_samples", default="0,1", help="predict_expression n_samples values, cpu preset")
    p.add_argument("--repeats", type=int, default=2, help="timed predict calls per setting (best), cpu preset")
    p.add_argument("--flop_spots", type=int, default=64, help="spots of the FLOP-counted predict call, cpu preset")
    p.add_argument("--seed_query", type=int, default=64, help="query spots, seed preset (~30 GFLOP per spot)")
    p.add_argument("--seed_batch_sizes", default="64")
    p.add_argument("--seed_n_samples", default="0")
    p.add_argument("--seed_repeats", type=int, default=1)
    p.add_argument("--seed_flop_spots", type=int, default=4)
    p.add_argument("--generate_only_presets", default="cpu", help="also time module.generate alone (one draw)")
    args = p.parse_args(argv)
    if args.smoke:
        args.n_spots, args.n_genes, args.histology_dim, args.n_sections = 240, 48, 32, 2
        args.threads, args.train_threads = 1, "1"
        args.matmul_ns, args.matmul_iters = "128,256", 2
        args.batch1, args.batch2, args.seed_batch2, args.steps, args.seed_steps = 64, 16, 8, 1, 1
        args.n_query, args.seed_query, args.batch_sizes, args.seed_batch_sizes = 64, 16, "16,64", "16"
        args.n_samples, args.seed_n_samples, args.repeats, args.seed_repeats = "0,1", "0,1", 1, 1
        args.flop_spots, args.seed_flop_spots = 16, 4
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    _quiet()
    t_start = time.perf_counter()
    if args.out:
        out_dir = Path(args.out)
    elif args.smoke:
        out_dir = Path(tempfile.mkdtemp(prefix="varst_speed_cpu_"))
    else:
        out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "speed_cpu.json", out_dir / "speed_cpu.md"
    thread_counts = _ints(args.train_threads)
    settings = {**vars(args), "train_threads": thread_counts}
    results: dict[str, Any] = {
        "command": shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", __file__, *argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average_before": S.load_average(),
        "settings": settings,
        "matmul_gflops": {},
        "presets": {},
        "targets": [],
        "errors": [],
    }
    m = results["machine"]
    log(
        f"{m['cpu_model']} | {m['cpu_count']} cores | torch {m['torch']} ({m['cpu_capability']}) | load "
        f"{results['load_average_before']} | out {out_dir}"
    )

    def save() -> None:  # after every section, so that a run cut short keeps what it measured
        results["seconds"] = time.perf_counter() - t_start
        results["peak_rss_gb"] = S.peak_rss_gb()
        json_path.write_text(json.dumps(results, indent=1, default=str))

    def guarded(where: str, fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except Exception as err:  # noqa: BLE001 - keep measuring the rest, report the failure
            traceback.print_exc()
            results["errors"].append({"where": where, "error": f"{type(err).__name__}: {err}"})
            log(f"FAILED {where}: {type(err).__name__}: {err}")
            return None

    # 1. matmul reference
    def matmul(t: int) -> None:
        row = {str(n): S.matmul_gflops(n, iters=args.matmul_iters, threads=t) for n in _ints(args.matmul_ns)}
        row["best"] = max(row.values())
        results["matmul_gflops"][str(t)] = row
        sizes = ", ".join(f"n={k}: {v:.1f}" for k, v in row.items() if k != "best")
        log(f"fp32 matmul, {t} thread(s): {sizes} GFLOP/s (best {row['best']:.1f})")

    for t in thread_counts:
        guarded(f"matmul {t} thread(s)", matmul, t)
    save()

    # data: one training set, one query (no expression needed for prediction)
    torch.set_num_threads(args.threads)
    adata = varst.datasets.synthetic(
        n_spots=args.n_spots,
        n_genes=args.n_genes,
        n_sections=args.n_sections,
        histology_dim=args.histology_dim,
        seed=0,
    )
    varst.VARST.setup_anndata(adata, layer="counts", batch_key="section")
    plans = build_plans(args)
    n_query = max(p.n_query for p in plans) if plans else 1
    query_all = varst.datasets.synthetic(
        n_spots=n_query, n_genes=args.n_genes, n_sections=2, histology_dim=args.histology_dim, seed=1
    )

    for plan in plans:
        res: dict[str, Any] = {}
        results["presets"][plan.preset] = res
        t0 = time.perf_counter()
        log(f"== preset {plan.preset}")
        torch.set_num_threads(args.threads)
        model = guarded(
            f"{plan.preset}: build",
            varst.VARST,
            adata,
            preset=plan.preset,
            vqvae_config=plan.vqvae_config,
            var_config=plan.var_config,
            seed=0,
        )
        if model is None:
            save()
            continue
        info = model.get_model_info()
        res["model"] = {
            k: info[k]
            for k in (
                "stage1_parameters",
                "stage2_parameters",
                "vocab_size",
                "scales",
                "generated_scales",
                "n_tokens",
                "n_generated_tokens",
            )
        }
        log(f"  {model}")
        if plan.pipeline:
            res["pipeline"] = {}
            for stage, bs in ((1, plan.batch1), (2, plan.batch2)):
                r = guarded(
                    f"{plan.preset}: pipeline stage {stage}",
                    pipeline_run,
                    model,
                    stage,
                    bs,
                    args.pipeline_epochs,
                    args.threads,
                )
                if r is not None:
                    res["pipeline"][f"stage{stage}"] = r
                    log(
                        f"  {plan.preset} stage {stage} pipeline (VARST.train), batch {bs}: "
                        f"{r['pipeline_spots_per_s']:.1f} spots/s over {r['timed_batches']} batches "
                        f"[train() {r['train_call_wall_s']:.0f}s]"
                    )
                save()
        if not model.module.stage2_trained:
            mark_trained(model)
        mm = results["matmul_gflops"]
        tr = guarded(f"{plan.preset}: training rates", training_rates, model, plan, thread_counts, mm)
        if tr is not None:
            res["training"] = tr
        save()
        query = query_all[: plan.n_query].copy()
        inf = guarded(f"{plan.preset}: prediction", inference, model, query, plan, args.threads)
        if inf is not None:
            res["inference"] = inf
        res["seconds"] = time.perf_counter() - t0
        del model
        gc.collect()
        save()
        log(f"== preset {plan.preset} done in {res['seconds']:.0f}s")

    results["targets"] = guarded("targets", evaluate_targets, results, args.threads) or []
    results["load_average_after"] = S.load_average()
    save()
    write_markdown(results, md_path)
    for t in results["targets"]:
        met = t["met"] if isinstance(t["met"], str) else ("met" if t["met"] else "NOT met")
        log(f"target: {t['target']}: {met} ({t['measured']})")
    log(f"wrote {json_path} and {md_path} in {results['seconds'] / 60:.1f} min; load {results['load_average_after']}")
    return results


if __name__ == "__main__":
    main()
