"""Lightning plumbing for both stages: the LightningModule, the per-epoch history and the spot datasets.

Lightning owns the loop (devices, precision, accumulation, DDP, checkpoints); this file only says what one step of
each stage computes and what gets logged.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Dataset

from ..module import TwoStageVARST


class SpotDataset(Dataset):
    """Row-indexed view over prepared per-spot arrays (expression, histology, coordinates, neighbour histology)."""

    def __init__(self, arrays: dict[str, np.ndarray], indices: np.ndarray) -> None:
        self.arrays = {k: torch.as_tensor(v) for k, v in arrays.items() if v is not None}
        self.indices = torch.as_tensor(np.asarray(indices, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = self.indices[i]
        return {k: v[j] for k, v in self.arrays.items()}


#: learning-rate schedules after the warm-up
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")
_COSINE_FLOOR = 0.05


def lr_factor(step: int, warmup: int, total: int | None) -> float:
    """Multiplier of the base learning rate at optimizer ``step``: linear warm-up, then constant or cosine decay.

    ``total`` is the number of steps of the run for the cosine schedule (``None``: constant after the warm-up).
    """
    if warmup and step < warmup:
        return (step + 1) / warmup
    if total is None:
        return 1.0
    progress = min(1.0, (step - warmup) / max(total - warmup, 1))
    return _COSINE_FLOOR + (1.0 - _COSINE_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * progress))


class VARSTTrainingPlan(pl.LightningModule):
    """Train one stage of :class:`~varst_scverse.module.TwoStageVARST` with AdamW.

    Parameters
    ----------
    module
        The torch module; its ``current_stage`` decides what is trained.
    lr, weight_decay
        AdamW settings.
    lr_warmup_steps
        Linear warm-up steps.
    lr_schedule
        After the warm-up: ``"constant"``, or ``"cosine"`` (half a cosine from ``lr`` down to ``lr / 20`` at the last
        step of the run).
    """

    def __init__(
        self,
        module: TwoStageVARST,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        lr_warmup_steps: int = 0,
        lr_schedule: str = "constant",
    ):
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}.")
        self.module = module
        self.stage = module.current_stage
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_warmup_steps = lr_warmup_steps
        self.lr_schedule = lr_schedule
        self._epoch_sums: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------ steps
    def _step(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        if self.stage == 1:
            return self.module.stage1_loss(batch["expression"])
        return self.module.stage2_loss(
            batch["expression"], batch["histology"], batch["coords"], batch.get("neighbours"), batch.get("tokens")
        )

    def _scalars(self, out: dict[str, Any]) -> dict[str, float]:
        vals = {k: float(v.detach()) for k, v in out.items() if torch.is_tensor(v) and v.ndim == 0}
        if "token_accuracy" in out:
            for k, a in enumerate(out["token_accuracy"]):
                vals[f"token_accuracy_scale{k}"] = float(a)
        if "per_scale_mse" in out:
            for k, a in enumerate(out["per_scale_mse"]):
                vals[f"prefix_mse_scale{k}"] = float(a)
        return vals

    def _accumulate(self, split: str, vals: dict[str, float], n: int) -> None:
        acc = self._epoch_sums.setdefault(split, {"_n": 0.0})
        acc["_n"] += n
        for k, v in vals.items():
            acc[k] = acc.get(k, 0.0) + v * n

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:  # noqa: D102
        out = self._step(batch)
        n = batch["expression"].shape[0]
        vals = self._scalars(out)
        self._accumulate("train", vals, n)
        self.log("train_loss", out["loss"], prog_bar=True, batch_size=n)
        return out["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:  # noqa: D102
        out = self._step(batch)
        n = batch["expression"].shape[0]
        vals = self._scalars(out)
        self._accumulate("validation", vals, n)
        self.log("validation_loss", out["loss"], prog_bar=True, batch_size=n, sync_dist=True)
        for key in ("ce_loss", "aux_decode_loss", "recon_loss"):
            if key in vals:
                self.log(f"validation_{key}", vals[key], batch_size=n, sync_dist=True)

    def on_train_epoch_start(self) -> None:  # noqa: D102
        # Lightning keeps the modes the modules had before fit; VARST.train leaves the module in eval mode (it
        # tokenises with it), so switch to training mode here: dropout, the null condition and coordinate dropout
        # act only in training mode. In stage 2 the frozen tokenizer stays in eval mode (TwoStageVARST.train).
        self.module.train()
        if self.stage == 1:
            self.module.vqvae.quantizer.reset_usage()

    def epoch_summary(self, split: str) -> dict[str, float]:
        """Mean of each logged scalar over the epoch for ``split`` (and codebook use after a stage-1 epoch)."""
        acc = self._epoch_sums.pop(split, None)
        if not acc or acc["_n"] == 0:
            return {}
        n = acc.pop("_n")
        out = {f"{split}_{k}": v / n for k, v in acc.items()}
        if split == "train" and self.stage == 1:
            usage = self.module.vqvae.quantizer.usage.double()
            p = usage / usage.sum().clamp_min(1)
            out["codebook_utilisation"] = float((usage > 0).double().mean())
            out["codebook_perplexity"] = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
        return out

    def configure_optimizers(self):  # noqa: D102
        params = [p for p in self.module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if not self.lr_warmup_steps and self.lr_schedule == "constant":
            return opt
        warm = max(int(self.lr_warmup_steps), 0)
        total = None
        if self.lr_schedule == "cosine":
            total = max(int(self.trainer.estimated_stepping_batches), warm + 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warm, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class HistoryCallback(pl.Callback):
    """Collect one row of epoch means per epoch into ``rows`` and log them to the Lightning logger."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._pending: dict[str, float] = {}

    def on_validation_epoch_end(self, trainer: pl.Trainer, plan: VARSTTrainingPlan) -> None:  # noqa: D102
        if trainer.sanity_checking:
            plan._epoch_sums.pop("validation", None)
            return
        self._pending.update(plan.epoch_summary("validation"))

    def on_train_epoch_end(self, trainer: pl.Trainer, plan: VARSTTrainingPlan) -> None:  # noqa: D102
        row = {"epoch": float(trainer.current_epoch), **plan.epoch_summary("train"), **self._pending}
        self._pending = {}
        self.rows.append(row)
        loggable = {k: v for k, v in row.items() if k != "epoch"}
        if "validation_loss" in loggable:
            plan.log("validation_loss_epoch", loggable["validation_loss"], sync_dist=True)
        if trainer.logger is not None:
            trainer.logger.log_metrics(loggable, step=trainer.current_epoch)

    # the history travels in Lightning's resume checkpoints, so a resumed run reports every epoch
    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        self.rows = [dict(r) for r in state_dict.get("rows", [])]


