"""Example data and readers: legacy Spatial Transcriptomics, HER2ST, SpatialData conversion, synthetic data."""

from ._her2st import download_her2st, her2st
from ._paths import resolve_data_dir
from ._spatialdata import to_spatialdata
from ._st_legacy import read_st_legacy
from ._synthetic import synthetic

__all__ = ["read_st_legacy", "her2st", "download_her2st", "to_spatialdata", "synthetic", "resolve_data_dir"]
