"""Methods of the benchmark: the field's baselines through ``tl.baseline_predict``, VARST, and the non-AR control."""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from anndata import AnnData

from .._constants import ADATA_KEYS
from ._data import HIST_KEY, RGB_KEY, Fold, query_without_counts, section_mask

#: baselines run on both feature sets (the RGB ones get the suffix ``_rgb``)
FEATURE_BASELINES: tuple[str, ...] = ("ridge", "ridge_cv", "mlp", "knn")
#: baselines that ignore the features
FEATURELESS: tuple[str, ...] = ("mean", "depth_oracle")


@dataclass
class VARSTSettings:
    """How VARST is trained in the benchmark (the cpu preset with the demo's learning rates)."""

    stage1_epochs: int = 5
    stage1_max_steps: int | None = None  # cap on stage-1 optimizer steps (whichever of the two ends first)
    stage2_epochs: int = 25
    stage1_lr: float = 2e-3
    stage2_lr: float = 1e-3
    n_samples: int = 16
    preset: str = "cpu"
    var_config: dict[str, Any] = field(default_factory=dict)
    vqvae_config: dict[str, Any] = field(default_factory=dict)
    accelerator: str = "cpu"


#: torch threads for model work; re-applied before each fit because scanpy's gene selection (through the OpenMP
#: runtime torch shares) resets torch's thread count to the number of cores
THREADS: list[int] = [1]


def apply_threads() -> None:
    """Set torch's thread count to the benchmark's (``THREADS[0]``) again."""
    import torch

    if torch.get_num_threads() != THREADS[0]:
        torch.set_num_threads(THREADS[0])


def quiet_lightning() -> None:
    """Silence Lightning's per-fit banners (GPU/TPU availability, seed) in long benchmark logs."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")


# ---------------------------------------------------------------------------------------------------------- baselines
def run_baselines(
    adata: AnnData, fold: Fold, genes: list[str], target: str, seed: int = 0, only: tuple[str, ...] | None = None
) -> dict[str, np.ndarray]:
    """Predictions of every baseline (or of ``only``) for the test section: morphology and RGB features, featureless."""
    import varst_scverse as varst

    train = adata[section_mask(adata, fold.train)]
    query = adata[section_mask(adata, [fold.test])]
    out: dict[str, np.ndarray] = {}
    times: dict[str, float] = {}
    for feat_key, suffix in ((HIST_KEY, ""), (RGB_KEY, "_rgb")):
        for method in FEATURE_BASELINES:
            if only is not None and method + suffix not in only:
                continue
            t0 = time.perf_counter()
            out[method + suffix] = varst.tl.baseline_predict(
                method, train, query, histology_key=feat_key, genes=genes, target=target, seed=seed
            )
            times[method + suffix] = time.perf_counter() - t0
    for method in FEATURELESS:
        if only is not None and method not in only:
            continue
        t0 = time.perf_counter()
        out[method] = varst.tl.baseline_predict(
            method, train, query, histology_key=HIST_KEY, genes=genes, target=target
        )
        times[method] = time.perf_counter() - t0
    out["_seconds"] = times  # type: ignore[assignment]
    return out


# ---------------------------------------------------------------------------------------------------------- VARST
def varst_training_data(adata: AnnData, fold: Fold, genes: list[str], tokenizer: str = "all") -> AnnData:
    """Spots the model learns from, registered: the tokenizer's sections, histology only on the training sections."""
    import varst_scverse as varst

    sections = fold.tokenizer_sections(list(dict.fromkeys(adata.obs[ADATA_KEYS.SECTION].astype(str))), tokenizer)
    rows = section_mask(adata, sections)
    train = adata[rows, genes].copy()
    hist = np.array(train.obsm[HIST_KEY], dtype=np.float32, copy=True)
    hist[~section_mask(train, fold.train)] = np.nan  # stage 2 sees only the fold's training sections
    train.obsm[HIST_KEY] = hist
    del train.obsm[RGB_KEY]
    varst.VARST.setup_anndata(
        train, layer=ADATA_KEYS.COUNTS_LAYER, histology_key=HIST_KEY, batch_key=ADATA_KEYS.SECTION
    )
    return train


