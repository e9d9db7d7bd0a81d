"""GPU check: train both stages of the seed preset on HER2ST-sized synthetic data and report throughput.

Data: ``varst.datasets.synthetic`` sized like HER2ST (13,000 spots x 200 genes, 1024-d histology as from UNI).
For each stage it runs

* the **pipeline**: ``VARST.train`` through Lightning (DataLoader, logging, the real training step) for
  ``--steps`` optimizer steps in ``--precision`` (bf16-mixed by default), timed after ``--warmup`` steps;
* the **module** alone: the same loss, backward and AdamW step on batches already on the device, which shows how much
  of the card the model itself can use and how much the pipeline around it costs.

FLOPs per spot come from ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward pass (matmuls,
attention); achieved TFLOP/s = FLOPs per spot x spots/s, compared with the card's bf16 matmul rate measured here
with a ``torch.matmul`` loop. ``--smoke`` runs everything at toy size on the CPU (for CI / a laptop).

Run ``benchmarks/gpu_check.sh`` (or ``python benchmarks/gpu_check.py --help``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import lightning.pytorch as lpl
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import varst_scverse as varst


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, n: int, iters: int, dtype=torch.bfloat16) -> float:
    """Measured dense matmul rate (TFLOP/s) of ``n x n`` @ ``n x n`` in ``dtype``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        torch.matmul(a, b)
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


class StepTimer(lpl.Callback):
    """Wall time and spots of the optimizer steps after ``warmup`` (synchronised only at the two ends)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.t1, self.spots, self.steps = warmup, None, None, 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        if self.t0 is not None:
            self.spots += batch["expression"].shape[0]
            self.steps += 1
        elif trainer.global_step >= self.warmup:
            sync(pl_module.device)
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: D102
        sync(pl_module.device)
        self.t1 = time.perf_counter()

    def rate(self) -> tuple[float, float]:
        secs = (self.t1 - self.t0) if self.t0 is not None and self.steps else float("nan")
        return self.spots / secs, self.steps / secs


def stage_inputs(model: varst.VARST, device: torch.device, stage: int) -> dict[str, torch.Tensor]:
    """Every spot's training inputs of ``stage`` as tensors on ``device``."""
    model.module.to(device)
    y = torch.as_tensor(model._target(model.adata), dtype=torch.float32)
    out = {"expression": y.to(device)}
    if stage == 2:
        sp = model._spatial_inputs(model.adata)
        out["histology"] = torch.as_tensor(np.nan_to_num(sp["histology"]), dtype=torch.float32).to(device)
        out["coords"] = torch.as_tensor(sp["coords"], dtype=torch.float32).to(device)
        with torch.no_grad():
            out["tokens"] = torch.cat([model.module.tokenize(c) for c in out["expression"].split(4096)])
    return out


