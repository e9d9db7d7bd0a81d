"""Every AnnData key and registry name that varst-scverse reads or writes, named once.

Change a key here and every reader and writer follows; nothing else in the package spells these strings.
"""

from __future__ import annotations

from typing import NamedTuple


class _RegistryKeys(NamedTuple):
    """Names of the fields registered by :meth:`varst_scverse.VARST.setup_anndata`."""

    X_KEY: str = "X"
    HISTOLOGY_KEY: str = "histology"
    SPATIAL_KEY: str = "spatial"
    BATCH_KEY: str = "batch"


REGISTRY_KEYS = _RegistryKeys()


class _AnnDataKeys(NamedTuple):
    """Default and output keys in the AnnData (``obsm``, ``layers``, ``obs``, ``uns``)."""

    # inputs (defaults of ``setup_anndata`` and of the readers / ``pp`` functions)
    HISTOLOGY: str = "X_histology"
    SPATIAL: str = "spatial"
    COUNTS_LAYER: str = "counts"
    SECTION: str = "section"
    PATIENT: str = "patient"
    LABEL: str = "label"
    UNS_SPATIAL: str = "spatial"
    HIGHLY_VARIABLE: str = "varst_highly_variable"
    HVG_RANK: str = "varst_hvg_rank"
    ARRAY_X: str = "array_x"
    ARRAY_Y: str = "array_y"
    TOTAL_COUNTS: str = "varst_total_counts"  # optional library size over all genes, used by the cp10k target
    UNS_HISTOLOGY: str = "varst_histology"  # how obsm[HISTOLOGY] was embedded
    # SpatialData table annotation
    REGION: str = "region"
    INSTANCE: str = "spot_id"
    # outputs written by the model
    PREDICTED: str = "varst_predicted"
    UNCERTAINTY: str = "varst_uncertainty"
    RECONSTRUCTED: str = "varst_reconstructed"
    TOKENS: str = "varst_tokens"


ADATA_KEYS = _AnnDataKeys()


class _SpatialUnsKeys(NamedTuple):
    """Keys inside ``uns["spatial"][library_id]`` (squidpy / scanpy Visium layout, plus ours)."""

    IMAGES: str = "images"
    SCALEFACTORS: str = "scalefactors"
    METADATA: str = "metadata"
    HIRES: str = "hires"
    LOWRES: str = "lowres"
    SCALEF_HIRES: str = "tissue_hires_scalef"
    SCALEF_LOWRES: str = "tissue_lowres_scalef"
    SPOT_DIAMETER: str = "spot_diameter_fullres"
    PIXEL_SIZE: str = "pixel_size_um_fullres"
    IMAGE_PATH: str = "image_path"
    SOURCE_IMAGE_PATH: str = "source_image_path"
    SDATA_IMAGE: str = "spatialdata_image"
    FULLRES_SHAPE: str = "image_shape_fullres"


SPATIAL_UNS_KEYS = _SpatialUnsKeys()

#: Fallback location of the shared data folder, relative to a checkout.
DATA_DIR_ENV = "VARST_DATA_DIR"
