"""The complete Two-Stage VAR-ST torch module with the seed guide's tensor-level API.

Tensors in, tensors out, no AnnData: stage-1 loss, stage-2 loss, scale-by-scale generation with a KV cache, stage
switching and checkpoints. :class:`varst_scverse.VARST` wraps it and shares its checkpoint format.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ._checkpoint import load_checkpoint, save_checkpoint
from ._conditioning import ConditionEncoder
from ._config import resolve_configs, resolve_positions, resolve_scales
from ._sampling import guide, sample_tokens, token_probs
from ._var import GeneVARTransformer
from ._vqvae import MultiScaleGeneVQVAE

Decode = Literal["expected", "sample", "greedy"]
DECODES: tuple[str, ...] = ("expected", "sample", "greedy")


class TwoStageVARST(nn.Module):
    """Two-Stage VAR-ST: a multi-scale gene VQ-VAE (stage 1) and a next-scale VAR transformer (stage 2).

    Parameters
    ----------
    num_genes
        Genes per spot G.
    vqvae_config, var_config
        Overrides of the preset with the seed guide's key names.
    current_stage
        1 (train the tokenizer) or 2 (train the transformer on the frozen tokenizer).
    histology_dim
        Width of the histology embedding (1024 for UNI).
    preset
        ``"seed"`` or ``"cpu"``.

    Notes
    -----
    Expression tensors are ``log1p``-scale profiles with genes in the caller's order; the module keeps the clustered
    order (``gene_order``) internally.
    """

    def __init__(
        self,
        num_genes: int = 200,
        vqvae_config: dict[str, Any] | None = None,
        var_config: dict[str, Any] | None = None,
        current_stage: int = 1,
        histology_dim: int = 1024,
        preset: str = "seed",
    ) -> None:
        super().__init__()
        if num_genes < 1:
            raise ValueError(f"num_genes must be positive, got {num_genes}.")
        self.vqvae_config, self.var_config = resolve_configs(preset, vqvae_config, var_config)
        self.preset = preset
        self.num_genes = int(num_genes)
        self.histology_dim = int(histology_dim)
        # length of the tokenizer's feature map: G, or fewer positions pooling blocks of genes (gene_positions)
        self.num_positions = resolve_positions(self.vqvae_config["gene_positions"], self.num_genes)
        self.scales = resolve_scales(self.vqvae_config["scales"], self.num_positions, self.num_genes)
        self.register_buffer("gene_order", torch.arange(self.num_genes))
        # per-gene sd of what the decoded tokens cannot explain (observation noise), caller's gene order; set by
        # calibration after stage 2 and added to sampled draws so that predictive intervals cover observations
        self.register_buffer("noise_std", torch.zeros(self.num_genes))
        # the linear probe blended into decoded predictions (var_config["ridge_blend"]): expression = histology @
        # probe_weight + probe_bias in the caller's gene order; fitted after stage 2 (probe_alpha > 0 once fitted)
        self.register_buffer("probe_weight", torch.zeros(int(histology_dim), self.num_genes))
        self.register_buffer("probe_bias", torch.zeros(self.num_genes))
        self.register_buffer("probe_alpha", torch.zeros(1))
        self.vqvae = MultiScaleGeneVQVAE(self.num_genes, self.scales, self.vqvae_config)
        self.condition, self.var = self._new_stage2()
        # further stage-2 members of an ensemble (var_config["ensemble_size"] > 1): each its own condition encoder and
        # transformer, trained with its own seed on the same frozen tokenizer; see :meth:`member`
        self.extra_members = nn.ModuleList(
            [_Stage2Member(*self._new_stage2()) for _ in range(self.var_config["ensemble_size"] - 1)]
        )
        self.current_stage = 1
        self.stage1_trained = False
        self.stage2_trained = False
        if current_stage == 2:
            self.set_training_stage(2, _allow_untrained=True)
        elif current_stage != 1:
            raise ValueError(f"current_stage must be 1 or 2, got {current_stage}.")

    def _new_stage2(self) -> tuple[ConditionEncoder, GeneVARTransformer]:
        v = self.var_config
        condition = ConditionEncoder(
            self.histology_dim,
            v["condition_embed_dim"],
            n_fourier=v["num_fourier_features"],
            fourier_scale=v["fourier_scale"],
            use_neighbours=v["neighbour_k"] > 0,
            dropout=v["dropout"],
            coordinate_dropout=v["coordinate_dropout"],
        )
        return condition, GeneVARTransformer(self.scales, self.vqvae_config["embed_dim"], self.num_positions, v)

    # ------------------------------------------------------------------ ensemble members
    @property
    def n_members(self) -> int:
        """Stage-2 members (condition encoder + transformer pairs); 1 unless ``var_config["ensemble_size"]`` > 1."""
        return 1 + len(self.extra_members)

    @contextmanager
    def member(self, k: int) -> Iterator[None]:
        """Make stage-2 member ``k`` the active one (``self.condition`` / ``self.var``) inside the ``with`` block.

        Everything that trains or generates with one transformer (``stage2_loss``, :meth:`generate` of one member)
        uses the active pair; member 0 is active outside any block, so the weights' names in a checkpoint never
        depend on which member was last used.
        """
        if not 0 <= k < self.n_members:
            raise ValueError(f"member must lie in [0, {self.n_members - 1}], got {k}.")
        if k == 0:
            yield
            return
        other = self.extra_members[k - 1]
        self._swap(other)
        try:
            yield
        finally:
            self._swap(other)

    def _swap(self, other: _Stage2Member) -> None:
        self.condition, other.condition = other.condition, self.condition
        self.var, other.var = other.var, self.var

    @torch.no_grad()
    def set_histology_standardisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the training histology's per-feature mean and sd in every member's condition encoder."""
        for k in range(self.n_members):
            with self.member(k):
                self.condition.set_standardisation(mean, std)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def n_tokens(self) -> int:
        """Tokens per spot in stage 1 (241 for the default scales and 200 genes)."""
        return sum(self.scales)

    @property
    def n_generated_tokens(self) -> int:
        """Tokens per spot the transformer generates (a prefix of the scales when ``generate_scales`` is set)."""
        return self.var.seq_len

    def stage_modules(self) -> dict[int, list[nn.Module]]:
        """Modules trained in each stage."""
        return {1: [self.vqvae], 2: [self.condition, self.var, self.extra_members]}

    def get_model_info(self) -> dict[str, Any]:
        """Parameter counts per stage, current stage, vocabulary, scales and the configs."""

        def count(mods: list[nn.Module]) -> int:
            return sum(p.numel() for m in mods for p in m.parameters())

        per = {f"stage{k}_parameters": count(m) for k, m in self.stage_modules().items()}
        return {
            "total_parameters": sum(p.numel() for p in self.parameters()),
            **per,
            "trainable_parameters": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "current_stage": self.current_stage,
            "stage1_trained": self.stage1_trained,
            "stage2_trained": self.stage2_trained,
            "num_genes": self.num_genes,
            "num_positions": self.num_positions,
            "histology_dim": self.histology_dim,
            "vocab_size": self.vqvae_config["vocab_size"],
            "scales": list(self.scales),
            "n_tokens": self.n_tokens,
            "n_generated_tokens": self.n_generated_tokens,
            "generated_scales": list(self.var.scales),
            "ensemble_size": self.n_members,
            "preset": self.preset,
            "vqvae_config": _jsonable(self.vqvae_config),
            "var_config": _jsonable(self.var_config),
        }

    def set_training_stage(
        self, stage: int, stage1_ckpt_path: str | os.PathLike | None = None, *, _allow_untrained: bool = False
    ) -> None:
        """Switch stages. Stage 2 freezes the tokenizer; it needs a trained stage 1 or ``stage1_ckpt_path``."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}.")
        if stage == 2:
            if stage1_ckpt_path is not None:
                self.load_stage1(stage1_ckpt_path)
                self.stage1_trained = True  # an explicit stage-1 checkpoint is the caller's word that stage 1 is done
            if not (self.stage1_trained or _allow_untrained):
                raise RuntimeError(
                    "Stage 2 needs a trained stage-1 tokenizer: train stage 1 first "
                    "(model.train(stage=1) / `varst train --training_stage 1`) or pass the stage-1 checkpoint "
                    "(stage1_ckpt_path=... / --stage1_ckpt logs/<dataset>/TWO_STAGE_VAR_ST/stage1_vqvae/"
                    "best_vqvae.ckpt)."
                )
            self.vqvae.eval()
            self.vqvae.requires_grad_(False)
            self.condition.requires_grad_(True)
            self.var.requires_grad_(True)
            self.extra_members.requires_grad_(True)
        else:
            self.vqvae.requires_grad_(True)
        self.current_stage = stage

    def train(self, mode: bool = True) -> TwoStageVARST:
        """Like :meth:`torch.nn.Module.train`, but a frozen stage-1 tokenizer stays in eval mode in stage 2."""
        super().train(mode)
        if self.current_stage == 2:
            self.vqvae.eval()
        return self

    # ------------------------------------------------------------------ order helpers
    def to_model_order(self, y: torch.Tensor) -> torch.Tensor:
        """Caller's gene order → clustered order."""
        return y[..., self.gene_order]

    def to_caller_order(self, y: torch.Tensor) -> torch.Tensor:
        """Clustered order → caller's gene order."""
        inv = torch.empty_like(self.gene_order)
        inv[self.gene_order] = torch.arange(self.num_genes, device=self.gene_order.device)
        return y[..., inv]

    # ------------------------------------------------------------------ stage 1
    def stage1_loss(self, expression: torch.Tensor) -> dict[str, Any]:
        """VQ-VAE losses for a batch of log-scale profiles ``[B, G]``."""
        return self.vqvae(self.to_model_order(expression))

    @torch.no_grad()
    def tokenize(self, expression: torch.Tensor) -> torch.Tensor:
        """Stage-1 tokens ``[B, n_tokens]`` (scales concatenated coarse to fine)."""
        return torch.cat(self.vqvae.tokenize(self.to_model_order(expression)), dim=1)

    @torch.no_grad()
    def reconstruct(self, expression: torch.Tensor, n_scales: int | None = None) -> torch.Tensor:
        """Tokenize and decode (optionally from the ``n_scales`` coarsest scales), caller's gene order."""
        return self.to_caller_order(self.vqvae.reconstruct(self.to_model_order(expression), n_scales))

    # ------------------------------------------------------------------ stage 2
    def _condition(self, histology, coords, neighbours=None, drop_mask=None) -> torch.Tensor:
        if histology.shape[-1] != self.histology_dim:
            raise ValueError(
                f"Histology features have width {histology.shape[-1]} but the model was built for "
                f"{self.histology_dim}; embed with the same encoder as in training."
            )
        return self.condition(histology, coords, neighbours, drop_mask)

    def stage2_loss(
        self,
        expression: torch.Tensor,
        histology: torch.Tensor,
        coords: torch.Tensor,
        neighbours: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Cross-entropy on stage-1 tokens (+ optional expected-value decode MSE) with teacher forcing.

        ``tokens [B, n_tokens]`` may be passed when precomputed (stage 1 is frozen, so they never change).
        """
        y = self.to_model_order(expression)
        if tokens is None:
            tokens = self.vqvae.tokenize(y)
        else:
            tokens = list(tokens.split(list(self.scales), dim=1))
        m = len(self.var.scales)
        quant = self.vqvae.quantizer
        prefixes = quant.tokens_to_prefixes(tokens[: max(m - 1, 1)])
        drop = None
        p = self.var_config["condition_dropout"]
        if self.training and p > 0:
            drop = torch.rand(y.shape[0], device=y.device) < p
        cond = self._condition(histology, coords, neighbours, drop)
        logits = self.var(cond, prefixes)
        target = torch.cat(tokens[:m], dim=1)
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            target.reshape(-1),
            label_smoothing=self.var_config["label_smoothing"],
        )
        hits = (logits.argmax(-1) == target).float()
        acc = [hits[:, a:b].mean().detach() for a, b in zip(self.var.offsets[:-1], self.var.offsets[1:])]
        out: dict[str, Any] = {"ce_loss": ce.detach(), "token_accuracy": acc}
        loss = ce
        w = self.var_config["aux_decode_weight"]
        if w > 0:
            if self.var_config["aux_decode_mode"] == "free":
                f_exp = self._expected_rollout(cond)
            else:
                f_exp = self._expected_features(logits.float().softmax(-1))
            z_pred = self.vqvae.decode_standardised(f_exp)
            aux = F.mse_loss(z_pred, self.vqvae.standardise(y))
            loss = loss + w * aux
            out["aux_decode_loss"] = aux.detach()
        out["loss"] = loss
        return out

    def _expected_rollout(self, cond: torch.Tensor) -> torch.Tensor:
        """Differentiable expected-value generation: each scale sees the expected codes of the coarser ones.

        This is exactly what ``generate(decode="expected")`` computes at inference, so the auxiliary loss trains the
        point prediction as it will be made (no teacher forcing, no exposure bias).
        """
        caches: list[dict[str, torch.Tensor]] = [{} for _ in self.var.blocks]
        f_hat = None
        for k in range(len(self.var.scales)):
            probs = self.var.step(cond, k, f_hat, caches).float().softmax(-1)
            up = self.var.upsample(self.vqvae.quantizer.embed_probs(probs))
            f_hat = up if f_hat is None else f_hat + up
        return f_hat

    def _expected_features(self, probs: torch.Tensor) -> torch.Tensor:
        """Cumulative features from per-position code probabilities ``[B, L, V]`` over the generated scales."""
        f_hat = None
        for k in range(len(self.var.scales)):
            codes = self.vqvae.quantizer.embed_probs(probs[:, self.var.offsets[k] : self.var.offsets[k + 1]])
            up = self.var.upsample(codes)
            f_hat = up if f_hat is None else f_hat + up
        return f_hat

    @torch.no_grad()
    def generate(
        self,
        histology: torch.Tensor,
        coords: torch.Tensor,
        neighbours: torch.Tensor | None = None,
        decode: Decode = "expected",
        n_samples: int = 1,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg: float = 1.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        return_prefixes: bool = False,
        add_noise: bool = False,
        ridge_blend: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Generate tokens scale by scale and decode them with the frozen stage-1 decoder.

        Parameters
        ----------
        histology, coords, neighbours
            Condition inputs ``[B, H]``, ``[B, 2]`` (normalised per section), ``[B, H]`` or None.
        decode
            ``"expected"``: feed and decode the probability-weighted mean code at each scale (deterministic);
            ``"sample"``: draw one code per position; ``"greedy"``: the most likely code.
        n_samples
            Independent draws (only ``"sample"`` differs between draws).
        temperature, top_k, top_p
            Sampling controls applied to the logits.
        cfg
            Classifier-free guidance scale; 1 = none.
        generator
            Seeded generator for reproducible draws.
        use_cache
            One pass per scale over the new tokens with cached keys/values (True) or re-run the prefix (False).
        return_prefixes
            Also decode the expression after every scale.
        add_noise
            Add the calibrated per-gene observation noise (``noise_std``) to each decoded draw, so that the spread
            of the draws is a predictive distribution for observed expression, not only for the mean.
        ridge_blend
            Weight of the fitted linear probe in every decoded output (draws, prefixes): ``(1 - w) * decoded + w *
            probe``; None = ``var_config["ridge_blend"]``, 0 = the transformer alone. Ignored while no probe is
            fitted (:meth:`set_probe`).

        Returns
        -------
        dict with ``expression [n_samples, B, G]`` (caller's gene order), ``tokens [n_samples, B, L]`` and, when
        asked, ``prefix_expression [n_scales, n_samples, B, G]``.

        Notes
        -----
        With several stage-2 members (``var_config["ensemble_size"]``), ``"expected"`` and ``"greedy"`` average the
        members' decoded expression (and prefixes; the tokens are the first member's), and ``"sample"`` draws from
        the mixture: the draws are shared out among the members in turn, from a random starting member.
        """
        if decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, got {decode!r}.")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
        kw = {"decode": decode, "temperature": temperature, "top_k": top_k, "top_p": top_p, "cfg": cfg}
        kw.update(generator=generator, use_cache=use_cache, return_prefixes=return_prefixes)
        n = self.n_members
        counts = [n_samples] * n  # draws per member
        if decode == "sample" and n > 1:
            # a mixture over the members: draw d comes from member (d + offset) % n, with a random offset so that a
            # single draw is not always the first member's
            offset = int(torch.randint(n, (1,), generator=generator, device=generator.device if generator else None))
            counts = [len(range((k - offset) % n, n_samples, n)) for k in range(n)]
        parts = []
        for k, count in enumerate(counts):
            if count:
                with self.member(k):
                    parts.append(self._generate_member(histology, coords, neighbours, n_samples=count, **kw))
        if len(parts) == 1:
            expr, tokens, prefixes = parts[0]
        elif decode == "sample":
            expr = torch.cat([p[0] for p in parts])
            tokens = torch.cat([p[1] for p in parts])
            prefixes = [torch.cat(x, 1) for x in zip(*[p[2] for p in parts])]
        else:  # deterministic decodes: the members' mean (tokens: the first member's)
            expr = torch.stack([p[0] for p in parts]).mean(0)
            tokens = parts[0][1]
            prefixes = [torch.stack(x).mean(0) for x in zip(*[p[2] for p in parts])]
        w = self.var_config["ridge_blend"] if ridge_blend is None else float(ridge_blend)
        if w > 0 and self.has_probe:
            lin = self.probe(histology).to(expr.dtype)
            expr = (1 - w) * expr + w * lin
            prefixes = [(1 - w) * p + w * lin for p in prefixes]
        if add_noise and bool((self.noise_std > 0).any()):
            noise = torch.randn(expr.shape, generator=generator, dtype=expr.dtype, device=expr.device)
            expr = expr + noise * self.noise_std
        out = {"expression": expr, "tokens": tokens}
        if return_prefixes:
            out["prefix_expression"] = torch.stack(prefixes)
        return out

    def _generate_member(
        self,
        histology: torch.Tensor,
        coords: torch.Tensor,
        neighbours: torch.Tensor | None,
        decode: Decode,
        n_samples: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        cfg: float,
        generator: torch.Generator | None,
        use_cache: bool,
        return_prefixes: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The active member's generation: decoded ``[n_samples, B, G]``, tokens ``[n_samples, B, L]``, prefixes."""
        b = histology.shape[0]
        cond = self._condition(histology, coords, neighbours)
        if n_samples > 1:
            cond = cond.repeat(n_samples, 1)
        guided = cfg != 1.0
        c_in = torch.cat([cond, self.condition.null_condition(cond.shape[0])]) if guided else cond
        quant = self.vqvae.quantizer
        caches: list[dict[str, torch.Tensor]] = [{} for _ in self.var.blocks]
        inputs: list[torch.Tensor] = []
        f_hat = None
        tokens, prefixes = [], []
        for k in range(len(self.var.scales)):
            f_in = None if f_hat is None else (torch.cat([f_hat, f_hat]) if guided else f_hat)
            if use_cache:
                logits = self.var.step(c_in, k, f_in, caches)
            else:
                inputs.append(self.var.scale_input(c_in, k, f_in))
                logits = self.var.step_recompute(c_in, k, inputs)
            logits = logits.float()
            if guided:
                logits = guide(*logits.chunk(2), cfg)
            if decode == "greedy":
                idx = logits.argmax(-1)
                codes = quant.embed(idx)
            else:
                probs = token_probs(logits, temperature, top_k, top_p)
                if decode == "expected":
                    idx = probs.argmax(-1)
                    codes = quant.embed_probs(probs)
                else:
                    idx = sample_tokens(probs, generator)
                    codes = quant.embed(idx)
            up = self.var.upsample(codes.to(cond.dtype))
            f_hat = up if f_hat is None else f_hat + up
            tokens.append(idx)
            if return_prefixes:
                prefixes.append(self.to_caller_order(self.vqvae.decode(f_hat)).reshape(n_samples, b, -1))
        expr = self.to_caller_order(self.vqvae.decode(f_hat)).reshape(n_samples, b, -1)
        return expr, torch.cat(tokens, 1).reshape(n_samples, b, -1), prefixes

    # ------------------------------------------------------------------ linear probe
    @property
    def has_probe(self) -> bool:
        """Whether the linear probe of ``var_config["ridge_blend"]`` is fitted."""
        return bool(self.probe_alpha[0] > 0)

    def probe(self, histology: torch.Tensor) -> torch.Tensor:
        """The linear probe's prediction ``[B, G]`` (caller's gene order) from raw histology features ``[B, H]``."""
        return histology.to(self.probe_weight.dtype) @ self.probe_weight + self.probe_bias

    @torch.no_grad()
    def set_probe(self, weight: torch.Tensor, bias: torch.Tensor, alpha: float) -> None:
        """Store a fitted linear probe: ``weight [H, G]``, ``bias [G]`` (caller's gene order) and its penalty."""
        if tuple(weight.shape) != tuple(self.probe_weight.shape) or tuple(bias.shape) != tuple(self.probe_bias.shape):
            raise ValueError(
                f"probe weight {tuple(weight.shape)} / bias {tuple(bias.shape)} must be "
                f"{tuple(self.probe_weight.shape)} / {tuple(self.probe_bias.shape)} (histology dim x genes)."
            )
        if not alpha > 0:
            raise ValueError(f"the probe's alpha must be positive, got {alpha}.")
        self.probe_weight.copy_(weight)
        self.probe_bias.copy_(bias)
        self.probe_alpha.fill_(float(alpha))

    def fill_missing_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` plus this module's own values for the buffers that checkpoints of earlier versions lack."""
        own = self.state_dict()
        return {**{k: own[k] for k in _LATER_BUFFERS if k not in tensors}, **tensors}

    @torch.no_grad()
    def inference(
        self,
        histology_features: torch.Tensor,
        spatial_coords: torch.Tensor,
        temperature: float = 1.0,
        top_k: int | None = 50,
        top_p: float | None = 0.9,
        neighbour_features: torch.Tensor | None = None,
        decode: Decode = "sample",
        cfg: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """The seed guide's inference call: one draw per spot.

        Returns
        -------
        dict with ``predicted_gene_expression [B, G]`` and ``tokens [B, L]`` (L = 241 with all four scales).
        """
        was_training = self.training
        self.eval()
        try:
            out = self.generate(
                histology_features,
                spatial_coords,
                neighbour_features,
                decode=decode,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                cfg=cfg,
                generator=generator,
            )
        finally:
            self.train(was_training)
        return {"predicted_gene_expression": out["expression"][0], "tokens": out["tokens"][0]}

    # ------------------------------------------------------------------ checkpoints
    def _meta(self, kind: str) -> dict[str, Any]:
        return {
            "kind": kind,
            "num_genes": self.num_genes,
            "histology_dim": self.histology_dim,
            "preset": self.preset,
            "vqvae_config": _jsonable(self.vqvae_config),
            "var_config": _jsonable(self.var_config),
            "current_stage": self.current_stage,
            "stage1_trained": self.stage1_trained,
            "stage2_trained": self.stage2_trained,
        }

    def save_stage_checkpoint(
        self, path: str | os.PathLike, stage: int = 1, extra_meta: dict[str, Any] | None = None
    ) -> None:
        """Save the weights of one stage (stage 1: the tokenizer and gene order; stage 2: everything).

        ``extra_meta`` (JSON-serialisable, e.g. the gene names) is stored beside the configs in the metadata and
        returned by :func:`~varst_scverse.module.load_checkpoint`; it may not replace the module's own keys.
        """
        if stage == 1:
            tensors = {f"vqvae.{k}": v for k, v in self.vqvae.state_dict().items()}
            tensors["gene_order"] = self.gene_order
            save_checkpoint(path, tensors, _with_extra(self._meta("stage1"), extra_meta))
        elif stage == 2:
            self.save_complete_model(path, extra_meta=extra_meta)
        else:
            raise ValueError(f"stage must be 1 or 2, got {stage}.")

    def save_complete_model(self, path: str | os.PathLike, extra_meta: dict[str, Any] | None = None) -> None:
        """Save both stages and the configs to one safetensors file (``extra_meta``: see save_stage_checkpoint)."""
        save_checkpoint(path, self.state_dict(), _with_extra(self._meta("complete"), extra_meta))

    def load_stage1(self, path: str | os.PathLike) -> None:
        """Load tokenizer weights from a stage-1 (or complete) checkpoint into this model."""
        tensors, meta = load_checkpoint(path)
        if meta["num_genes"] != self.num_genes:
            raise ValueError(f"{path} was trained on {meta['num_genes']} genes; this model has {self.num_genes}.")
        for key in ("vocab_size", "embed_dim", "scales", "gene_positions"):
            if _jsonable(meta["vqvae_config"].get(key)) != _jsonable(self.vqvae_config[key]):
                raise ValueError(
                    f"{path} has vqvae_config[{key!r}]={meta['vqvae_config'].get(key)!r}, this model "
                    f"{self.vqvae_config[key]!r}; build the model with the checkpoint's vqvae_config."
                )
        sub = {k[len("vqvae.") :]: v for k, v in tensors.items() if k.startswith("vqvae.")}
        self.vqvae.load_state_dict(sub)
        self.gene_order.copy_(tensors["gene_order"])
        self.stage1_trained = bool(meta.get("stage1_trained", True))

    @classmethod
    def from_checkpoint_meta(cls, meta: dict[str, Any]) -> TwoStageVARST:
        """An untrained module with the architecture a checkpoint's metadata describes."""
        return cls(
            num_genes=meta["num_genes"],
            vqvae_config=_from_json_vq(meta["vqvae_config"]),
            var_config=meta["var_config"],
            histology_dim=meta["histology_dim"],
            preset="seed",
        )

    @classmethod
    def load_complete_model(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> TwoStageVARST:
        """Build a module from a checkpoint file (complete or stage 1) and move it to ``device``."""
        tensors, meta = load_checkpoint(path)
        model = cls.from_checkpoint_meta(meta)
        if meta["kind"] == "stage1":
            model.load_stage1(path)
        else:
            try:
                model.load_state_dict(model.fill_missing_state(tensors))
            except RuntimeError as err:
                raise ValueError(f"{path}: the weights do not match the architecture in its metadata: {err}") from err
            model.stage1_trained = bool(meta["stage1_trained"])
            model.stage2_trained = bool(meta["stage2_trained"])
            if meta["current_stage"] == 2:
                model.set_training_stage(2, _allow_untrained=True)
        return model.to(device)


#: buffers added after the first checkpoint format; older files lack them (no probe: the transformer alone)
_LATER_BUFFERS: tuple[str, ...] = ("probe_weight", "probe_bias", "probe_alpha")


class _Stage2Member(nn.Module):
    """A further stage-2 member of an ensemble: a condition encoder and a transformer (see ``TwoStageVARST.member``)."""

    def __init__(self, condition: ConditionEncoder, var: GeneVARTransformer) -> None:
        super().__init__()
        self.condition = condition
        self.var = var


def _with_extra(meta: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    """The module's checkpoint metadata plus caller-supplied entries, which may not shadow the module's keys."""
    if not extra:
        return meta
    clash = sorted(set(extra) & (set(meta) | {"format", "version", "sha256"}))
    if clash:
        raise ValueError(f"extra_meta may not replace the checkpoint's own metadata keys {clash}.")
    return {**meta, **_jsonable(dict(extra))}


def _jsonable(cfg: Any) -> Any:
    if isinstance(cfg, dict):
        return {k: _jsonable(v) for k, v in cfg.items()}
    if isinstance(cfg, tuple | list):
        return [_jsonable(v) for v in cfg]
    return cfg


def _from_json_vq(cfg: dict[str, Any]) -> dict[str, Any]:
    out = dict(cfg)
    out["scales"] = tuple(out["scales"])
    return out
