"""Pre-flight estimate of a training batch's memory.

A batch too large for the machine is named in a warning before the operating system kills the process without a
message. Both stages hold ``[batch, genes, embed_dim]`` feature maps of the gene VQ-VAE (encoder, the residual
quantiser at every scale, decoder) for the backward pass, so the cost grows with genes × batch, not with the model
size. The factors come from measured peaks of the ``cpu`` preset (``embed_dim`` 64) on CPU, fp32, less the model and
optimiser: 11–19 kB per gene and spot in stage 1 (G = 250–10,232; batch 256 × 10,232 genes was killed on a 24 GB
machine) and about 9 kB in stage 2 with the free-roll-out decode loss (G = 2,000).

Generation (prediction, the noise calibration) keeps about 11 such maps per generated sequence without gradients:
2.6–3.1 kB per gene and sequence (measured, G = 2,000 and 10,000), so 512 sequences of 10,000 genes peak near 13 GB.
Its batches are capped to stay under :data:`GENERATION_BUDGET_BYTES` (with ``embed_dim`` 64, 512 sequences fit up
to 1,365 genes; 10,000 genes go 69 at a time: 1.8 GB instead of 6.5 GB for 256 sequences,
``benchmarks/results/generation_memory.md``).
"""

from __future__ import annotations

import os

from ._validation import warn_user

#: float32 feature maps of ``[genes, embed_dim]`` kept per spot for the backward pass (measured, rounded up)
_MAPS_PER_SPOT = {1: 80, 2: 40}
#: stage 2 without the auxiliary decode loss keeps no decoder activations
_MAPS_STAGE2_NO_DECODE = 8
#: feature maps alive at once while generating and decoding one sequence (measured 10.3–12.0, rounded up)
_MAPS_GENERATION = 12
#: memory one generation batch may take for its feature maps
GENERATION_BUDGET_BYTES = 2 * 1024**3


def training_batch_bytes(stage: int, batch_size: int, n_positions: int, embed_dim: int, aux_decode: bool = True) -> int:
    """Estimated activation memory of one training step (bytes).

    Parameters
    ----------
    stage
        1 (tokenizer) or 2 (transformer with the frozen tokenizer).
    batch_size
        Spots per batch.
    n_positions, embed_dim
        Length of the tokenizer's feature map (genes G, or ``vqvae_config["gene_positions"]``) and its
        ``vqvae_config["embed_dim"]``.
    aux_decode
        Stage 2 only: whether the auxiliary decode loss back-propagates through the decoder.
    """
    maps = _MAPS_PER_SPOT[stage] if stage == 1 or aux_decode else _MAPS_STAGE2_NO_DECODE
    return int(batch_size) * int(n_positions) * int(embed_dim) * 4 * maps


def generation_sequences_that_fit(n_positions: int, embed_dim: int, budget: int | None = None) -> int:
    """Sequences one generation batch may hold so that its ``[positions, embed_dim]`` maps stay within ``budget``.

    ``budget`` defaults to :data:`GENERATION_BUDGET_BYTES`.
    """
    budget = GENERATION_BUDGET_BYTES if budget is None else budget
    per_sequence = int(n_positions) * int(embed_dim) * 4 * _MAPS_GENERATION
    return max(1, int(budget) // per_sequence)


def available_memory_bytes() -> int | None:
    """Memory the system can give this process now (``MemAvailable``), or None where it cannot be read."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return None


def warn_if_batch_too_large(
    stage: int,
    batch_size: int,
    n_positions: int,
    embed_dim: int,
    aux_decode: bool = True,
    available: int | None = None,
) -> bool:
    """Warn when a CPU training batch would need more memory than is available; return whether it warned.

    ``available`` defaults to :func:`available_memory_bytes` (no warning when it is unknown).
    """
    need = training_batch_bytes(stage, batch_size, n_positions, embed_dim, aux_decode)
    available = available_memory_bytes() if available is None else available
    if available is None or need <= 0.8 * available:
        return False
    per_spot = training_batch_bytes(stage, 1, n_positions, embed_dim, aux_decode)
    fits = max(1, int(0.5 * available // per_spot))
    warn_user(
        f"Stage {stage} with batch_size={batch_size} and a tokenizer feature map of {n_positions:,} positions needs "
        f"about {need / 1e9:.1f} GB of activations (estimate: the tokenizer keeps a {n_positions:,} x {embed_dim} map "
        f"per layer and spot), and this machine has {available / 1e9:.1f} GB available: the process will probably "
        f"run out of memory and be killed. Pass batch_size={fits} or smaller, pool the genes into fewer positions "
        "(vqvae_config={'gene_positions': 256}), or model fewer genes (e.g. subset the AnnData to the highly variable "
        "ones before `VARST.setup_anndata`)."
    )
    return True


#: a tokenizer feature map longer than this (one position per gene) draws a warning when the model is built
WIDE_MAP_POSITIONS = 2048


def warn_if_map_is_wide(n_genes: int, n_positions: int) -> bool:
    """Warn when the tokenizer keeps one position per gene for a panel of more than :data:`WIDE_MAP_POSITIONS` genes.

    Returns whether it warned. A pooled map (``vqvae_config["gene_positions"]``) of any panel does not warn.
    """
    if n_positions <= WIDE_MAP_POSITIONS or n_positions < n_genes:
        return False
    warn_user(
        f"The tokenizer keeps one position per gene for {n_genes:,} genes: both stages cost time and memory in "
        f"proportion (one CPU thread, cpu preset: 198 ms of stage 1 per spot on 10,248 genes against 6.8 ms with 256 "
        "positions). Pool the clustered genes into fewer positions with vqvae_config={'gene_positions': 256} "
        "(each gene keeps its own weights), or model fewer genes."
    )
    return True
