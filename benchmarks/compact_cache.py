"""Copy the benchmark's cache to another machine in a small form: only the genes the runs need.

The embedded HER2ST AnnData in the benchmark cache holds every gene (about 240 MB). A run of the ablations on another
machine (the GPU machine of ``benchmarks/device_ablations.sh``) needs only the genes of the folds' gene sets, which
are ranked here, on all genes, and stored beside it in ``genesets_v1.json``; the copy keeps the library size over all
genes (``obs["varst_total_counts"]``), so both targets are unchanged.

    python benchmarks/compact_cache.py --out .device_cache                   # top-50 / top-250 genes of every fold
    python benchmarks/compact_cache.py --out .device_cache --genesets top250,detected10

Only the ``depth_oracle`` yardstick, which sums the counts of the genes present, differs on such a copy; ablation
results do not use it.
"""

from __future__ import annotations

import argparse
import shutil
import warnings
from pathlib import Path

import numpy as np

from varst_scverse._benchmark import _data as D


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the small cache (becomes --cache_dir there)")
    p.add_argument("--cache_dir", default=None, help="the full benchmark cache (default: the benchmark's)")
    p.add_argument("--genesets", default="top50,top250", help="gene sets whose genes are kept")
    args = p.parse_args()
    cache = Path(args.cache_dir) if args.cache_dir else D.default_cache_dir()
    adata = D.load_embedded(cache_dir=cache)
    keep: set[str] = set()
    for split in ("within_C", "cross_B4"):
        for fold in D.folds(split):
            sets = D.gene_sets(adata, fold, cache_dir=cache)
            for name in args.genesets.split(","):
                keep.update(sets[name])
    cols = np.flatnonzero(adata.var_names.isin(sorted(keep)))
    small = adata[:, cols].copy()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"her2st_embedded_all_v{D._CACHE_VERSION}.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small.write_h5ad(path, compression="gzip")
    shutil.copy(cache / D.GENESETS_FILE, out / D.GENESETS_FILE)
    print(f"wrote {path} ({small.n_obs} spots x {small.n_vars} genes, {path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