def loss_fn(module, stage: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if stage == 1:
        return module.stage1_loss(batch["expression"])["loss"]
    return module.stage2_loss(batch["expression"], batch["histology"], batch["coords"], None, batch["tokens"])["loss"]


def module_run(module, stage: int, data, batch_size: int, steps: int, warmup: int, bf16: bool, device):
    """Spots/s and FLOPs per spot of the bare module: loss, backward, AdamW, on batches already on the device."""
    module.to(device).train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    n = data["expression"].shape[0]
    gen = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def batch():
        idx = torch.randint(n, (batch_size,), device=device, generator=gen)
        return {k: v[idx] for k, v in data.items()}

    counter = FlopCounterMode(display=False)
    with counter, autocast:
        loss_fn(module, stage, batch()).backward()
    opt.zero_grad(set_to_none=True)
    flops_per_spot = counter.get_total_flops() / batch_size
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        b = batch()
        with autocast:
            loss = loss_fn(module, stage, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    secs = time.perf_counter() - t0
    module.cpu()
    return steps * batch_size / secs, flops_per_spot


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy size on the CPU (checks the script, measures nothing)")
    p.add_argument("--n_spots", type=int, default=13_000)
    p.add_argument("--n_genes", type=int, default=200)
    p.add_argument("--histology_dim", type=int, default=1024)
    p.add_argument("--steps", type=int, default=300, help="timed optimizer steps per stage and mode")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    p.add_argument("--batch_size1", type=int, default=256)
    p.add_argument("--batch_size2", type=int, default=64)
    p.add_argument("--precision", default="bf16-mixed", choices=("bf16-mixed", "32"))
    p.add_argument("--matmul_n", type=int, default=8192)
    p.add_argument("--matmul_iters", type=int, default=50)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    preset, vq, var = "seed", None, None  # --smoke: the seed preset's code paths at toy widths
    if args.smoke:
        args.n_spots, args.n_genes, args.histology_dim = 300, 48, 32
        args.steps, args.warmup, args.batch_size1, args.batch_size2 = 3, 1, 32, 16
        args.matmul_n, args.matmul_iters = 256, 3
        vq = {"vocab_size": 64, "embed_dim": 16, "hidden_dim": 32, "gene_mixing_dim": 16}
        var = {"embed_dim": 32, "num_heads": 2, "num_layers": 1, "feedforward_dim": 64, "condition_embed_dim": 32}
        torch.set_num_threads(1)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    bf16 = args.precision == "bf16-mixed"
    print(f"device: {name} | torch {torch.__version__} | varst-scverse {varst.__version__}", flush=True)
    if not cuda and not args.smoke:
        print("WARNING: no CUDA device; measuring the CPU (use --smoke for a quick check)", flush=True)

    peak = matmul_tflops(device, args.matmul_n, args.matmul_iters)
    print(f"measured bf16 matmul ({args.matmul_n}^3): {peak:.1f} TFLOP/s", flush=True)

    t0 = time.perf_counter()
    adata = varst.datasets.synthetic(
        n_spots=args.n_spots, n_genes=args.n_genes, histology_dim=args.histology_dim, n_sections=4, seed=0
    )
    varst.VARST.setup_anndata(adata, layer="counts", batch_key="section")
    model = varst.VARST(adata, preset=preset, vqvae_config=vq, var_config=var)
    # After stage 2, VARST.train calibrates the observation noise with 1 expected + 8 sampled generations of every
    # training spot, on the CPU (Lightning hands the module back there): hours for 13,000 spots and ~94M parameters,
    # and no part of the training throughput measured here. Skip it.
    model._calibrate_noise = lambda *a, **k: None
    print(f"data + model: {time.perf_counter() - t0:.1f}s | {model}", flush=True)
    info = model.get_model_info()
    results: dict = {
        "device": name,
        "torch": torch.__version__,
        "precision": args.precision,
        "matmul_bf16_tflops": peak,
        "n_spots": args.n_spots,
        "n_genes": args.n_genes,
        "histology_dim": args.histology_dim,
        "parameters": {k: info[k] for k in ("stage1_parameters", "stage2_parameters")},
        "stages": {},
    }

    def save() -> None:  # after every stage, so that a run cut short still leaves what it measured
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))

    save()
    for stage, bs in ((1, args.batch_size1), (2, args.batch_size2)):
        timer = StepTimer(args.warmup)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        model.train(
            stage=stage,
            max_epochs=100_000,
            max_steps=args.warmup + args.steps,
            batch_size=bs,
            lr=1e-4,
            train_size=1.0,
            accelerator="gpu" if cuda else "cpu",
            devices=1,
            precision=args.precision,
            num_workers=args.num_workers,
            pin_memory=cuda,
            enable_progress_bar=False,
            callbacks=[timer],
        )
        wall = time.perf_counter() - t0
        pipe_spots, pipe_steps = timer.rate()
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
        results["stages"][f"stage{stage}"] = {
            "batch_size": bs,
            "train_wall_s": wall,
            "pipeline_spots_per_s": pipe_spots,
            "pipeline_steps_per_s": pipe_steps,
            "max_memory_gib": mem,
        }
        save()
        print(f"stage {stage} pipeline: {pipe_spots:,.0f} spots/s, wall {wall:.0f}s", flush=True)
        data = stage_inputs(model, device, stage)
        mod_spots, flops = module_run(model.module, stage, data, bs, args.steps, args.warmup, bf16, device)
        del data
        row = {
            "batch_size": bs,
            "train_wall_s": wall,
            "gflop_per_spot": flops / 1e9,
            "pipeline_spots_per_s": pipe_spots,
            "pipeline_steps_per_s": pipe_steps,
            "pipeline_tflops": flops * pipe_spots / 1e12,
            "module_spots_per_s": mod_spots,
            "module_tflops": flops * mod_spots / 1e12,
            "max_memory_gib": mem,
        }
        row["pipeline_mfu"] = row["pipeline_tflops"] / peak
        row["module_mfu"] = row["module_tflops"] / peak
        results["stages"][f"stage{stage}"] = row
        save()
        print(
            f"stage {stage}: batch {bs}, {flops / 1e9:.3f} GFLOP/spot (fwd+bwd) | pipeline {pipe_spots:,.0f} spots/s "
            f"({pipe_steps:.1f} steps/s) = {row['pipeline_tflops']:.2f} TFLOP/s ({100 * row['pipeline_mfu']:.1f}% of "
            f"matmul) | module only {mod_spots:,.0f} spots/s = {row['module_tflops']:.2f} TFLOP/s "
            f"({100 * row['module_mfu']:.1f}%) | peak mem {mem:.1f} GiB | wall {wall:.0f}s",
            flush=True,
        )
    if args.out:
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
