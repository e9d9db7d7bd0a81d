"""The HER2-positive breast cancer legacy-ST study (Andersson et al. 2021, CC BY 4.0)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import ADATA_KEYS
from ._paths import default_cache_dir, resolve_data_dir
from ._st_legacy import ARRAY_X, ARRAY_Y, read_st_legacy

#: the 36 sections with counts: patients A–D six each, E–H three each
HER2ST_SECTIONS: tuple[str, ...] = tuple(
    f"{p}{i}"
    for p, n in (("A", 6), ("B", 6), ("C", 6), ("D", 6), ("E", 3), ("F", 3), ("G", 3), ("H", 3))
    for i in range(1, n + 1)
)
#: the 785-gene panel of HisToGene / Hist2ST, selectable with ``genes="hist2st"``
HIST2ST_PANEL = "hist2st"
_HIST2ST_FILE = Path("gene-lists") / "hist2st_her2st_785genes.npy"
_SECTION_RE = re.compile(r"^[A-Z]\d+$")


def _section_files(root: Path, section: str) -> tuple[Path, Path, Path | None, Path | None]:
    counts = root / "ST-cnts" / f"{section}.tsv.gz"
    spots = root / "ST-spotfiles" / f"{section}_selection.tsv"
    img_dir = root / "ST-imgs" / section[0] / section
    images = sorted(img_dir.glob("*.jpg")) if img_dir.is_dir() else []
    labels = root / "ST-pat" / "lbl" / f"{section}_labeled_coordinates.tsv"
    return counts, spots, (images[0] if images else None), (labels if labels.is_file() else None)


def _read_labels(path: Path) -> pd.Series:
    """Pathologist labels indexed by the (round(x), round(y)) array position."""
    lab = pd.read_csv(path, sep="\t", engine="c")
    lab = lab.dropna(subset=["x", "y", "label"])
    keys = pd.MultiIndex.from_arrays([np.round(lab["x"]).astype(np.int64), np.round(lab["y"]).astype(np.int64)])
    out = pd.Series(lab["label"].astype(str).to_numpy(), index=keys)
    return out[~out.index.duplicated(keep="first")]


def _hist2st_genes(root: Path) -> list[str]:
    path = root / _HIST2ST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"The HisToGene/Hist2ST gene panel is missing: {path}")
    return [str(g) for g in np.load(path, allow_pickle=False)]


def _read_section(root: Path, section: str, genes: list[str] | None) -> AnnData:
    counts, spots, image, labels = _section_files(root, section)
    adata = read_st_legacy(counts, spots, image=image, library_id=section, genes=genes)
    adata.obs[ADATA_KEYS.PATIENT] = section[0]
    label = pd.Series(np.nan, index=adata.obs_names, dtype=object)
    if labels is not None:
        lab = _read_labels(labels)
        keys = list(zip(adata.obs[ARRAY_X].tolist(), adata.obs[ARRAY_Y].tolist()))
        hit = lab.reindex(pd.MultiIndex.from_tuples(keys)).to_numpy()
        label[:] = hit
    adata.obs[ADATA_KEYS.LABEL] = label.to_numpy()
    return adata


def her2st(
    sections: str | Sequence[str] | None = None,
    data_dir: str | Path | None = None,
    genes: str | Sequence[str] | None = None,
    n_jobs: int = 2,
) -> AnnData:
    """Load the HER2+ breast cancer legacy-ST study (Andersson et al., Nat. Commun. 2021; CC BY 4.0).

    36 sections from 8 patients (A–H), 13,620 spots; full-resolution H&E for B4 and C2–C6 only (here), pathologist
    region labels for one section per patient (A1, B1, C1, D1, E1, F1, G2, H1).

    Parameters
    ----------
    sections
        Section name(s), e.g. ``["C2", "B4"]``; default all 36.
    data_dir
        Folder containing ``her2st/`` (or the ``her2st`` folder itself). Default: see
        :func:`~varst_scverse.datasets.resolve_data_dir` — ``$VARST_DATA_DIR``, a ``shared/data`` folder beside the
        checkout, then the download cache.
    genes
        Keep only these genes (faster), or ``"hist2st"`` for the 785-gene panel of HisToGene/Hist2ST. Requested genes
        absent from a section are filled with 0; genes absent from every section are dropped with a warning.
    n_jobs
        Sections read in parallel (threads).

    Returns
    -------
    One AnnData, sections concatenated (outer join on genes, missing counts = 0): raw counts (CSR int32) in ``X`` and
    ``layers["counts"]``; ``obs["section"]``, ``obs["patient"]``, ``obs["label"]`` (pathologist label, NaN where the
    section has none), ``obs["array_x"]``, ``obs["array_y"]``; ``obsm["spatial"]`` in full-resolution pixels of each
    section; ``uns["spatial"]`` keyed by section (``hires`` image and the full-resolution path for the imaged ones).

    Examples
    --------
    >>> adata = varst.datasets.her2st(["C2", "C3", "C4", "C5", "C6", "B4"])  # doctest: +SKIP
    """
    root = resolve_data_dir(data_dir, dataset="her2st") / "her2st"
    if sections is None:
        sections = list(HER2ST_SECTIONS)
    elif isinstance(sections, str):
        sections = [sections]
    sections = [str(s).upper() for s in sections]
    if not sections:
        raise ValueError("sections is empty.")
    for s in sections:
        counts, spots, _, _ = _section_files(root, s)
        if not _SECTION_RE.match(s) or not counts.is_file() or not spots.is_file():
            raise ValueError(f"Unknown HER2ST section {s!r} (no {counts.name} / {spots.name} in {root}).")
    if len(set(sections)) != len(sections):
        raise ValueError(f"Duplicated sections in {sections}.")
    gene_list: list[str] | None
    if genes is None:
        gene_list = None
    elif isinstance(genes, str):
        if genes.lower() != HIST2ST_PANEL:
            raise ValueError(f"genes={genes!r}: pass a list of gene names or {HIST2ST_PANEL!r}.")
        gene_list = _hist2st_genes(root)
    else:
        gene_list = list(dict.fromkeys(str(g) for g in genes))
        if not gene_list:
            raise ValueError("genes is empty.")

    with ThreadPoolExecutor(max_workers=max(1, int(n_jobs))) as pool:
        parts = list(pool.map(lambda s: _read_section(root, s, gene_list), sections))

    if len(parts) == 1:
        adata = parts[0]
    else:
        adata = ad.concat(parts, join="outer", fill_value=0, merge="same")
        adata.uns[ADATA_KEYS.UNS_SPATIAL] = {s: p.uns[ADATA_KEYS.UNS_SPATIAL][s] for s, p in zip(sections, parts)}
    if gene_list is not None:
        present = [g for g in gene_list if g in adata.var_names]
        missing = len(gene_list) - len(present)
        if missing:
            warnings.warn(f"{missing} requested gene(s) absent from every section were dropped.", stacklevel=2)
        adata = adata[:, present].copy()
    for key in (ADATA_KEYS.SECTION, ADATA_KEYS.PATIENT):
        adata.obs[key] = pd.Categorical(adata.obs[key].astype(str), categories=list(dict.fromkeys(adata.obs[key])))
    labels = adata.obs[ADATA_KEYS.LABEL]
    adata.obs[ADATA_KEYS.LABEL] = pd.Categorical(labels.where(labels.notna(), None))
    return adata


# --------------------------------------------------------------------------------------------------------------------
# download (needs internet; never used by the tests)
# --------------------------------------------------------------------------------------------------------------------
_REPO = "https://raw.githubusercontent.com/almaan/her2st"
#: commits of github.com/almaan/her2st with the plain files (later commits hold them as encrypted zips)
_COUNTS_COMMIT = "e75e5c53a994726a8ad251aaf653a02d7932eb6a"
_FILES_COMMIT = "9f2260c6aa8347996955d53f0a5f06ac14c93470"
_LABELLED = ("A1", "B1", "C1", "D1", "E1", "F1", "G2", "H1")
_IMAGES = {
    "B4": "BT10737_D2_HE.jpg",
    "C2": "5714_HE_BT_C2.jpg",
    "C3": "5714_HE_BT_D1.jpg",
    "C4": "5714_HE_BT_D2.jpg",
    "C5": "5714_HE_BT_E1.jpg",
    "C6": "5714_HE_BT_E2.jpg",
}


def download_her2st(cache_dir: str | Path | None = None, images: bool = True) -> Path:
    """Download the HER2ST files from the authors' public GitHub repository into a local cache.

    Files: counts, spot tables, pathologist labels, and (``images=True``) the six H&E images available here. Needs
    internet; already-downloaded files are reused. Afterwards :func:`her2st` finds the data without further settings
    when ``cache_dir`` is the default.

    Parameters
    ----------
    cache_dir
        Data root to fill (``<cache_dir>/her2st/...``); default ``pooch.os_cache("varst-scverse")``.
    images
        Also fetch the H&E images (large; the repository may serve them through Git LFS).

    Returns
    -------
    The data root, to pass as ``data_dir=`` or ``$VARST_DATA_DIR``.

    Raises
    ------
    RuntimeError
        When a file cannot be downloaded (no internet, moved upstream); the message says which.
    """
    import pooch

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "her2st"
    jobs: list[tuple[str, Path]] = []
    for s in HER2ST_SECTIONS:
        jobs.append((f"{_REPO}/{_COUNTS_COMMIT}/data/ST-cnts/{s}.tsv.gz", target / "ST-cnts"))
        jobs.append((f"{_REPO}/{_FILES_COMMIT}/data/ST-spotfiles/{s}_selection.tsv", target / "ST-spotfiles"))
    for s in _LABELLED:
        jobs.append((f"{_REPO}/{_FILES_COMMIT}/data/ST-pat/lbl/{s}_labeled_coordinates.tsv", target / "ST-pat/lbl"))
    if images:
        for s, name in _IMAGES.items():
            jobs.append((f"{_REPO}/{_FILES_COMMIT}/data/ST-imgs/{s[0]}/{s}/{name}", target / "ST-imgs" / s[0] / s))
    for url, folder in jobs:
        folder.mkdir(parents=True, exist_ok=True)
        fname = url.rsplit("/", 1)[1]
        try:
            pooch.retrieve(url, known_hash=None, fname=fname, path=folder, progressbar=False)
        except Exception as err:  # noqa: BLE001 - requests / pooch raise many kinds
            raise RuntimeError(
                f"Could not download {url} ({type(err).__name__}: {err}). This needs internet access; otherwise copy "
                "the her2st folder by hand and point $VARST_DATA_DIR at its parent."
            ) from err
    return root
