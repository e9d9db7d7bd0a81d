"""Condition vector for stage 2: histology embedding + Fourier features of the per-section coordinates.

Optionally the mean histology of a spot's nearest spatial neighbours joins in. A learned null condition stands in for
dropped conditions, which is what classifier-free guidance contrasts against at inference.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FourierFeatures(nn.Module):
    """``[B, 2]`` coordinates in about ``[-1, 1]`` → ``[B, 4·n + 2]`` sines and cosines at geometric frequencies."""

    def __init__(self, n_frequencies: int, max_frequency: float) -> None:
        super().__init__()
        freqs = torch.logspace(0.0, math.log10(max(max_frequency, 1.0)), n_frequencies) * math.pi
        self.register_buffer("freqs", freqs)
        self.out_dim = 4 * n_frequencies + 2

    def forward(self, xy: torch.Tensor) -> torch.Tensor:  # noqa: D102
        angles = xy[:, :, None] * self.freqs  # [B, 2, n]
        return torch.cat([xy, angles.sin().flatten(1), angles.cos().flatten(1)], dim=1)


class ConditionEncoder(nn.Module):
    """Histology ``[B, H]`` (+ coordinates ``[B, 2]``, + neighbour histology ``[B, H]``) → condition ``[B, C]``.

    Parameters
    ----------
    histology_dim
        Width H of the histology embedding (1024 for UNI; any width works).
    cond_dim
        Width C of the condition vector.
    n_fourier, fourier_scale
        Frequencies per axis and highest frequency of the coordinate features.
    use_neighbours
        Whether a neighbour-mean histology input is expected.
    dropout
        Dropout inside the projections.
    coordinate_dropout
        Probability, per spot in training, of hiding the coordinate features, so that the model cannot lean on
        within-section position (which does not carry over to a new section); 1 switches coordinates off.
    """

    def __init__(
        self,
        histology_dim: int,
        cond_dim: int,
        n_fourier: int = 16,
        fourier_scale: float = 4.0,
        use_neighbours: bool = False,
        dropout: float = 0.1,
        coordinate_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.coordinate_dropout = coordinate_dropout
        self.histology_dim = histology_dim
        self.use_neighbours = use_neighbours
        self.register_buffer("hist_mean", torch.zeros(histology_dim))
        self.register_buffer("hist_std", torch.ones(histology_dim))
        self.hist = nn.Sequential(
            nn.Linear(histology_dim, cond_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(cond_dim, cond_dim)
        )
        self.fourier = FourierFeatures(n_fourier, fourier_scale)
        self.coords = nn.Sequential(nn.Linear(self.fourier.out_dim, cond_dim), nn.GELU(), nn.Linear(cond_dim, cond_dim))
        self.neigh = (
            nn.Sequential(nn.Linear(histology_dim, cond_dim), nn.GELU(), nn.Linear(cond_dim, cond_dim))
            if use_neighbours
            else None
        )
        self.norm = nn.LayerNorm(cond_dim)
        self.null = nn.Parameter(torch.zeros(cond_dim))

    @torch.no_grad()
    def set_standardisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the training histology mean/std (std floored)."""
        self.hist_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.hist_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6))

    def forward(
        self,
        histology: torch.Tensor,
        coords: torch.Tensor,
        neighbours: torch.Tensor | None = None,
        drop_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Condition vectors; rows where ``drop_mask`` is True get the learned null condition."""
        h = (histology - self.hist_mean) / self.hist_std
        c = self.hist(h)
        if self.coordinate_dropout < 1.0:
            xy = self.coords(self.fourier(coords))
            if self.training and self.coordinate_dropout > 0:
                keep = torch.rand(xy.shape[0], 1, device=xy.device) >= self.coordinate_dropout
                xy = xy * keep
            c = c + xy
        if self.neigh is not None:
            if neighbours is None:
                raise ValueError("This model was built with neighbour context; pass the neighbour-mean histology.")
            c = c + self.neigh((neighbours - self.hist_mean) / self.hist_std)
        c = self.norm(c)
        if drop_mask is not None:
            c = torch.where(drop_mask[:, None], self.null.expand_as(c), c)
        return c

    def null_condition(self, batch_size: int) -> torch.Tensor:
        """The unconditional vector repeated ``batch_size`` times."""
        return self.null[None].expand(batch_size, -1)
