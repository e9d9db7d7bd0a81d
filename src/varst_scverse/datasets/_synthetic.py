"""A small synthetic spatial dataset with structure the model can learn, for tests and quick demos.

Spots on a grid per section carry a smooth latent field; gene programmes follow the field and a sequencing-depth
factor; "histology" features are a noisy nonlinear view of the same field, so histology predicts expression.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._constants import ADATA_KEYS


def synthetic(
    n_spots: int = 600,
    n_genes: int = 64,
    n_sections: int = 2,
    histology_dim: int = 32,
    n_programs: int = 6,
    missing_histology_frac: float = 0.0,
    signal: float = 1.0,
    seed: int = 0,
) -> AnnData:
    """Simulate spatially structured counts with informative histology-like features.

    Parameters
    ----------
    n_spots
        Total spots, split evenly over the sections.
    n_genes
        Genes; each belongs to one of ``n_programs`` co-expressed programmes (in shuffled order, so the model's gene
        clustering has something to find).
    n_sections
        Sections (``obs["section"]``); coordinates are a square grid in each.
    histology_dim
        Width of ``obsm["X_histology"]``.
    n_programs
        Latent programmes driving expression.
    missing_histology_frac
        Fraction of spots whose histology row is all-NaN (expression-only spots).
    signal
        Strength of the histology signal relative to its noise (0 = uninformative histology).
    seed
        Random seed.

    Returns
    -------
    AnnData with integer counts in ``X`` and ``layers["counts"]``, ``obsm["X_histology"]``, ``obsm["spatial"]``
    (pixel-like coordinates), ``obs["section"]``, and ``var["program"]``.
    """
    if n_spots < 1 or n_genes < 1 or n_sections < 1:
        raise ValueError("n_spots, n_genes and n_sections must be positive.")
    rng = np.random.default_rng(seed)
    per = np.diff(np.linspace(0, n_spots, n_sections + 1).astype(int))
    coords, sections = [], []
    for s, n in enumerate(per):
        side = int(np.ceil(np.sqrt(n)))
        grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n]
        coords.append(grid * 100.0 + rng.normal(0, 2, size=(n, 2)) + 50)
        sections += [f"S{s}"] * n
    xy = np.concatenate(coords)
    # smooth latent field from random Fourier features of the coordinates
    freqs = rng.normal(0, 1 / 400.0, size=(2, n_programs))
    phase = rng.uniform(0, 2 * np.pi, size=n_programs)
    latent = np.sin(xy @ freqs * 2 * np.pi + phase) + 0.3 * rng.normal(size=(n_spots, n_programs))
    program = rng.integers(0, n_programs, size=n_genes)
    loading = rng.uniform(0.6, 1.4, size=n_genes)
    base = rng.uniform(-0.5, 1.5, size=n_genes)
    depth = 0.4 * latent[:, 0] + rng.normal(0, 0.15, size=n_spots)
    log_rate = base + loading * latent[:, program] + depth[:, None]
    counts = rng.poisson(np.exp(log_rate)).astype(np.int32)
    mix = rng.normal(size=(n_programs, histology_dim)) / np.sqrt(n_programs)
    hist = np.tanh(latent @ mix) * signal + rng.normal(0, 0.5, size=(n_spots, histology_dim))
    hist = hist.astype(np.float32)
    if missing_histology_frac > 0:
        hist[rng.random(n_spots) < missing_histology_frac] = np.nan
    obs = pd.DataFrame({ADATA_KEYS.SECTION: pd.Categorical(sections)}, index=[f"spot{i}" for i in range(n_spots)])
    var = pd.DataFrame({"program": program}, index=[f"gene{i}" for i in range(n_genes)])
    x = sparse.csr_matrix(counts)
    adata = AnnData(X=x.copy(), obs=obs, var=var)
    adata.layers[ADATA_KEYS.COUNTS_LAYER] = x
    adata.obsm[ADATA_KEYS.HISTOLOGY] = hist
    adata.obsm[ADATA_KEYS.SPATIAL] = xy.astype(np.float64)
    return adata
