"""varst-scverse: predict spatial gene expression from histology with Two-Stage VAR-ST."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import datasets, pl, pp, tl
from ._constants import ADATA_KEYS, REGISTRY_KEYS
from .model import VARST

try:
    __version__ = version("varst-scverse")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["VARST", "ADATA_KEYS", "REGISTRY_KEYS", "datasets", "pl", "pp", "tl", "__version__"]