def fit_varst(
    train: AnnData,
    target: str,
    settings: VARSTSettings,
    seed: int = 0,
    stage1_from=None,
    var_config: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, float]]:
    """Train a VARST (both stages, or stage 2 on the tokenizer of ``stage1_from``); return it and the seconds."""
    import varst_scverse as varst

    apply_threads()
    cfg = {**settings.var_config, **(var_config or {})}
    model = varst.VARST(
        train,
        preset=settings.preset,
        vqvae_config=settings.vqvae_config or None,
        var_config=cfg or None,
        target=target,
        seed=seed,
    )
    secs: dict[str, float] = {}
    if stage1_from is None:
        t0 = time.perf_counter()
        extra = {"max_steps": settings.stage1_max_steps} if settings.stage1_max_steps else {}
        hist = model.train(
            stage=1,
            max_epochs=settings.stage1_epochs,
            lr=settings.stage1_lr,
            enable_progress_bar=False,
            accelerator=settings.accelerator,
            **extra,
        )
        secs["stage1"] = time.perf_counter() - t0
        secs["stage1_spots"] = float(train.n_obs)
        secs["stage1_epochs_run"] = float(len(hist))
    else:
        _copy_stage1(stage1_from, model)
    t0 = time.perf_counter()
    model.train(
        stage=2,
        max_epochs=settings.stage2_epochs,
        lr=settings.stage2_lr,
        enable_progress_bar=False,
        accelerator=settings.accelerator,
    )
    secs["stage2"] = time.perf_counter() - t0
    secs["stage2_spots"] = float(np.isfinite(np.asarray(train.obsm[HIST_KEY])[:, 0]).sum())
    return model, secs


def untrained_stage2(model, var_config: dict[str, Any]):
    """A VARST with ``model``'s tokenizer and a fresh, untrained stage 2 built with ``var_config`` (for timings)."""
    import varst_scverse as varst

    cfg = {**(model.init_params_["var_config"] or {}), **var_config}
    m = varst.VARST(
        model.adata,
        preset=model.init_params_["preset"],
        vqvae_config=model.init_params_["vqvae_config"],
        var_config=cfg,
        target=model.init_params_["target"],
        seed=model.init_params_["seed"],
    )
    _copy_stage1(model, m)
    m.module.set_training_stage(2)
    m.module.stage2_trained = True
    m.is_trained_[2] = True
    return m


