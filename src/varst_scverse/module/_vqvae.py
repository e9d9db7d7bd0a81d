"""Stage 1: the multi-scale gene VQ-VAE that turns a spot's expression profile into tokens at several scales.

Encoder: profile → one feature vector per (ordered) gene, or per contiguous block of genes when
``vqvae_config["gene_positions"]`` pools them; quantiser: residual multi-scale codes; decoder: features → profile.
Trained without histology; frozen in stage 2, where its decoder turns generated tokens back into expression.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._config import resolve_positions
from ._quantizer import MultiScaleResidualQuantizer


class GeneBlocks(nn.Module):
    """Contiguous blocks of the ordered gene axis, one per feature-map position.

    Gene ``g`` of ``G`` sits in block ``g * P // G``, so block sizes differ by at most one. Per-gene weights
    ``[G, D]`` and profiles ``[B, G]`` are laid out as ``[P, width, ...]`` (padded with zeros) so that a block's genes
    meet its position's features in one batched product: no ``[B, G, D]`` map is ever built.

    Parameters
    ----------
    num_genes
        Genes G.
    num_positions
        Blocks P (at most G; P = G is one gene per position).
    """

    def __init__(self, num_genes: int, num_positions: int) -> None:
        super().__init__()
        if not 1 <= num_positions <= num_genes:
            raise ValueError(f"num_positions must lie in [1, num_genes={num_genes}], got {num_positions}.")
        self.num_genes, self.num_positions = int(num_genes), int(num_positions)
        genes = torch.arange(num_genes)
        block = genes * num_positions // num_genes
        first = torch.searchsorted(block, torch.arange(num_positions))
        slot = genes - first[block]
        self.width = int(slot.max()) + 1
        index = torch.full((num_positions, self.width), num_genes, dtype=torch.long)  # G = the zero padding row
        index[block, slot] = genes
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("flat", block * self.width + slot, persistent=False)

    @property
    def identity(self) -> bool:
        """One gene per position."""
        return self.num_positions == self.num_genes

    def profile(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, G]`` → ``[B, P, width]``."""
        return torch.nn.functional.pad(z, (0, 1))[:, self.index]

    def weights(self, w: torch.Tensor) -> torch.Tensor:
        """Per-gene ``[G, D]`` → ``[P, width, D]``."""
        return torch.nn.functional.pad(w, (0, 0, 0, 1))[self.index]

    def genes(self, blocks: torch.Tensor) -> torch.Tensor:
        """``[B, P, width]`` → ``[B, G]`` (drops the padding)."""
        return blocks.reshape(blocks.shape[0], -1)[:, self.flat]

    def encode(self, z: torch.Tensor, value_scale: torch.Tensor) -> torch.Tensor:
        """Profile ``[B, G]`` and per-gene value weights ``[G, D]`` → ``[B, P, D]`` (a block sums its genes' terms)."""
        if self.identity:
            return z[:, :, None] * value_scale
        return torch.einsum("bpw,pwd->bpd", self.profile(z), self.weights(value_scale))

    def read_out(self, x: torch.Tensor, readout: torch.Tensor) -> torch.Tensor:
        """Features ``[B, P, D]`` and per-gene read-out weights ``[G, D]`` → profile ``[B, G]``."""
        if self.identity:
            return (x * readout).sum(-1)
        return self.genes(torch.einsum("bpd,pwd->bpw", x, self.weights(readout)))


