"""Torch modules of Two-Stage VAR-ST: tensors in, tensors out (no AnnData here)."""

from ._checkpoint import load_checkpoint, save_checkpoint
from ._conditioning import ConditionEncoder, FourierFeatures
from ._config import PRESETS, resolve_configs, resolve_positions, resolve_scales
from ._quantizer import MultiScaleResidualQuantizer, pool_genes, upsample_genes
from ._sampling import filter_logits, guide, sample_tokens, token_probs
from ._two_stage import TwoStageVARST
from ._var import GeneVARTransformer, block_causal_mask
from ._vqvae import MultiScaleGeneVQVAE

__all__ = [
    "TwoStageVARST",
    "MultiScaleGeneVQVAE",
    "MultiScaleResidualQuantizer",
    "GeneVARTransformer",
    "ConditionEncoder",
    "FourierFeatures",
    "PRESETS",
    "resolve_configs",
    "resolve_scales",
    "resolve_positions",
    "block_causal_mask",
    "pool_genes",
    "upsample_genes",
    "filter_logits",
    "guide",
    "sample_tokens",
    "token_probs",
    "save_checkpoint",
    "load_checkpoint",
]