def checkpoint_callback(root_dir: str | os.PathLike | None, stage: int, has_validation: bool) -> pl.Callback:
    """Lightning checkpoints of one stage in ``<root_dir>/checkpoints/stage<k>/``.

    ``last.ckpt`` is written after every epoch (the point ``ckpt_path="last"`` resumes from after an interruption);
    with a validation set, ``best.ckpt`` holds the epoch with the lowest validation loss. Both are Lightning's own
    resume files (weights, optimizer, loop and callback state), not the package's exported safetensors checkpoints.
    Saving happens at the end of each training epoch, after validation and after the history row is recorded.
    """
    return pl.callbacks.ModelCheckpoint(
        dirpath=Path(root_dir or ".") / "checkpoints" / f"stage{stage}",
        filename="best",
        monitor="validation_loss" if has_validation else None,
        mode="min",
        save_top_k=1 if has_validation else 0,
        save_last=True,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )


def load_best_weights(plan: pl.LightningModule, ckpt: pl.Callback) -> str | None:
    """Load the weights of ``ckpt.best_model_path`` into ``plan`` and return that path.

    Returns None when there is none (e.g. a ``fast_dev_run`` saved nothing). Reads only tensors and plain containers
    (``weights_only=True``).
    """
    path = getattr(ckpt, "best_model_path", "")
    if not path or not os.path.isfile(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    plan.load_state_dict(state)
    return path


def best_weights_monitor(module: TwoStageVARST) -> str:
    """The validation metric that decides the best epoch: the decoded-expression error when stage 2 learns it."""
    if module.current_stage == 1:
        return "validation_loss"
    return "validation_aux_decode_loss" if module.var_config["aux_decode_weight"] > 0 else "validation_ce_loss"


class BestWeightsInMemory(pl.Callback):
    """Keep a copy of the trainable weights of the epoch with the lowest ``monitor`` and restore them at the end.

    The in-memory counterpart of a best checkpoint on disk: nothing is written, nothing is unpickled.
    """

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self._state: dict[str, torch.Tensor] | None = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, plan: VARSTTrainingPlan) -> None:  # noqa: D102
        if trainer.sanity_checking:
            return
        score = trainer.callback_metrics.get(self.monitor)
        if score is None:
            return
        score = float(score)
        if self.best_score is None or score < self.best_score:
            self.best_score, self.best_epoch = score, trainer.current_epoch
            self._state = trainable_state(plan)

    def on_fit_end(self, trainer: pl.Trainer, plan: VARSTTrainingPlan) -> None:  # noqa: D102
        if self._state is not None:
            plan.module.load_state_dict(self._state, strict=False)