def _copy_stage1(src, dst) -> None:
    """Load ``src``'s trained tokenizer into ``dst`` through the stage-1 checkpoint format."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stage1.safetensors"
        src.module.save_stage_checkpoint(path, stage=1)
        dst.module.load_stage1(path)
    dst.is_trained_[1] = True


def predict_varst(model, query: AnnData, n_samples: int = 16, **kw) -> dict[str, np.ndarray]:
    """Expected-value point prediction, its per-scale prefixes and ``n_samples`` draws (for the 90% coverage)."""
    apply_threads()
    pred, prefixes = model.predict_expression(
        query, n_samples=0, decode="expected", return_prefixes=True, add_to_adata=False, **kw
    )
    out = {"pred": pred, "prefixes": prefixes}
    if n_samples > 1:
        out["samples"] = model.predict_samples(query, n_samples=n_samples)
    return out


def check_gene_order(model, genes: list[str]) -> None:
    """The model must predict exactly ``genes`` in this order (query AnnDatas carry no genes)."""
    if list(model.gene_names_) != list(genes):
        raise RuntimeError("VARST gene order differs from the benchmark's gene list.")


# ------------------------------------------------------------------------------------------------ non-AR control
def nar_control(
    model, train: AnnData, query: AnnData, epochs: int, lr: float = 1e-3, seed: int = 0, batch_size: int = 64
) -> np.ndarray:
    """The non-autoregressive control: an MLP from the same inputs to code probabilities at VARST's generated positions.

    Inputs are VARST's own condition inputs (standardised histology, Fourier features of the per-section coordinates,
    neighbour-mean histology when the model uses it); the MLP predicts a distribution over the stage-1 codebook at each
    generated position (1 + 8 + 32 for the cpu preset) in one shot, trained with cross-entropy on the frozen tokenizer's
    tokens plus the same auxiliary loss as stage 2 (MSE of the expected-value decode through the frozen stage-1
    decoder, weight ``aux_decode_weight``). Prediction is the expected-value decode. Nothing is autoregressive: no
    position sees another's code.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    from ..module._quantizer import upsample_genes

    apply_threads()
    module = model.module
    vq = module.vqvae
    quant = vq.quantizer
    scales = tuple(module.var.scales)
    offsets = np.cumsum((0, *scales))
    n_pos, vocab = int(offsets[-1]), int(quant.vocab_size)
    aux_w = float(module.var_config["aux_decode_weight"]) or 1.0

    def inputs(adata: AnnData, rows: np.ndarray) -> torch.Tensor:
        sp = model._spatial_inputs(adata)
        b = model._batch_tensors(sp, rows)
        cond = module.condition
        h = (b["histology"] - cond.hist_mean) / cond.hist_std
        parts = [h, cond.fourier(b["coords"])]
        if "neighbours" in b:
            parts.append((b["neighbours"] - cond.hist_mean) / cond.hist_std)
        return torch.cat(parts, 1).float()

    sp_rows = np.flatnonzero(np.isfinite(np.asarray(train.obsm[HIST_KEY])[:, 0]))
    with torch.no_grad():
        x = inputs(train, sp_rows)
        y = torch.as_tensor(model._target(train, sp_rows), dtype=torch.float32)
        tokens = module.tokenize(y)[:, :n_pos]
        z = vq.standardise(module.to_model_order(y))
    xq = inputs(query, np.arange(query.n_obs))
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)

    class NAR(nn.Module):
        def __init__(self, d_in: int, hidden: int = 512, d_pos: int = 128) -> None:
            super().__init__()
            self.trunk = nn.Sequential(
                nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, hidden), nn.GELU()
            )
            self.to_pos = nn.Linear(hidden, n_pos * d_pos)
            self.pos = nn.Parameter(torch.randn(n_pos, d_pos) * 0.02)
            self.head = nn.Sequential(nn.GELU(), nn.LayerNorm(d_pos), nn.Linear(d_pos, vocab))
            self.d_pos = d_pos

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            h = self.to_pos(self.trunk((inp - mu) / sd)).reshape(-1, n_pos, self.d_pos) + self.pos
            return self.head(h)  # [B, n_pos, V]

    def expected_standardised(logits: torch.Tensor) -> torch.Tensor:
        probs = logits.float().softmax(-1)
        f_hat = None
        for k in range(len(scales)):
            codes = quant.embed_probs(probs[:, offsets[k] : offsets[k + 1]])
            up = upsample_genes(codes, module.num_positions)
            f_hat = up if f_hat is None else f_hat + up
        return vq.decode_standardised(f_hat)

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = NAR(x.shape[1])
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    vq.eval()
    frozen = {name: p.requires_grad for name, p in vq.named_parameters()}
    for p in vq.parameters():
        p.requires_grad_(False)
    n = x.shape[0]
    try:
        for _ in range(int(epochs)):
            net.train()
            perm = torch.randperm(n, generator=gen)
            for s in range(0, n, batch_size):
                b = perm[s : s + batch_size]
                logits = net(x[b])
                ce = F.cross_entropy(logits.reshape(-1, vocab), tokens[b].reshape(-1))
                aux = F.mse_loss(expected_standardised(logits), z[b])
                loss = ce + aux_w * aux
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            pred = vq.destandardise(expected_standardised(net(xq)))
            pred = module.to_caller_order(pred)
    finally:
        for name, p in vq.named_parameters():
            p.requires_grad_(frozen[name])
    return pred.numpy().astype(np.float32)


__all__ = [
    "FEATURE_BASELINES",
    "FEATURELESS",
    "VARSTSettings",
    "check_gene_order",
    "fit_varst",
    "nar_control",
    "predict_varst",
    "quiet_lightning",
    "query_without_counts",
    "run_baselines",
    "varst_training_data",
]
