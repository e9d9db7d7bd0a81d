"""Stage 2: the gene VAR transformer — next-*scale* prediction of stage-1 tokens, conditioned on histology.

Scale k's inputs are the cumulative quantised features of the coarser scales, pooled to scale k's positions; a
block-causal mask lets each token see its own scale and every coarser one, so one forward pass per scale generates.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._quantizer import pool_genes, upsample_genes


def block_causal_mask(scales: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """Boolean ``[L, L]`` mask, True where position i may attend to position j (level(j) ≤ level(i))."""
    levels = torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in enumerate(scales)])
    return (levels[None, :] <= levels[:, None]).to(device)


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block whose LayerNorm shifts, scales and residual gates come from the condition."""

    def __init__(self, dim: int, num_heads: int, ff_dim: int, cond_dim: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_dim, dim))
        self.drop = nn.Dropout(dropout)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Apply the block to ``x [B, T, D]``; with ``cache``, keys/values of earlier scales are reused and extended."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond)[:, None, :].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        b, t, d = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        x = x + gate1.add(1.0) * self.drop(self.proj(attn.transpose(1, 2).reshape(b, t, d)))
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2.add(1.0) * self.drop(self.ff(h))


class GeneVARTransformer(nn.Module):
    """Predict stage-1 tokens scale by scale.

    Parameters
    ----------
    scales
        Positions per stage-1 scale (resolved, e.g. ``(1, 8, 32, 200)``).
    code_dim
        Width of the stage-1 codes (``vqvae_config['embed_dim']``).
    num_positions
        Length of the tokenizer's feature map (G, or ``vqvae_config["gene_positions"]``), which cumulative features
        are upsampled to.
    config
        A complete ``var_config``.
    """

    def __init__(self, scales: tuple[int, ...], code_dim: int, num_positions: int, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)
        n_gen = config["generate_scales"] or len(scales)
        if n_gen > len(scales):
            raise ValueError(
                f"var_config['generate_scales']={n_gen} but stage 1 has only {len(scales)} scales {scales}."
            )
        self.all_scales = tuple(scales)
        self.scales = tuple(scales[:n_gen])
        self.seq_len = sum(self.scales)
        if self.seq_len > config["max_sequence_length"]:
            raise ValueError(
                f"The generated sequence has {self.seq_len} tokens, more than var_config['max_sequence_length']="
                f"{config['max_sequence_length']}; raise it or generate fewer scales."
            )
        self.num_positions = num_positions
        dim, cdim = config["embed_dim"], config["condition_embed_dim"]
        self.start = nn.Linear(cdim, dim)
        self.word_embed = nn.Linear(code_dim, dim)
        self.pos_embed = nn.Parameter(torch.randn(self.seq_len, dim) * 0.02)
        self.level_embed = nn.Parameter(torch.randn(len(self.scales), dim) * 0.02)
        self.blocks = nn.ModuleList(
            AdaLNBlock(dim, config["num_heads"], config["feedforward_dim"], cdim, config["dropout"])
            for _ in range(config["num_layers"])
        )
        self.head_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.head_ada = nn.Sequential(nn.SiLU(), nn.Linear(cdim, 2 * dim))
        nn.init.zeros_(self.head_ada[1].weight)
        nn.init.zeros_(self.head_ada[1].bias)
        self.head = nn.Linear(dim, config["vocab_size"])
        levels = torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in enumerate(self.scales)])
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("mask", block_causal_mask(self.scales), persistent=False)
        offsets = [0]
        for n in self.scales:
            offsets.append(offsets[-1] + n)
        self.offsets = tuple(offsets)

    # ------------------------------------------------------------------ pieces
    def scale_input(self, cond: torch.Tensor, k: int, f_hat: torch.Tensor | None) -> torch.Tensor:
        """Embedded input tokens of scale ``k`` (start token from the condition for k = 0)."""
        sl = slice(self.offsets[k], self.offsets[k + 1])
        if k == 0:
            x = self.start(cond)[:, None, :]
        else:
            x = self.word_embed(pool_genes(f_hat, self.scales[k]))
        return x + self.pos_embed[sl] + self.level_embed[k]

    def _head(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.head_ada(cond)[:, None, :].chunk(2, dim=-1)
        return self.head(self.head_norm(x) * (1 + scale) + shift)

    def teacher_inputs(self, cond: torch.Tensor, prefixes: list[torch.Tensor]) -> torch.Tensor:
        """Inputs of all generated scales at once from the true cumulative features (``prefixes[k]`` after scale k)."""
        parts = [self.scale_input(cond, 0, None)]
        for k in range(1, len(self.scales)):
            parts.append(self.scale_input(cond, k, prefixes[k - 1]))
        return torch.cat(parts, dim=1)

    def forward(self, cond: torch.Tensor, prefixes: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forced logits ``[B, L, V]`` for all generated positions (one pass, block-causal mask)."""
        x = self.teacher_inputs(cond, prefixes)
        mask = self.mask.to(x.device)
        for blk in self.blocks:
            x = blk(x, cond, mask=mask)
        return self._head(x, cond)

    def step(
        self, cond: torch.Tensor, k: int, f_hat: torch.Tensor | None, caches: list[dict[str, torch.Tensor]]
    ) -> torch.Tensor:
        """Logits of scale ``k`` given the cumulative features so far, extending the per-block KV caches."""
        x = self.scale_input(cond, k, f_hat)
        for blk, cache in zip(self.blocks, caches):
            x = blk(x, cond, mask=None, cache=cache)
        return self._head(x, cond)

    def step_recompute(self, cond: torch.Tensor, k: int, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Logits of scale ``k`` by re-running the whole prefix (no cache; for checks and speed comparisons)."""
        x = torch.cat(inputs, dim=1)
        end = self.offsets[k + 1]
        mask = self.mask[:end, :end].to(x.device)
        for blk in self.blocks:
            x = blk(x, cond, mask=mask)
        return self._head(x[:, self.offsets[k] :], cond)

    def upsample(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes of one scale ``[B, n, D]`` → contribution to the cumulative features ``[B, P, D]``."""
        return upsample_genes(codes, self.num_positions)
