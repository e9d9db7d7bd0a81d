"""Plotting: spatial maps of observed / predicted / uncertainty, codebook use, training curves."""

from ._metrics import gene_pearson
from ._spatial import spatial_prediction, token_map
from ._training import codebook_usage, training_history

__all__ = ["spatial_prediction", "gene_pearson", "training_history", "codebook_usage", "token_map"]