def trainable_state(plan: VARSTTrainingPlan) -> dict[str, torch.Tensor]:
    """Detached copies of the weights the current stage trains (stage 2: everything but the frozen tokenizer)."""
    return {
        k: v.detach().clone()
        for k, v in plan.module.state_dict().items()
        if plan.stage == 1 or not k.startswith("vqvae.")
    }


def default_average_epochs(max_epochs: int) -> int:
    """Stage 2 averages the weights of the last quarter of its epochs by default (at least one epoch).

    Chosen on HER2ST within patient C (folds C3 and C5, 25 epochs, one seed): with the default validation split the
    last 6 epochs averaged scored 0.399 / 0.292 against 0.385 / 0.288 for the last epoch (0.393 / 0.256 for the best
    validation epoch); averaging 15 of 25 epochs pulled in the weak early ones (C5 0.272).
    """
    return max(1, round(max_epochs / 4))


class EpochWeightAverage(pl.Callback):
    """Average the trained weights over the ends of the last ``n_epochs`` epochs and keep that average at the end.

    Stochastic weight averaging at epoch granularity: the held-out score of a single epoch's weights swings by a few
    hundredths on small sections; the average is smoother and at least as good, and needs no validation set.
    Integer buffers (counters) take the last epoch's value.
    """

    def __init__(self, n_epochs: int) -> None:
        if n_epochs < 1:
            raise ValueError(f"n_epochs must be >= 1, got {n_epochs}.")
        self.n_epochs = int(n_epochs)
        self.n_averaged = 0
        self._sum: dict[str, torch.Tensor] | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, plan: VARSTTrainingPlan) -> None:  # noqa: D102
        if trainer.current_epoch < trainer.max_epochs - self.n_epochs:
            return
        prev = self._sum or {}
        self._sum = {
            k: prev.get(k, 0) + v.double() if v.is_floating_point() else v for k, v in trainable_state(plan).items()
        }
        self.n_averaged += 1

    def on_fit_end(self, trainer: pl.Trainer, plan: VARSTTrainingPlan) -> None:  # noqa: D102
        if self._sum is None:
            return
        ref = plan.module.state_dict()
        avg = {k: (v / self.n_averaged).to(ref[k].dtype) if v.is_floating_point() else v for k, v in self._sum.items()}
        plan.module.load_state_dict(avg, strict=False)
