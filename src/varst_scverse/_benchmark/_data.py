"""HER2ST for the benchmark: the embedded AnnData (cached), the splits, the gene sets and the truth."""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
from anndata import AnnData

from .._constants import ADATA_KEYS
from .._targets import expression_target

C_SECTIONS: tuple[str, ...] = ("C2", "C3", "C4", "C5", "C6")
B4 = "B4"
IMAGED: tuple[str, ...] = (*C_SECTIONS, B4)
HIST_KEY = ADATA_KEYS.HISTOLOGY  # the built-in morphology descriptor
RGB_KEY = "X_rgb"  # the 6-d RGB mean/std control
FEATURES = {"morphology": HIST_KEY, "rgb": RGB_KEY}
TARGETS: tuple[str, ...] = ("log1p", "cp10k")
#: gene sets, chosen on the training sections of each fold only
GENESETS: tuple[str, ...] = ("top50", "top250", "detected10")
CACHE_ENV = "VARST_BENCHMARK_CACHE"
_CACHE_VERSION = 1
GENESETS_FILE = "genesets_v1.json"


@dataclass(frozen=True)
class Fold:
    """One train/test split: stage 2 and the baselines train on ``train``; the tokenizer on ``tokenizer``."""

    split: str  # "within_C" or "cross_B4"
    test: str
    train: tuple[str, ...]

    def tokenizer_sections(self, all_sections, mode: str = "all") -> tuple[str, ...]:
        """Sections the stage-1 tokenizer learns from.

        ``"all"``: every section with expression except the test section and the test patient's other sections
        that are not training sections (cross-patient: the whole test patient is held out); ``"train"``: the
        training sections only.
        """
        if mode == "train":
            return self.train
        patient = self.test[0]
        return tuple(s for s in all_sections if s != self.test and (s[0] != patient or s in self.train))


def folds(split: str, quick: bool = False) -> list[Fold]:
    """The folds of ``"within_C"`` (leave one of C2–C6 out) or ``"cross_B4"`` (train C2–C6, test B4).

    ``quick``: the first within-C fold only; cross_B4 trains on C2–C4.
    """
    if split == "within_C":
        out = [Fold("within_C", s, tuple(c for c in C_SECTIONS if c != s)) for s in C_SECTIONS]
        return out[:1] if quick else out
    if split == "cross_B4":
        # quick: three training sections instead of five, to keep the smoke run (and its test) short
        return [Fold("cross_B4", B4, C_SECTIONS[:3] if quick else C_SECTIONS)]
    raise ValueError(f"Unknown split {split!r}; use 'within_C' or 'cross_B4'.")


