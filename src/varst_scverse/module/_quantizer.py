"""Residual multi-scale vector quantisation over the ordered gene axis, with ONE shared codebook.

For each scale the remaining residual is pooled to that scale's number of positions, snapped to the nearest code,
interpolated back to one position per gene and subtracted — the VAR tokenizer's scheme, on genes instead of pixels.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

_LOOKUP_CHUNK = 8192


@functools.lru_cache(maxsize=64)
def _resampling_matrix(n_out: int, n_in: int, kind: str) -> torch.Tensor:
    """``[n_out, n_in]`` matrix of area pooling (``"pool"``) or linear interpolation (``"up"``) along the gene axis.

    Built once per size pair by applying the torch operator to the identity, so that a matrix product reproduces
    ``adaptive_avg_pool1d`` / ``interpolate(mode="linear", align_corners=False)`` exactly; a product (and its
    backward, another product) is several times faster on CPU than those operators' kernels.
    """
    # cached across calls: built as a plain tensor even when the first call comes from inside inference mode
    with torch.inference_mode(False), torch.no_grad():
        eye = torch.eye(n_in, dtype=torch.float64)[None]  # [1, n_in (channels), n_in (length)]
        if kind == "pool":
            out = F.adaptive_avg_pool1d(eye, n_out)
        else:
            out = F.interpolate(eye, size=n_out, mode="linear", align_corners=False)
        return out[0].T.contiguous().float()  # [n_out, n_in]


def _resample(x: torch.Tensor, n_out: int, kind: str) -> torch.Tensor:
    m = _resampling_matrix(n_out, x.shape[1], kind).to(device=x.device, dtype=x.dtype)
    return torch.matmul(m, x)  # [n_out, n] @ [B, n, D] → [B, n_out, D]


def pool_genes(x: torch.Tensor, n: int) -> torch.Tensor:
    """Average ``[B, G, D]`` over contiguous gene blocks down to ``[B, n, D]`` (area pooling)."""
    if x.shape[1] == n:
        return x
    if n == 1:
        return x.mean(1, keepdim=True)
    return _resample(x, n, "pool")


def upsample_genes(x: torch.Tensor, num_genes: int) -> torch.Tensor:
    """Linearly interpolate ``[B, n, D]`` back to ``[B, G, D]`` (constant for ``n == 1``)."""
    if x.shape[1] == num_genes:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, num_genes, -1)
    return _resample(x, num_genes, "up")


class MultiScaleResidualQuantizer(nn.Module):
    """Quantise a per-gene feature map into tokens at several scales.

    Parameters
    ----------
    num_positions
        Length of the feature map (G, or ``vqvae_config["gene_positions"]`` when that pools the genes).
    scales
        Positions per scale, coarse to fine, e.g. ``(1, 8, 32, 200)``.
    vocab_size, embed_dim
        Codebook size and code width.
    beta
        Commitment weight.
    codebook_update
        ``"ema"``: codes follow exponential moving averages of their assigned vectors; ``"loss"``: codes learn by
        gradient from the codebook loss.
    ema_decay
        Decay of the moving averages.
    dead_code_threshold
        Codes whose moving-average usage (assignments per step) falls below this are restarted on random current
        residuals. A restarted code starts at 1, so an unused code lives ``log(threshold) / log(ema_decay)`` steps.
    """

    def __init__(
        self,
        num_positions: int,
        scales: tuple[int, ...],
        vocab_size: int,
        embed_dim: int,
        beta: float = 0.25,
        codebook_update: str = "ema",
        ema_decay: float = 0.99,
        dead_code_threshold: float = 0.03,
    ) -> None:
        super().__init__()
        self.num_positions = num_positions
        self.scales = tuple(int(s) for s in scales)
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.beta = beta
        self.use_ema = codebook_update == "ema"
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold
        init = torch.randn(vocab_size, embed_dim) / embed_dim**0.5
        if self.use_ema:
            self.register_buffer("codebook", init)
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("ema_count", torch.ones(vocab_size))
        self.register_buffer("ema_sum", init.clone())
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.register_buffer("usage", torch.zeros(vocab_size, dtype=torch.long))

    @property
    def n_tokens(self) -> int:
        """Tokens per spot over all scales."""
        return sum(self.scales)

    # ------------------------------------------------------------------ lookup
    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared Euclidean) for each row of ``z [..., D]``."""
        flat = z.reshape(-1, z.shape[-1]).float()
        book = self.codebook.float()
        book_sq = (book * book).sum(1)
        out = []
        for chunk in flat.split(_LOOKUP_CHUNK):
            out.append(torch.addmm(book_sq[None, :], chunk, book.T, alpha=-2.0).argmin(1))
        return torch.cat(out).reshape(z.shape[:-1])

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Code vectors of token indices ``[...]`` → ``[..., D]``."""
        return F.embedding(idx, self.codebook)

    def embed_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """Probability-weighted mean code ``[..., V] → [..., D]`` (expected-value decoding)."""
        return probs @ self.codebook.to(probs.dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Quantise ``feats [B, G, D]``.

        Returns
        -------
        dict with ``f_hat`` (straight-through quantised features), ``prefixes`` (cumulative ``f_hat`` after each
        scale), ``tokens`` (list of ``[B, n_k]``), ``vq_loss`` (codebook + beta·commitment, averaged over scales),
        ``commitment``.
        """
        if self.training and self.use_ema and not bool(self.initialised):
            self._init_from_data(feats.detach())
        residual = feats
        f_hat = torch.zeros_like(feats)
        prefixes, tokens, pooled_all, idx_all = [], [], [], []
        commit = feats.new_zeros(())
        book_loss = feats.new_zeros(())
        for n in self.scales:
            pooled = pool_genes(residual, n)
            idx = self.lookup(pooled.detach())
            q = self.embed(idx)
            commit = commit + F.mse_loss(pooled, q.detach())
            if not self.use_ema:
                book_loss = book_loss + F.mse_loss(q, pooled.detach())
            q_st = pooled + (q - pooled).detach()
            up = upsample_genes(q_st, self.num_positions)
            f_hat = f_hat + up
            residual = residual - up
            prefixes.append(f_hat)
            tokens.append(idx)
            pooled_all.append(pooled.detach().reshape(-1, self.embed_dim))
            idx_all.append(idx.reshape(-1))
        k = len(self.scales)
        commit = commit / k
        vq_loss = book_loss / k + self.beta * commit
        if self.training:
            self._update_codebook(torch.cat(pooled_all), torch.cat(idx_all))
        return {"f_hat": f_hat, "prefixes": prefixes, "tokens": tokens, "vq_loss": vq_loss, "commitment": commit}

    @torch.no_grad()
    def tokenize(self, feats: torch.Tensor) -> list[torch.Tensor]:
        """Tokens per scale for ``feats [B, G, D]`` without touching the codebook statistics."""
        residual = feats
        tokens = []
        for n in self.scales:
            idx = self.lookup(pool_genes(residual, n))
            residual = residual - upsample_genes(self.embed(idx), self.num_positions)
            tokens.append(idx)
        return tokens

    def tokens_to_prefixes(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """Cumulative quantised features after each given scale (``len(tokens)`` may be a prefix of the scales)."""
        out, f_hat = [], None
        for idx in tokens:
            up = upsample_genes(self.embed(idx), self.num_positions)
            f_hat = up if f_hat is None else f_hat + up
            out.append(f_hat)
        return out

    # ------------------------------------------------------------------ codebook maintenance
    @torch.no_grad()
    def _init_from_data(self, feats: torch.Tensor) -> None:
        vecs = torch.cat([pool_genes(feats, n).reshape(-1, self.embed_dim) for n in self.scales])
        pick = torch.randint(0, vecs.shape[0], (self.vocab_size,), device=vecs.device)
        self.codebook.data.copy_(vecs[pick])
        self.ema_sum.copy_(vecs[pick])
        self.ema_count.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _update_codebook(self, vecs: torch.Tensor, idx: torch.Tensor) -> None:
        vecs = vecs.float()
        counts = torch.bincount(idx, minlength=self.vocab_size).to(vecs.dtype)
        self.usage += counts.long()
        if self.use_ema:
            sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, vecs)
            self.ema_count.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
            self.ema_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
            n = self.ema_count.sum()
            smoothed = (self.ema_count + 1e-5) / (n + self.vocab_size * 1e-5) * n
            self.codebook.data.copy_(self.ema_sum / smoothed[:, None])
        else:
            self.ema_count.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
        dead = self.ema_count < self.dead_code_threshold
        n_dead = int(dead.sum())
        if n_dead:
            pick = torch.randint(0, vecs.shape[0], (n_dead,), device=vecs.device)
            new = vecs[pick] + 1e-3 * torch.randn_like(vecs[pick])
            self.codebook.data[dead] = new.to(self.codebook.dtype)
            self.ema_sum[dead] = new
            self.ema_count[dead] = 1.0

    def reset_usage(self) -> None:
        """Zero the running code-usage counter (call at the start of an epoch)."""
        self.usage.zero_()
