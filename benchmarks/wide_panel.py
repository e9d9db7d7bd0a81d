"""Stage-1 step time and memory on a wide gene panel, one position per gene against ``gene_positions``.

Each configuration runs in a fresh process (``ru_maxrss`` only grows) with one torch thread: a ``cpu``-preset
tokenizer takes optimizer steps on random log-scale profiles (the cost depends on the shapes, not on the values), and
the table gives the seconds per step (mean of the timed steps after one warm-up), the seconds per spot and the peak
RSS above the built model.

Usage: ``python benchmarks/wide_panel.py [--runs 250:0:256 10000:256:256 10000:0:8] [--steps 3]``, each run
``genes:positions:batch`` with positions 0 = one per gene (prints a markdown table).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import gc, json, resource, sys, time
import torch
from varst_scverse.module import TwoStageVARST

torch.set_num_threads(1)
genes, positions, batch, steps = (int(v) for v in sys.argv[1:5])
module = TwoStageVARST(
    num_genes=genes, histology_dim=152, preset="cpu", vqvae_config={"gene_positions": positions or None}
)
vq = module.vqvae.train()
opt = torch.optim.AdamW(vq.parameters(), lr=1e-3)
y = torch.log1p(torch.poisson(torch.rand(batch, genes) * 3))
gc.collect()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for i in range(steps + 1):
    t0 = time.perf_counter()
    loss = vq(y)["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    if i:
        times.append(time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"positions": module.num_positions, "tokens": module.n_tokens, "peak_mb": (peak - before) / 1024,
                  "step_s": sum(times) / len(times)}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=["250:0:256", "10000:256:256", "10000:0:8"])
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up)")
    args = p.parse_args()
    print("| genes | positions | tokens | batch | s / step | ms / spot | peak MB above the built model |")
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        genes, positions, batch = run.split(":")
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, genes, positions, batch, str(args.steps)],
            check=True,
            capture_output=True,
            text=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"| {int(genes):,} | {r['positions']:,} | {r['tokens']} | {batch} | {r['step_s']:.2f} | "
            f"{1000 * r['step_s'] / int(batch):.1f} | {r['peak_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
