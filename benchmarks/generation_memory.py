"""Peak memory of generating and decoding one batch of spots with a wide gene panel, with and without the cap.

Each configuration runs in a fresh process (``ru_maxrss`` only grows), on an untrained ``cpu``-preset module: the
memory of generation depends on the shapes, not on the weights. ``capped`` generates the same sequences in batches
of :func:`varst_scverse.model._memory.generation_sequences_that_fit`, as ``predict_expression`` does.

Usage: ``python benchmarks/generation_memory.py [--genes 2000 10000] [--sequences 256 512]`` (prints a markdown table).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import gc, json, resource, sys, time
import torch
from varst_scverse.model._memory import generation_sequences_that_fit
from varst_scverse.module import TwoStageVARST

torch.set_num_threads(1)
genes, seqs, capped = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
module = TwoStageVARST(num_genes=genes, histology_dim=156, preset="cpu").eval()
step = generation_sequences_that_fit(genes, module.vqvae_config["embed_dim"]) if capped else seqs
h, c = torch.randn(seqs, 156), torch.rand(seqs, 2)
gc.collect()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
with torch.inference_mode():
    for i in range(0, seqs, step):
        module.generate(h[i : i + step], c[i : i + step], h[i : i + step], decode="expected")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"batch": min(step, seqs), "peak_mb": (peak - before) / 1024, "seconds": time.perf_counter() - t0}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--genes", type=int, nargs="+", default=[2000, 10000])
    p.add_argument("--sequences", type=int, nargs="+", default=[512])
    args = p.parse_args()
    print("| genes | sequences | batch | peak MB above the loaded model | seconds |")
    print("|---|---|---|---|---|")
    for genes in args.genes:
        for seqs in args.sequences:
            for capped in (False, True):
                out = subprocess.run(
                    [sys.executable, "-c", _CHILD, str(genes), str(seqs), "1" if capped else "0"],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                label = f"{r['batch']} (capped)" if capped else str(r["batch"])
                print(f"| {genes:,} | {seqs} | {label} | {r['peak_mb']:.0f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
