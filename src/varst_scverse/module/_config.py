"""Presets and validation of the two configuration dicts (``vqvae_config`` / ``var_config``).

The key names are the seed guide's; extra keys documented here. Unknown keys are an error that lists the valid ones.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

Preset = Literal["seed", "cpu"]

#: Stage-1 defaults shared by every preset (each preset overrides some).
_VQVAE_BASE: dict[str, Any] = {
    "vocab_size": 4096,  # entries of the ONE codebook shared by every scale
    "embed_dim": 128,  # D: width of the per-gene feature map and of each code
    "beta": 0.25,  # commitment weight inside the VQ loss
    "hierarchical_loss_weight": 0.1,  # weight of the decoded-prefix losses
    "vq_loss_weight": 0.25,  # weight of codebook + beta * commitment
    "scales": (1, 8, 32, None),  # None = the whole feature map (G positions, or gene_positions)
    # length of the tokenizer's feature map: None = one position per gene (G); P = the ordered genes pooled into at
    # most P contiguous blocks (gene modules), so stage 1 costs about what P genes cost. For panels of thousands of
    # genes; a block's genes are encoded and read out one by one, each with its own weights
    "gene_positions": None,
    "hidden_dim": 512,  # width of the profile MLP in the encoder
    "num_mixer_layers": 2,  # gene-mixing blocks in encoder and in decoder
    "gene_mixing_dim": 256,  # hidden width of the across-genes MLP inside a mixing block
    "hierarchical_subsample": 1.0,  # fraction of each batch whose coarse prefixes are decoded for that loss
    "codebook_update": "ema",  # "ema" (k-means-like EMA updates) or "loss" (gradient on the codebook loss)
    "ema_decay": 0.99,
    "dead_code_threshold": 0.03,  # EMA usage per step below this restarts the code on a current residual
}

_VAR_BASE: dict[str, Any] = {
    "vocab_size": 4096,
    "embed_dim": 640,
    "num_heads": 8,
    "num_layers": 12,
    "feedforward_dim": 2560,
    "dropout": 0.1,
    "max_sequence_length": 1500,
    "condition_embed_dim": 640,
    "condition_dropout": 0.1,  # probability of the null condition in training (classifier-free guidance)
    "generate_scales": None,  # None = all scales (the seed's 241 tokens); k = only the k coarsest
    "aux_decode_weight": 0.0,  # MSE of the expected-value decode, added to the cross-entropy
    "aux_decode_mode": "teacher",  # "teacher": decode teacher-forced probabilities; "free": roll out as at inference
    "num_fourier_features": 16,  # frequencies per coordinate axis
    "fourier_scale": 4.0,  # highest frequency (cycles over the normalised section extent)
    "coordinate_dropout": 0.0,  # probability of hiding the coordinates of a training spot; 1 = never use them
    "neighbour_k": 0,  # mean histology of the k nearest spots as extra condition; 0 = off
    "label_smoothing": 0.0,
    # weight of a linear probe on the histology (ridge, alpha by leave-one-section-out CV, fitted after stage 2) in
    # every decoded prediction: (1 - w) * transformer + w * probe; 0 = the transformer alone
    "ridge_blend": 0.0,
    # independently seeded stage-2 members (condition encoder + transformer) on the one tokenizer, trained one after
    # the other; predictions average them, draws mix them. Costs this many times the stage-2 training and generation
    "ensemble_size": 1,
}

PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "seed": ({}, {}),
    "cpu": (
        {
            "vocab_size": 1024,
            "embed_dim": 64,
            "hidden_dim": 256,
            "num_mixer_layers": 1,
            "gene_mixing_dim": 64,
            "hierarchical_subsample": 0.25,
        },
        {
            "vocab_size": 1024,
            "embed_dim": 192,
            "num_heads": 4,
            "num_layers": 3,
            "feedforward_dim": 512,
            "condition_embed_dim": 192,
            "dropout": 0.1,
            "generate_scales": 3,
            "aux_decode_weight": 1.0,
            "aux_decode_mode": "free",  # HER2ST held-out C3 0.393 vs 0.385 ("teacher"); the path inference takes
            "neighbour_k": 6,
            # HER2ST top-250 genes, mean over C2-C6 / B4 (log1p): transformer 0.338 / 0.430, blend 0.376 / 0.421,
            # CV ridge 0.364 / 0.388 (session-3 benchmark, its "varst_ridge_avg" row)
            "ridge_blend": 0.5,
        },
    ),
}


def _check_keys(user: Mapping[str, Any], valid: Mapping[str, Any], name: str) -> None:
    unknown = sorted(set(user) - set(valid))
    if unknown:
        raise ValueError(f"Unknown {name} key(s) {unknown}. Valid keys are: {sorted(valid)}.")


def resolve_configs(
    preset: str = "seed",
    vqvae_config: Mapping[str, Any] | None = None,
    var_config: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge a preset with user overrides and validate the result.

    Parameters
    ----------
    preset
        ``"seed"`` (the guide's numbers, for a GPU) or ``"cpu"`` (small, trains on a laptop in minutes).
    vqvae_config, var_config
        Overrides with the seed guide's key names.

    Returns
    -------
    The two complete config dicts.
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    vq_over, var_over = PRESETS[preset]
    vq = {**copy.deepcopy(_VQVAE_BASE), **vq_over}
    var = {**copy.deepcopy(_VAR_BASE), **var_over}
    vqvae_config = dict(vqvae_config or {})
    var_config = dict(var_config or {})
    _check_keys(vqvae_config, vq, "vqvae_config")
    _check_keys(var_config, var, "var_config")
    # one vocabulary: an override on either side carries to the other unless both disagree
    if "vocab_size" in vqvae_config and "vocab_size" not in var_config:
        var_config["vocab_size"] = vqvae_config["vocab_size"]
    elif "vocab_size" in var_config and "vocab_size" not in vqvae_config:
        vqvae_config["vocab_size"] = var_config["vocab_size"]
    vq.update(vqvae_config)
    var.update(var_config)
    if vq["vocab_size"] != var["vocab_size"]:
        raise ValueError(
            f"vocab_size must agree between stages (stage 2 predicts stage-1 codes): vqvae_config has "
            f"{vq['vocab_size']}, var_config has {var['vocab_size']}. Set one value in both dicts."
        )
    vq["scales"] = tuple(vq["scales"])
    _validate_vqvae(vq)
    _validate_var(var)
    return vq, var


def _positive_int(cfg: Mapping[str, Any], key: str, name: str) -> None:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}[{key!r}] must be a positive integer, got {v!r}.")


def _validate_vqvae(vq: Mapping[str, Any]) -> None:
    for key in ("vocab_size", "embed_dim", "hidden_dim", "gene_mixing_dim"):
        _positive_int(vq, key, "vqvae_config")
    if vq["codebook_update"] not in ("ema", "loss"):
        raise ValueError(f"vqvae_config['codebook_update'] must be 'ema' or 'loss', got {vq['codebook_update']!r}.")
    scales = vq["scales"]
    if len(scales) < 1:
        raise ValueError("vqvae_config['scales'] needs at least one scale.")
    fixed = [s for s in scales if s is not None]
    if any((not isinstance(s, int)) or s < 1 for s in fixed):
        raise ValueError(f"vqvae_config['scales'] must hold positive integers (or None for one per gene): {scales}.")
    if fixed != sorted(fixed) or len(set(fixed)) != len(fixed):
        raise ValueError(f"vqvae_config['scales'] must increase strictly from coarse to fine: {scales}.")
    if None in scales and scales[-1] is not None:
        raise ValueError("None (one position per gene) may only be the last, finest scale.")
    if vq["gene_positions"] is not None:  # None: one position per gene
        _positive_int(vq, "gene_positions", "vqvae_config")
    for key in ("beta", "hierarchical_loss_weight", "vq_loss_weight"):
        if vq[key] < 0:
            raise ValueError(f"vqvae_config[{key!r}] must be >= 0, got {vq[key]}.")
    if not 0.0 < vq["hierarchical_subsample"] <= 1.0:
        raise ValueError(
            f"vqvae_config['hierarchical_subsample'] must lie in (0, 1], got {vq['hierarchical_subsample']}."
        )
    if not 0.0 < vq["ema_decay"] < 1.0:
        raise ValueError(f"vqvae_config['ema_decay'] must lie in (0, 1), got {vq['ema_decay']}.")


def _validate_var(var: Mapping[str, Any]) -> None:
    for key in ("vocab_size", "embed_dim", "num_heads", "num_layers", "feedforward_dim", "condition_embed_dim"):
        _positive_int(var, key, "var_config")
    if var["embed_dim"] % var["num_heads"]:
        raise ValueError(
            f"var_config['embed_dim'] ({var['embed_dim']}) must be divisible by num_heads ({var['num_heads']})."
        )
    if not 0.0 <= var["coordinate_dropout"] <= 1.0:
        raise ValueError(f"var_config['coordinate_dropout'] must lie in [0, 1], got {var['coordinate_dropout']}.")
    for key in ("dropout", "condition_dropout", "label_smoothing"):
        if not 0.0 <= var[key] < 1.0:
            raise ValueError(f"var_config[{key!r}] must lie in [0, 1), got {var[key]}.")
    if var["aux_decode_mode"] not in ("teacher", "free"):
        raise ValueError(f"var_config['aux_decode_mode'] must be 'teacher' or 'free', got {var['aux_decode_mode']!r}.")
    g = var["generate_scales"]
    if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
        raise ValueError(f"var_config['generate_scales'] must be None (all) or a positive integer, got {g!r}.")
    if not 0.0 <= var["ridge_blend"] <= 1.0:
        raise ValueError(
            f"var_config['ridge_blend'] must lie in [0, 1] (0 = the transformer alone), got {var['ridge_blend']}."
        )
    _positive_int(var, "ensemble_size", "var_config")
    if var["neighbour_k"] < 0:
        raise ValueError(f"var_config['neighbour_k'] must be >= 0 (0 switches it off), got {var['neighbour_k']}.")


def resolve_positions(gene_positions: int | None, num_genes: int) -> int:
    """Length of the tokenizer's feature map: ``num_genes`` for None, else ``gene_positions`` capped at it."""
    return int(num_genes) if gene_positions is None else min(int(gene_positions), int(num_genes))