class GeneMixerBlock(nn.Module):
    """One block of an MLP-mixer over ``[B, G, D]``: an MLP across genes, then an MLP across channels."""

    def __init__(self, num_genes: int, dim: int, gene_hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.gene_mlp = nn.Sequential(nn.Linear(num_genes, gene_hidden), nn.GELU(), nn.Linear(gene_hidden, num_genes))
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.mix_channels(x + self.mix_genes(self.norm1(x)))

    def mix_genes(self, x: torch.Tensor) -> torch.Tensor:
        """The across-genes MLP on ``[B, G, D]`` as left matrix products (no transposed copies of the feature map)."""
        first, last = self.gene_mlp[0], self.gene_mlp[2]
        h = self.gene_mlp[1](torch.matmul(first.weight, x) + first.bias[:, None])
        return torch.matmul(last.weight, h) + last.bias[:, None]

    def mix_channels(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x + self.channel_mlp(self.norm2(x))


class GeneEncoder(nn.Module):
    """Profile ``[B, G]`` → feature map ``[B, P, D]``: per-gene value tokens plus a whole-profile context, mixed.

    ``P = G`` by default (one position per gene); with ``num_positions`` < G each position sums the value tokens of
    a contiguous block of genes (see :class:`GeneBlocks`).
    """

    def __init__(
        self, num_genes: int, dim: int, hidden: int, n_layers: int, gene_hidden: int, num_positions: int | None = None
    ) -> None:
        super().__init__()
        self.layout = GeneBlocks(num_genes, num_positions or num_genes)
        n_pos = self.layout.num_positions
        self.value_scale = nn.Parameter(torch.randn(num_genes, dim) * 0.1)
        self.gene_embed = nn.Parameter(torch.randn(n_pos, dim) * 0.02)
        self.context = nn.Sequential(nn.Linear(num_genes, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.blocks = nn.Sequential(*[GeneMixerBlock(n_pos, dim, gene_hidden) for _ in range(n_layers)])
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.layout.encode(z, self.value_scale) + self.gene_embed + self.context(z)[:, None, :]
        return self.out(self.blocks(x))


class GeneDecoder(nn.Module):
    """Feature map ``[B, P, D]`` → profile ``[B, G]`` through mixing blocks and a per-gene linear read-out.

    Each gene reads its own position's features (its block's, when ``num_positions`` < G) with its own weights.
    """

    def __init__(
        self, num_genes: int, dim: int, n_layers: int, gene_hidden: int, num_positions: int | None = None
    ) -> None:
        super().__init__()
        self.layout = GeneBlocks(num_genes, num_positions or num_genes)
        n_pos = self.layout.num_positions
        self.gene_embed = nn.Parameter(torch.randn(n_pos, dim) * 0.02)
        self.blocks = nn.Sequential(*[GeneMixerBlock(n_pos, dim, gene_hidden) for _ in range(n_layers)])
        self.norm = nn.LayerNorm(dim)
        self.readout = nn.Parameter(torch.randn(num_genes, dim) / dim**0.5)
        self.bias = nn.Parameter(torch.zeros(num_genes))

    def forward(self, f_hat: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.norm(self.blocks(f_hat + self.gene_embed))
        return self.layout.read_out(x, self.readout) + self.bias


class MultiScaleGeneVQVAE(nn.Module):
    """Stage 1 of Two-Stage VAR-ST.

    Works on standardised ``log1p`` expression of genes already in the model's (clustered) order: the per-gene
    mean and standard deviation live in buffers so that the module maps log-scale profiles to log-scale profiles.
    The feature map has one position per gene, or ``config["gene_positions"]`` (at most G) positions that each pool
    a contiguous block of genes.

    Parameters
    ----------
    num_genes
        Number of genes G.
    scales
        Positions per scale with ``None`` already resolved to the feature-map length.
    config
        A complete ``vqvae_config`` (see :func:`varst_scverse.module.resolve_configs`).
    """

    def __init__(self, num_genes: int, scales: tuple[int, ...], config: dict[str, Any]) -> None:
        super().__init__()
        self.num_genes = num_genes
        self.num_positions = resolve_positions(config["gene_positions"], num_genes)
        self.scales = tuple(scales)
        self.config = dict(config)
        dim = config["embed_dim"]
        n_pos = self.num_positions
        self.register_buffer("gene_mean", torch.zeros(num_genes))
        self.register_buffer("gene_std", torch.ones(num_genes))
        self.encoder = GeneEncoder(
            num_genes, dim, config["hidden_dim"], config["num_mixer_layers"], config["gene_mixing_dim"], n_pos
        )
        self.quantizer = MultiScaleResidualQuantizer(
            n_pos,
            self.scales,
            config["vocab_size"],
            dim,
            beta=config["beta"],
            codebook_update=config["codebook_update"],
            ema_decay=config["ema_decay"],
            dead_code_threshold=config["dead_code_threshold"],
        )
        self.decoder = GeneDecoder(num_genes, dim, config["num_mixer_layers"], config["gene_mixing_dim"], n_pos)

    @torch.no_grad()
    def set_standardisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the per-gene mean/std of the training targets (std floored to avoid division by zero)."""
        self.gene_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.gene_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-3))

    def standardise(self, y: torch.Tensor) -> torch.Tensor:
        """Log-scale profile → standardised profile."""
        return (y - self.gene_mean) / self.gene_std

    def destandardise(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised profile → log-scale profile."""
        return z * self.gene_std + self.gene_mean

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        """Log-scale profile ``[B, G]`` → continuous features ``[B, P, D]``."""
        return self.encoder(self.standardise(y))

    def decode_standardised(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Quantised features → standardised profile (what the losses compare)."""
        return self.decoder(f_hat)

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Quantised features ``[B, P, D]`` → log-scale profile ``[B, G]``."""
        return self.destandardise(self.decoder(f_hat))

    def forward(self, y: torch.Tensor) -> dict[str, Any]:
        """Encode, quantise and decode; return the losses and tokens.

        The reconstruction and hierarchical losses are mean squared errors on the standardised profile, so every
        gene weighs the same, as it does in the per-gene Pearson users judge by.
        """
        z = self.standardise(y)
        feats = self.encoder(z)
        q = self.quantizer(feats)
        prefixes = q["prefixes"]
        cfg = self.config
        full = self.decoder(prefixes[-1])
        recon = ((full - z) ** 2).mean()
        per_scale = [recon]
        hier = recon.new_zeros(())
        if len(prefixes) > 1 and cfg["hierarchical_loss_weight"] > 0:
            # coarse prefixes decoded in one batched pass, on a random subset of spots when asked (an unbiased
            # estimate of the same loss at a fraction of the decoder cost)
            n = z.shape[0]
            m = max(1, int(round(cfg["hierarchical_subsample"] * n))) if self.training else n
            rows = torch.randperm(n, device=z.device)[:m] if m < n else slice(None)
            coarse = torch.cat([p[rows] for p in prefixes[:-1]], 0)
            dec = self.decoder(coarse).reshape(len(prefixes) - 1, -1, z.shape[1])
            per_coarse = ((dec - z[rows][None]) ** 2).mean(dim=(1, 2))
            hier = per_coarse.sum()
            per_scale = [*per_coarse, recon]
        per_scale = torch.stack(per_scale)
        loss = recon + cfg["vq_loss_weight"] * q["vq_loss"] + cfg["hierarchical_loss_weight"] * hier
        return {
            "loss": loss,
            "recon_loss": recon.detach(),
            "vq_loss": q["vq_loss"].detach(),
            "hierarchical_loss": hier.detach(),
            "per_scale_mse": per_scale.detach(),
            "tokens": q["tokens"],
            "reconstruction": self.destandardise(full),
        }

    @torch.no_grad()
    def tokenize(self, y: torch.Tensor) -> list[torch.Tensor]:
        """Log-scale profile ``[B, G]`` → list of token tensors ``[B, n_k]``, one per scale."""
        return self.quantizer.tokenize(self.encode(y))

    @torch.no_grad()
    def reconstruct(self, y: torch.Tensor, n_scales: int | None = None) -> torch.Tensor:
        """Tokenize and decode, optionally from only the ``n_scales`` coarsest scales."""
        tokens = self.tokenize(y)[: n_scales or len(self.scales)]
        return self.decode(self.quantizer.tokens_to_prefixes(tokens)[-1])


def vqvae_loss_terms() -> tuple[str, ...]:
    """Names of the scalar terms stage 1 logs (also the stage-1 history columns)."""
    return ("loss", "recon_loss", "vq_loss", "hierarchical_loss")


__all__ = ["MultiScaleGeneVQVAE", "GeneEncoder", "GeneDecoder", "GeneMixerBlock", "GeneBlocks"]
