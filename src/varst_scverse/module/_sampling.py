"""Turning next-scale logits into codes: temperature, top-k, top-p, greedy, and classifier-free guidance."""

from __future__ import annotations

import torch


def guide(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, cfg: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + cfg · (cond − uncond)``; ``cfg = 1`` is the plain conditional model."""
    if cfg == 1.0:
        return cond_logits
    return uncond_logits + cfg * (cond_logits - uncond_logits)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k and the top-p nucleus to ``-inf`` (the most likely code always survives)."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) >= top_p  # keep a code while the mass *before* it is < top_p
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def token_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Softmax of tempered, filtered logits."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for argmax decoding), got {temperature}.")
    return filter_logits(logits / temperature, top_k, top_p).softmax(-1)


def sample_tokens(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one code per position from ``probs [..., V]``."""
    flat = probs.reshape(-1, probs.shape[-1]).float()
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
