"""Preprocessing: gene selection, H&E patch extraction and per-spot histology embeddings.

Every function accepts an :class:`~anndata.AnnData` or a :class:`spatialdata.SpatialData` (whose table is used).
"""

from ._embed import embed_histology
from ._genes import select_genes
from ._morphology import morphology_features, rgb_features
from ._patches import extract_patches
from ._resolve import resolve_adata

__all__ = ["extract_patches", "embed_histology", "select_genes", "morphology_features", "rgb_features", "resolve_adata"]