def resolve_scales(scales: tuple, num_positions: int, num_genes: int | None = None) -> tuple[int, ...]:
    """Replace ``None`` by the feature-map length and check every scale fits in it.

    ``num_positions`` is the number of genes G, or :func:`resolve_positions` of ``vqvae_config["gene_positions"]``
    when that pools the genes (then pass ``num_genes`` too, for the error message).
    """
    out = tuple(num_positions if s is None else int(s) for s in scales)
    pooled = num_genes is not None and num_genes != num_positions
    if max(out) > num_positions:  # a fixed scale may exceed the map even when the last scale is None
        if not pooled:
            raise ValueError(
                f"The largest fixed scale has {max(out)} positions but there are only {num_positions} genes; select "
                f"at least {max(out)} genes or pass smaller vqvae_config['scales']."
            )
        raise ValueError(
            f"The largest fixed scale has {max(out)} positions but vqvae_config['gene_positions'] pools the "
            f"{num_genes} genes into only {num_positions}; raise gene_positions to at least {max(out)} or pass "
            "smaller vqvae_config['scales']."
        )
    if len(set(out)) != len(out):
        why = " (vqvae_config['gene_positions'])" if pooled else ""
        raise ValueError(
            f"Scales {out} repeat a size for a feature map of {num_positions} positions{why}; choose strictly "
            "increasing scales."
        )
    return out