def default_cache_dir() -> Path:
    """``$VARST_BENCHMARK_CACHE``, else ``<varst-scverse cache>/benchmark`` (never inside the repository)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    from ..datasets._paths import default_cache_dir as data_cache

    return data_cache() / "benchmark"


def load_embedded(data_dir=None, cache_dir=None, all_sections: bool = True, log=print) -> AnnData:
    """HER2ST with morphology and RGB features on the six imaged sections (NaN rows elsewhere), cached as h5ad.

    Parameters
    ----------
    data_dir
        Folder holding ``her2st/`` (see :func:`varst_scverse.datasets.her2st`).
    cache_dir
        Where the embedded AnnData is kept between runs (default :func:`default_cache_dir`).
    all_sections
        All 36 sections (the tokenizer learns from every section with expression) or only the six imaged ones.
    """
    import varst_scverse as varst

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = f"her2st_embedded_{'all' if all_sections else 'imaged'}_v{_CACHE_VERSION}.h5ad"
    path = cache / name
    if path.is_file():
        t0 = time.time()
        adata = ad.read_h5ad(path)
        log(f"read the cached embedded HER2ST {path} ({adata.n_obs} spots) in {time.time() - t0:.1f}s")
        return adata
    t0 = time.time()
    adata = varst.datasets.her2st(sections=None if all_sections else list(IMAGED), data_dir=data_dir)
    imaged = adata[adata.obs[ADATA_KEYS.SECTION].isin(IMAGED).to_numpy()].copy()
    varst.pp.embed_histology(imaged, key_added=HIST_KEY, show_progress=False)
    varst.pp.embed_histology(imaged, encoder="rgb", key_added=RGB_KEY, show_progress=False)
    rows = adata.obs_names.get_indexer(imaged.obs_names)
    for key in (HIST_KEY, RGB_KEY):
        feat = np.full((adata.n_obs, imaged.obsm[key].shape[1]), np.nan, dtype=np.float32)
        feat[rows] = imaged.obsm[key]
        adata.obsm[key] = feat
    adata.obs[ADATA_KEYS.TOTAL_COUNTS] = np.asarray(adata.layers[ADATA_KEYS.COUNTS_LAYER].sum(1)).reshape(-1)
    adata.X = None  # the counts stay in layers["counts"]
    adata.uns = {}  # images are not needed once embedded
    adata.obs[ADATA_KEYS.LABEL] = adata.obs[ADATA_KEYS.LABEL].astype(str)
    log(f"read and embedded HER2ST ({adata.n_obs} spots, {adata.n_vars} genes) in {time.time() - t0:.1f}s")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_h5ad(tmp)
    tmp.replace(path)
    log(f"cached it in {path}")
    return adata


def section_mask(adata: AnnData, sections) -> np.ndarray:
    """Boolean mask of the spots in ``sections``."""
    return adata.obs[ADATA_KEYS.SECTION].astype(str).isin(list(sections)).to_numpy()


def gene_sets(adata: AnnData, fold: Fold, quick: bool = False, cache_dir=None) -> dict[str, list[str]]:
    """Top-50 / top-250 highly variable genes and every gene detected in ≥ 10% of the fold's training spots.

    With ``cache_dir``, the sets are kept in ``genesets_v1.json`` there: later runs (and copies of the cache on other
    machines, whose embedded AnnData may hold only the genes these sets need) reuse them instead of ranking again.
    """
    path = Path(cache_dir) / GENESETS_FILE if cache_dir is not None else None
    key = f"{fold.split}|{fold.test}|{','.join(fold.train)}|{'quick' if quick else 'full'}"
    stored = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    if key not in stored:
        stored[key] = _rank_gene_sets(adata, fold)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(stored))
            tmp.replace(path)
    out = stored[key]
    return {"top50": out["top50"]} if quick else dict(out)


def _rank_gene_sets(adata: AnnData, fold: Fold) -> dict[str, list[str]]:
    import varst_scverse as varst

    train = adata[section_mask(adata, fold.train)]
    view = ad.AnnData(
        obs=train.obs[[]].copy(),
        var=train.var[[]].copy(),
        layers={ADATA_KEYS.COUNTS_LAYER: train.layers[ADATA_KEYS.COUNTS_LAYER]},
    )
    top = varst.pp.select_genes(view, n_top=250, min_frac=0.1)
    rank = view.var[ADATA_KEYS.HVG_RANK]
    detected = list(rank[rank.notna()].sort_values(kind="stable").index.astype(str))
    return {"top50": top[:50], "top250": top, "detected10": detected}


def truth(adata: AnnData, fold: Fold, genes: list[str], target: str) -> np.ndarray:
    """Observed expression of the test section on the target's scale (library size over all genes)."""
    rows = np.flatnonzero(section_mask(adata, [fold.test]))
    col = adata.var_names.get_indexer(genes)
    counts = adata.layers[ADATA_KEYS.COUNTS_LAYER][rows][:, col]
    total = adata.obs[ADATA_KEYS.TOTAL_COUNTS].to_numpy()[rows]
    return expression_target(counts, target, total_counts=total)


def query_without_counts(adata: AnnData, section: str) -> AnnData:
    """The test section as the model sees it: features, coordinates and section, no counts."""
    q = adata[section_mask(adata, [section])]
    query = ad.AnnData(obs=q.obs[[ADATA_KEYS.SECTION, ADATA_KEYS.PATIENT]].copy())
    for key in (HIST_KEY, RGB_KEY, ADATA_KEYS.SPATIAL):
        query.obsm[key] = np.asarray(q.obsm[key])
    return query


def test_with_counts(adata: AnnData, fold: Fold, genes: list[str]) -> AnnData:
    """The test section's counts of ``genes`` (with the all-gene library size), for tokenizer-ceiling diagnostics."""
    q = adata[section_mask(adata, [fold.test]), genes]
    out = ad.AnnData(obs=q.obs[[ADATA_KEYS.SECTION, ADATA_KEYS.TOTAL_COUNTS]].copy(), var=q.var[[]].copy())
    out.layers[ADATA_KEYS.COUNTS_LAYER] = q.layers[ADATA_KEYS.COUNTS_LAYER].copy()
    return out
