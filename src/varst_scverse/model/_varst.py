"""The user-facing VARST model: AnnData in, AnnData out, in the scvi-tools habit.

``setup_anndata`` registers the fields, ``train(stage=1|2)`` runs Lightning, ``get_tokens`` / ``reconstruct`` /
``predict_expression`` stream batches and write documented keys, ``save`` / ``load`` use safetensors + JSON.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .._constants import ADATA_KEYS, REGISTRY_KEYS
from .._targets import TARGET_KINDS, expression_target
from ..module import TwoStageVARST
from ..module._checkpoint import FORMAT_VERSION, load_checkpoint
from ._inputs import cluster_gene_order, neighbour_index, neighbour_mean, normalise_coords
from ._memory import generation_sequences_that_fit, warn_if_batch_too_large, warn_if_map_is_wide
from ._training import (
    BestWeightsInMemory,
    EpochWeightAverage,
    HistoryCallback,
    SpotDataset,
    VARSTTrainingPlan,
    best_weights_monitor,
    checkpoint_callback,
    default_average_epochs,
    load_best_weights,
)
from ._validation import (
    check_anndata,
    check_coords,
    check_counts,
    check_histology,
    get_layer,
    get_obsm,
    warn_user,
)

_logger = logging.getLogger(__name__)

Stage = Literal[1, 2]
_WEIGHTS_FILE = "model.safetensors"
_META_FILE = "varst.json"
_DEFAULT_BATCH = {1: 256, 2: 64}
#: the noise calibration after stage 2 looks at no more spots than this
_CALIBRATION_MAX_SPOTS = 2048
_DEFAULT_EPOCHS = {"seed": {1: 150, 2: 300}, "cpu": {1: 60, 2: 60}}


class VARST:
    """Two-Stage VAR-ST: predict spatial gene expression from histology embeddings and spot coordinates.

    Stage 1 learns a multi-scale gene VQ-VAE that turns each spot's expression into tokens (1 + 8 + 32 + G for the
    default scales); stage 2 learns a VAR transformer that generates those tokens scale by scale from histology and
    coordinates; the frozen stage-1 decoder turns generated tokens into expression.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`; its genes are the genes the model predicts.
    preset
        ``"seed"`` (the seed guide's sizes, for a GPU) or ``"cpu"`` (small; both stages train in minutes on a laptop).
    vqvae_config, var_config
        Overrides of the preset, with the seed guide's key names (see :func:`varst_scverse.module.resolve_configs`).
    target
        ``"log1p"`` (``log1p(counts)``, HEST's convention) or ``"cp10k"`` (``log1p`` of counts per 10,000). For
        ``"cp10k"`` the library size is ``obs['varst_total_counts']`` when present (set it to the totals over all
        genes before subsetting to the modelled genes), else the sum over the AnnData's genes.
    seed
        Seed for the weights, the data split and sampling.

    Examples
    --------
    >>> import varst_scverse as varst
    >>> adata = varst.datasets.synthetic(n_spots=200, n_genes=40)
    >>> varst.VARST.setup_anndata(adata, layer="counts", batch_key="section")
    >>> model = varst.VARST(adata, preset="cpu", vqvae_config={"scales": (1, 4, 8, None)})
    >>> model.get_model_info()["n_tokens"]
    53
    """

    _managers: ClassVar[dict[str, Any]] = {}

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        histology_key: str = ADATA_KEYS.HISTOLOGY,
        spatial_key: str = ADATA_KEYS.SPATIAL,
        batch_key: str | None = None,
    ) -> None:
        """Register the AnnData fields VARST reads, after checking them.

        Parameters
        ----------
        adata
            Spots × genes with raw counts.
        layer
            Layer with raw counts; ``None`` uses ``X``.
        histology_key
            ``obsm`` key of the per-spot histology embedding (any width). A row that is entirely NaN marks a spot
            without an image: such expression-only spots still train stage 1 (the tokenizer) and are left out of
            stage 2. A partly-NaN row is an error.
        spatial_key
            ``obsm`` key of the spot coordinates (2 columns, any unit; normalised per section).
        batch_key
            ``obs`` column naming the section of each spot; coordinates are normalised and neighbours found within
            a section. ``None`` treats all spots as one section.

        Notes
        -----
        Like every scvi-tools model, registration stores its bookkeeping in ``adata.uns['_scvi_uuid']``,
        ``adata.uns['_scvi_manager_uuid']`` and ``adata.obs['_scvi_batch']``; nothing else is written.
        """
        from scvi.data import AnnDataManager
        from scvi.data.fields import CategoricalObsField, LayerField, ObsmField

        check_anndata(adata)
        check_counts(get_layer(adata, layer), f"layer {layer!r}" if layer else "adata.X")
        check_histology(get_obsm(adata, histology_key, "Histology"), histology_key)
        check_coords(get_obsm(adata, spatial_key, "Spatial"), spatial_key)
        if batch_key is not None and batch_key not in adata.obs:
            raise KeyError(f"batch_key {batch_key!r} not found in adata.obs; columns: {list(adata.obs.columns)}.")
        setup_args = {
            "layer": layer,
            "histology_key": histology_key,
            "spatial_key": spatial_key,
            "batch_key": batch_key,
        }
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True, correct_data_format=False),
            ObsmField(REGISTRY_KEYS.HISTOLOGY_KEY, histology_key, correct_data_format=False),
            ObsmField(REGISTRY_KEYS.SPATIAL_KEY, spatial_key, correct_data_format=False),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
        ]
        manager = AnnDataManager(
            fields=fields, setup_method_args={"model_name": cls.__name__, "setup_args": setup_args}
        )
        scvi_logger = logging.getLogger("scvi")
        level = scvi_logger.level
        scvi_logger.setLevel(logging.WARNING)  # silence "Generating sequential column names" for our obsm fields
        try:
            manager.register_fields(adata)
        finally:
            scvi_logger.setLevel(level)
        cls._managers[manager.adata_uuid] = manager

    @classmethod
    def _get_manager(cls, adata: AnnData):
        uid = adata.uns.get("_scvi_uuid")
        if uid is None or uid not in cls._managers:
            raise ValueError(
                "This AnnData is not registered with VARST; call `varst.VARST.setup_anndata(adata, layer=..., "
                "histology_key=..., spatial_key=..., batch_key=...)` first."
            )
        return cls._managers[uid]

    # ------------------------------------------------------------------ init
    def __init__(
        self,
        adata: AnnData,
        preset: str = "seed",
        vqvae_config: dict[str, Any] | None = None,
        var_config: dict[str, Any] | None = None,
        target: str = "log1p",
        seed: int = 0,
    ) -> None:
        check_anndata(adata)
        manager = self._get_manager(adata)
        if target not in TARGET_KINDS:
            raise ValueError(f"target must be one of {TARGET_KINDS}, got {target!r}.")
        self.setup_args_ = dict(manager.registry["setup_args"])
        self.init_params_ = {
            "preset": preset,
            "vqvae_config": vqvae_config,
            "var_config": var_config,
            "target": target,
            "seed": seed,
        }
        self.adata = adata
        self.adata_manager = manager
        self.gene_names_ = [str(g) for g in adata.var_names]
        hist = get_obsm(adata, self.setup_args_["histology_key"], "Histology")
        torch.manual_seed(seed)
        self.module = TwoStageVARST(
            num_genes=adata.n_vars,
            vqvae_config=vqvae_config,
            var_config=var_config,
            histology_dim=hist.shape[1],
            preset=preset,
        )
        warn_if_map_is_wide(self.module.num_genes, self.module.num_positions)
        y = self._target(adata)
        order = cluster_gene_order(y)
        self.module.gene_order.copy_(torch.as_tensor(order))
        self.module.vqvae.set_standardisation(torch.as_tensor(y.mean(0)[order]), torch.as_tensor(y.std(0)[order]))
        has = ~np.isnan(hist).all(1)
        if has.any():
            h = hist[has].astype(np.float64)
            self.module.set_histology_standardisation(torch.as_tensor(h.mean(0)), torch.as_tensor(h.std(0)))
        self.history_: dict[str, pd.DataFrame] = {}
        self.is_trained_ = {1: False, 2: False}

    def __repr__(self) -> str:
        info = self.module.get_model_info()
        pooled = "" if info["num_positions"] == info["num_genes"] else f"positions={info['num_positions']}, "
        return (
            f"VARST(preset={self.init_params_['preset']!r}, genes={info['num_genes']}, {pooled}"
            f"tokens={info['n_tokens']}, "
            f"vocab={info['vocab_size']}, stage1_trained={self.is_trained_[1]}, stage2_trained={self.is_trained_[2]})"
        )

    # ------------------------------------------------------------------ inputs
    @property
    def preset(self) -> str:
        """The preset the model was built from."""
        return self.init_params_["preset"]

    def _gene_positions(self, adata: AnnData) -> np.ndarray:
        pos = adata.var_names.get_indexer(self.gene_names_)
        if (pos < 0).any():
            missing = [g for g, p in zip(self.gene_names_, pos) if p < 0]
            raise KeyError(
                f"{len(missing)} of the model's {len(self.gene_names_)} genes are missing from this AnnData, e.g. "
                f"{missing[:5]}; expression-based methods need all of them (predict_expression needs none)."
            )
        return pos

    def _target(self, adata: AnnData, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        counts = get_layer(adata, self.setup_args_["layer"])
        pos = self._gene_positions(adata)
        sub = counts[rows]
        check_counts(sub, "the counts layer")
        total = None
        if self.init_params_["target"] == "cp10k":
            # library size over all genes when the reader left it in obs, else over the AnnData's genes
            if ADATA_KEYS.TOTAL_COUNTS in adata.obs:
                total = adata.obs[ADATA_KEYS.TOTAL_COUNTS].to_numpy()[rows]
            else:
                total = np.asarray(sub.sum(1)).reshape(-1)
        return expression_target(sub[:, pos], self.init_params_["target"], total_counts=total)

    def _spatial_inputs(self, adata: AnnData) -> dict[str, np.ndarray]:
        """Histology, has-histology mask, normalised coordinates, section codes and neighbour index of a query."""
        sa = self.setup_args_
        hist = get_obsm(adata, sa["histology_key"], "Histology")
        has = check_histology(hist, sa["histology_key"])
        if hist.shape[1] != self.module.histology_dim:
            raise ValueError(
                f"adata.obsm[{sa['histology_key']!r}] has {hist.shape[1]} features but the model was trained on "
                f"{self.module.histology_dim}; embed this section with the same encoder as the training data."
            )
        xy = check_coords(get_obsm(adata, sa["spatial_key"], "Spatial"), sa["spatial_key"])
        groups = None
        if sa["batch_key"] is not None:
            if sa["batch_key"] in adata.obs:
                groups = pd.Categorical(adata.obs[sa["batch_key"]]).codes
            else:
                warn_user(f"obs[{sa['batch_key']!r}] is missing in this AnnData; treating all spots as one section.")
        out = {"histology": hist, "has_histology": has, "coords": normalise_coords(xy, groups)}
        k = self.module.var_config["neighbour_k"]
        out["neighbour_index"] = neighbour_index(xy, groups, k) if k > 0 else None
        return out

    def _batch_tensors(self, sp: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, torch.Tensor]:
        out = {
            "histology": torch.as_tensor(np.asarray(sp["histology"][rows], dtype=np.float32)),
            "coords": torch.as_tensor(sp["coords"][rows]),
        }
        if sp["neighbour_index"] is not None:
            out["neighbours"] = torch.as_tensor(neighbour_mean(sp["histology"], sp["neighbour_index"], rows))
        return out

    def _validate_adata(self, adata: AnnData | None) -> AnnData:
        if adata is None:
            return self.adata
        return check_anndata(adata)

    # ------------------------------------------------------------------ training
    def train(
        self,
        stage: Stage = 1,
        max_epochs: int | None = None,
        batch_size: int | None = None,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        train_size: float = 0.9,
        early_stopping: bool = False,
        early_stopping_patience: int = 10,
        accelerator: str = "cpu",
        devices: int | str | list[int] = 1,
        strategy: str = "auto",
        precision: str | int = "32",
        accumulate_grad_batches: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        lr_warmup_steps: int = 0,
        lr_schedule: str = "constant",
        enable_progress_bar: bool = True,
        logger: Any = False,
        default_root_dir: str | None = None,
        callbacks: list | None = None,
        ckpt_path: str | None = None,
        save_checkpoints: bool = False,
        restore_best: bool = False,
        average_last_epochs: int | None = None,
        seed: int | None = None,
        **trainer_kwargs: Any,
    ) -> pd.DataFrame:
        """Train one stage with Lightning.

        Parameters
        ----------
        stage
            1 trains the tokenizer on every spot with expression; 2 trains the transformer on spots that also have
            histology, with the tokenizer frozen. Stage 2 refuses to start before stage 1 is trained or loaded.
        max_epochs, batch_size, lr, weight_decay
            Optimisation; defaults follow the seed guide (stage 1: 256 spots per batch, stage 2: 64).
        train_size
            Fraction of spots used for training; the rest is the validation set (``1.0`` = none).
        early_stopping, early_stopping_patience
            Stop when the validation loss has not improved for this many epochs.
        accelerator, devices, strategy, precision, accumulate_grad_batches
            Passed to :class:`lightning.pytorch.Trainer` (e.g. ``accelerator="gpu", devices=2, strategy="ddp",
            precision="bf16-mixed"``). ``"ddp"``, ``"ddp_spawn"``, ``"ddp_fork"`` and ``"ddp_notebook"`` run with
            ``find_unused_parameters=True``: each stage leaves some parameters without gradient.
        num_workers, pin_memory
            DataLoader settings.
        lr_warmup_steps
            Linear learning-rate warm-up.
        lr_schedule
            After the warm-up: ``"constant"`` or ``"cosine"`` (decays to ``lr / 20`` at the last step of the run).
        enable_progress_bar, logger, default_root_dir, callbacks, ckpt_path
            Lightning options; ``logger=True`` writes TensorBoard logs under ``default_root_dir``; ``ckpt_path``
            resumes from a Lightning checkpoint (a path, or ``"last"``: the latest one written with
            ``save_checkpoints=True`` in the same ``default_root_dir``; nothing to resume starts afresh).
        save_checkpoints
            Write Lightning checkpoints to ``<default_root_dir>/checkpoints/stage<k>/`` at the end of every epoch:
            ``last.ckpt`` (the resume point after an interruption) and, with a validation set, ``best.ckpt``
            (lowest validation loss). They are Lightning's resume files (weights, optimizer, loop and history state);
            export models with :meth:`save`.
        restore_best
            After training, go back to the weights of the best validation epoch (stage 1: validation loss; stage 2:
            error of the expected-value decode, or cross-entropy without the auxiliary loss). Kept in memory, or
            read from ``best.ckpt`` with ``save_checkpoints=True``. Off by default: on small sections the best epoch
            on a random validation split is mostly noise (held-out HER2ST C5: 0.256 restored vs 0.288 last epoch).
        average_last_epochs
            Keep the average of the trained weights at the ends of the last this many epochs (stochastic weight
            averaging by epoch) instead of the last epoch's weights; ``0`` = off. Smooths the epoch-to-epoch swings
            of the held-out score and needs no validation set. Default: a quarter of ``max_epochs`` for stage 2
            (at least 1), off for stage 1 and with ``restore_best=True`` (the two do not combine). A run stopped
            early by ``early_stopping`` averages only the epochs it reached in that window.
        seed
            Seed of this run (defaults to the model's seed). With ``var_config["ensemble_size"]`` K > 1, stage 2
            trains its K transformers one after the other with seeds ``seed``, ``seed + 1``, … on the same split
            (the history gains a ``member`` column); ``save_checkpoints`` and ``ckpt_path`` are refused then.
        **trainer_kwargs
            Further :class:`~lightning.pytorch.Trainer` arguments.

        Returns
        -------
        The per-epoch history of this stage (also in ``model.history_[f"stage{stage}"]``).
        """
        import lightning.pytorch as lpl

        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}.")
        if stage == 2 and not self.module.stage1_trained:
            raise RuntimeError(
                "Stage 2 needs a trained stage-1 tokenizer. Run `model.train(stage=1)` first, or load a model "
                "whose stage 1 is trained (`VARST.load(dir, adata)`; on the command line `--stage1_ckpt PATH`)."
            )
        if not 0 < train_size <= 1:
            raise ValueError(f"train_size must lie in (0, 1], got {train_size}.")
        seed = self.init_params_["seed"] if seed is None else seed
        lpl.seed_everything(seed, workers=True, verbose=False)
        adata = self.adata
        arrays: dict[str, np.ndarray | None] = {"expression": self._target(adata)}
        if stage == 1:
            rows = np.arange(adata.n_obs)
        else:
            sp = self._spatial_inputs(adata)
            rows = np.flatnonzero(sp["has_histology"])
            if rows.size == 0:
                raise ValueError(
                    "No spot has histology features (every row of the histology obsm is NaN); stage 2 learns from "
                    "spots with both expression and histology. Embed the images first (varst.pp.embed_histology)."
                )
            arrays["histology"] = np.nan_to_num(sp["histology"]).astype(np.float32)
            arrays["coords"] = sp["coords"]
            if sp["neighbour_index"] is not None:
                arrays["neighbours"] = neighbour_mean(sp["histology"], sp["neighbour_index"], slice(None))
            self.module.eval()
            with torch.inference_mode():
                arrays["tokens"] = np.concatenate(
                    [
                        self.module.tokenize(torch.as_tensor(arrays["expression"][c])).numpy()
                        for c in _chunks(rows, 2048)
                    ]
                    or [np.zeros((0, self.module.n_tokens), dtype=np.int64)]
                )
            tok = np.zeros((adata.n_obs, self.module.n_tokens), dtype=np.int64)
            tok[rows] = arrays["tokens"]
            arrays["tokens"] = tok
        rng = np.random.default_rng(seed)
        rows = rng.permutation(rows)
        n_train = len(rows) if train_size >= 1 else max(1, int(round(train_size * len(rows))))
        train_rows, val_rows = rows[:n_train], rows[n_train:]
        batch_size = batch_size or _DEFAULT_BATCH[stage]
        if accelerator == "cpu":
            warn_if_batch_too_large(
                stage,
                batch_size,
                self.module.num_positions,
                self.module.vqvae_config["embed_dim"],
                aux_decode=self.module.var_config["aux_decode_weight"] > 0,
            )
        max_epochs = max_epochs or _DEFAULT_EPOCHS.get(self.preset, _DEFAULT_EPOCHS["seed"])[stage]
        loader_kw = {"batch_size": batch_size, "num_workers": num_workers, "pin_memory": pin_memory}
        train_dl = torch.utils.data.DataLoader(
            SpotDataset(arrays, train_rows), shuffle=True, drop_last=len(train_rows) > batch_size, **loader_kw
        )
        val_dl = (
            torch.utils.data.DataLoader(SpotDataset(arrays, val_rows), shuffle=False, **loader_kw)
            if len(val_rows)
            else None
        )
        if average_last_epochs is not None and average_last_epochs < 0:
            raise ValueError(f"average_last_epochs must be >= 0, got {average_last_epochs}.")
        if average_last_epochs and restore_best:
            raise ValueError("Pass either restore_best=True or average_last_epochs > 0, not both.")
        if average_last_epochs is None:
            average_last_epochs = 0 if stage == 1 or restore_best else default_average_epochs(max_epochs)
        if restore_best and val_dl is None:
            raise ValueError("restore_best needs a validation set (train_size < 1).")
        if ckpt_path == "last" and not save_checkpoints:
            raise ValueError('ckpt_path="last" resumes from checkpoints written with save_checkpoints=True; pass both.')
        n_members = self.module.n_members if stage == 2 else 1
        if n_members > 1 and (save_checkpoints or ckpt_path is not None):
            raise ValueError(
                f"Lightning checkpoints hold one stage-2 transformer, this model trains {n_members} "
                "(var_config['ensemble_size']); train it without save_checkpoints / ckpt_path and export it with "
                "model.save()."
            )
        self.module.set_training_stage(stage)
        if strategy in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"):
            # some parameters get no gradient in a step (the other stage's; the null condition when no spot is
            # dropped), which plain DDP refuses
            strategy = f"{strategy}_find_unused_parameters_true"
        fit = {
            "lr": lr,
            "weight_decay": weight_decay,
            "lr_warmup_steps": lr_warmup_steps,
            "lr_schedule": lr_schedule,
            "early_stopping": early_stopping,
            "early_stopping_patience": early_stopping_patience,
            "callbacks": callbacks,
            "save_checkpoints": save_checkpoints,
            "restore_best": restore_best,
            "average_last_epochs": average_last_epochs,
            "logger": logger,
            "default_root_dir": default_root_dir,
            "ckpt_path": ckpt_path,
            "max_epochs": max_epochs,
        }
        trainer_kwargs = {
            "accelerator": accelerator,
            "devices": devices,
            "strategy": strategy,
            "precision": precision,
            "accumulate_grad_batches": accumulate_grad_batches,
            "enable_progress_bar": enable_progress_bar,
            **trainer_kwargs,
        }
        frames = []
        for k in range(n_members):
            if k:  # member k: its own seed, the same split
                lpl.seed_everything(seed + k, workers=True, verbose=False)
            with self.module.member(k):
                df_k = pd.DataFrame(
                    self._fit_stage(stage, train_dl, val_dl, fit, trainer_kwargs, k if n_members > 1 else None)
                )
            if n_members > 1:
                df_k.insert(0, "member", k)
            frames.append(df_k)
        self.module.eval()
        if stage == 1:
            self.module.stage1_trained = True
        else:
            self.module.stage2_trained = True
            probe_oof = self._fit_probe(arrays, np.sort(rows))
            self._calibrate_noise(arrays, val_rows if len(val_rows) else train_rows, seed, probe_oof)
        self.is_trained_[stage] = True
        df = pd.concat(frames, ignore_index=True)
        key = f"stage{stage}"
        self.history_[key] = pd.concat([self.history_[key], df], ignore_index=True) if key in self.history_ else df
        return df

    def _fit_stage(
        self, stage: int, train_dl, val_dl, fit: dict[str, Any], trainer_kwargs: dict[str, Any], member: int | None
    ) -> list[dict[str, float]]:
        """One Lightning run of ``stage`` (of the active stage-2 member); returns the per-epoch history rows.

        ``fit`` holds :meth:`train`'s arguments by name, ``trainer_kwargs`` what goes to the Trainer as it is;
        ``member`` (an ensemble's member, else None) names the TensorBoard run.
        """
        import lightning.pytorch as lpl

        plan = VARSTTrainingPlan(
            self.module,
            lr=fit["lr"],
            weight_decay=fit["weight_decay"],
            lr_warmup_steps=fit["lr_warmup_steps"],
            lr_schedule=fit["lr_schedule"],
        )
        history = HistoryCallback()
        cbs = [history, *(fit["callbacks"] or [])]
        if fit["early_stopping"]:
            if val_dl is None:
                raise ValueError("early_stopping needs a validation set; use train_size < 1.")
            cbs.append(lpl.callbacks.EarlyStopping("validation_loss", patience=fit["early_stopping_patience"]))
        root = fit["default_root_dir"]
        ckpt_cb = checkpoint_callback(root, stage, val_dl is not None) if fit["save_checkpoints"] else None
        if ckpt_cb is not None:
            cbs.append(ckpt_cb)
        best_cb = None
        if fit["restore_best"] and ckpt_cb is None:
            best_cb = BestWeightsInMemory(best_weights_monitor(self.module))
            cbs.append(best_cb)
        if fit["average_last_epochs"]:
            cbs.append(EpochWeightAverage(min(fit["average_last_epochs"], fit["max_epochs"])))
        logger = fit["logger"]
        if logger is True:
            name = f"stage{stage}" if member is None else f"stage{stage}_member{member}"
            logger = lpl.loggers.TensorBoardLogger(root or "lightning_logs", name=name)
        trainer = lpl.Trainer(
            max_epochs=fit["max_epochs"],
            logger=logger,
            callbacks=cbs,
            default_root_dir=root,
            enable_checkpointing=any(isinstance(c, lpl.callbacks.ModelCheckpoint) for c in cbs),
            enable_model_summary=False,
            num_sanity_val_steps=0,
            **trainer_kwargs,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*GPU available but not used.*")
            trainer.fit(plan, train_dl, val_dl, ckpt_path=fit["ckpt_path"])
        if best_cb is not None and best_cb.best_epoch is not None:
            _logger.info(
                "restored the weights of epoch %d (%s = %.4f)", best_cb.best_epoch, best_cb.monitor, best_cb.best_score
            )
        if fit["restore_best"] and ckpt_cb is not None and load_best_weights(plan, ckpt_cb) is None:
            warnings.warn("restore_best: no best checkpoint was written; kept the last weights.", stacklevel=2)
        return history.rows

    def _fit_probe(self, arrays: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray | None:
        """Fit the linear probe of ``var_config["ridge_blend"]`` on the spots ``rows``; return out-of-fold predictions.

        Ridge on the histology features with alpha chosen by leave-one-section-out CV (``batch_key``; shuffled 5-fold
        without it), as :class:`~varst_scverse.tl.RidgeCV`, on every spot stage 2 learned from. The out-of-fold
        predictions (``[n_obs, n_genes]``, NaN outside ``rows``) show what the probe gets wrong on unseen sections,
        for the noise calibration. None when the blend is off or there are too few spots to cross-validate.
        """
        from ..tl._ridge import RidgeCV

        mod = self.module
        mod.probe_alpha.zero_()
        if mod.var_config["ridge_blend"] <= 0:
            return None
        if len(rows) < 2:
            warn_user(
                f"The ridge probe of var_config['ridge_blend'] needs at least 2 training spots with histology, got "
                f"{len(rows)}; the model predicts with the transformer alone."
            )
            return None
        batch_key = self.setup_args_["batch_key"]
        groups = None
        if batch_key is not None and batch_key in self.adata.obs:
            groups = pd.Categorical(self.adata.obs[batch_key]).codes[rows]
        X, Y = arrays["histology"][rows], arrays["expression"][rows]
        ridge = RidgeCV().fit(X, Y, groups=groups)
        weight, bias = ridge.linear_map()
        mod.set_probe(
            torch.as_tensor(weight, dtype=torch.float32), torch.as_tensor(bias, dtype=torch.float32), ridge.alpha_
        )
        _logger.info("ridge probe: alpha %g chosen by %s CV on %d spots", ridge.alpha_, ridge.cv_strategy_, len(rows))
        oof = np.full((self.adata.n_obs, Y.shape[1]), np.nan, dtype=np.float32)
        oof[rows] = ridge.out_of_fold_predict(X, Y, groups=groups)
        return oof

    @torch.inference_mode()
    def _calibrate_noise(
        self,
        arrays: dict[str, np.ndarray],
        rows: np.ndarray,
        seed: int,
        probe_oof: np.ndarray | None = None,
        n_samples: int = 8,
    ) -> None:
        """Per-gene observation noise: residual variance of the point prediction beyond the spread of the draws.

        Measured on the validation spots (the training spots when there are none), at most
        ``_CALIBRATION_MAX_SPOTS`` of them drawn at random (the estimate needs a few thousand spots, not a whole
        atlas: each spot costs ``n_samples + 1`` generations), and stored in the module. With the ridge blend, the
        probe's share of point and draws is its out-of-fold prediction ``probe_oof``, since the fitted probe has
        seen these spots.
        """
        mod = self.module
        mod.noise_std.zero_()
        w = mod.var_config["ridge_blend"] if probe_oof is not None else 0.0
        if len(rows) > _CALIBRATION_MAX_SPOTS:
            rows = np.sort(np.random.default_rng(seed).choice(rows, _CALIBRATION_MAX_SPOTS, replace=False))
        gen = torch.Generator().manual_seed(seed)
        resid2, spread = [], []
        for chunk in _chunks(rows, _spots_per_batch(512, n_samples, mod)):
            args = [torch.as_tensor(arrays["histology"][chunk]), torch.as_tensor(arrays["coords"][chunk])]
            args.append(torch.as_tensor(arrays["neighbours"][chunk]) if "neighbours" in arrays else None)
            point = mod.generate(*args, decode="expected", ridge_blend=0)["expression"][0]
            draws = mod.generate(*args, decode="sample", n_samples=n_samples, generator=gen, ridge_blend=0)
            draws = draws["expression"]
            if w > 0:
                lin = torch.as_tensor(probe_oof[chunk])
                point, draws = (1 - w) * point + w * lin, (1 - w) * draws + w * lin
            y = torch.as_tensor(arrays["expression"][chunk])
            resid2.append(((y - point) ** 2).sum(0))
            spread.append(draws.var(0, unbiased=False).sum(0))
        n = max(len(rows), 1)
        noise_var = (torch.stack(resid2).sum(0) - torch.stack(spread).sum(0)) / n
        mod.noise_std.copy_(noise_var.clamp_min(0).sqrt())

    # ------------------------------------------------------------------ outputs
    def _rows(self, adata: AnnData, indices) -> np.ndarray:
        if indices is None:
            return np.arange(adata.n_obs)
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape[0] != adata.n_obs:
                raise ValueError(f"Boolean indices have length {idx.shape[0]}, the AnnData has {adata.n_obs} spots.")
            return np.flatnonzero(idx)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise TypeError("indices must be a 1-D array of integer positions or a boolean mask over the spots.")
        bad = idx[(idx < -adata.n_obs) | (idx >= adata.n_obs)]
        if bad.size:
            raise ValueError(
                f"indices {bad[:3].tolist()} are out of range for an AnnData with {adata.n_obs} spots "
                f"(valid positions: 0 to {adata.n_obs - 1})."
            )
        return np.where(idx < 0, idx + adata.n_obs, idx).astype(np.int64)

    @torch.inference_mode()
    def get_tokens(self, adata: AnnData | None = None, indices=None, batch_size: int | None = None) -> np.ndarray:
        """Stage-1 tokens of every spot, ``[n_spots, n_tokens]`` (scales coarse to fine); also ``obsm['varst_tokens']``.

        Parameters
        ----------
        adata
            AnnData with the model's genes (raw counts in the registered layer); defaults to the training data.
        indices
            Spots to tokenize (all by default); ``obsm`` is written only when all spots are.
        batch_size
            Spots per batch.
        """
        self._require(1)
        adata = self._validate_adata(adata)
        rows = self._rows(adata, indices)
        self.module.eval()
        out = [
            self.module.tokenize(torch.as_tensor(self._target(adata, chunk))).numpy()
            for chunk in _chunks(rows, batch_size or 1024)
        ]
        tokens = np.concatenate(out) if out else np.zeros((0, self.module.n_tokens), dtype=np.int64)
        if indices is None:
            adata.obsm[ADATA_KEYS.TOKENS] = tokens
        return tokens

    @torch.inference_mode()
    def reconstruct(
        self, adata: AnnData | None = None, indices=None, n_scales: int | None = None, batch_size: int | None = None
    ) -> np.ndarray:
        """Tokenize and decode each spot's expression (target scale); also ``layers['varst_reconstructed']``.

        Parameters
        ----------
        adata
            AnnData with the model's genes; defaults to the training data.
        indices
            Spots to reconstruct (all by default); the layer is written only when all spots are.
        n_scales
            Decode from only the ``n_scales`` coarsest scales (e.g. 1 = global token only).
        batch_size
            Spots per batch.

        Returns
        -------
        ``[n_spots, n_model_genes]`` in the order the genes have in ``adata``.
        """
        self._require(1)
        adata = self._validate_adata(adata)
        rows = self._rows(adata, indices)
        self.module.eval()
        out = [
            self.module.reconstruct(torch.as_tensor(self._target(adata, chunk)), n_scales).numpy()
            for chunk in _chunks(rows, batch_size or 1024)
        ]
        rec = np.concatenate(out) if out else np.zeros((0, len(self.gene_names_)), dtype=np.float32)
        pos = self._gene_positions(adata)
        order = np.argsort(pos)
        if indices is None:
            layer = np.full((adata.n_obs, adata.n_vars), np.nan, dtype=np.float32)
            layer[:, pos] = rec
            adata.layers[ADATA_KEYS.RECONSTRUCTED] = layer
        return rec[:, order]

    @torch.inference_mode()
    def predict_expression(
        self,
        adata: AnnData | None = None,
        indices=None,
        n_samples: int = 10,
        decode: Literal["expected", "mean_of_samples", "greedy"] = "expected",
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg: float = 1.0,
        batch_size: int = 512,
        add_to_adata: bool = True,
        seed: int | None = None,
        return_prefixes: bool = False,
        use_cache: bool = True,
        uncertainty: Literal["total", "model"] = "total",
        ridge_blend: float | None = None,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Predict expression from histology and coordinates alone.

        Works on a query AnnData with histology and coordinates and no expression (or genes it ignores).

        Parameters
        ----------
        adata
            Query with the registered histology and spatial ``obsm`` keys (and the section column when the model
            was set up with ``batch_key``); defaults to the training data.
        indices
            Spots to predict (all by default).
        n_samples
            Sampled generations per spot; their spread is the uncertainty (0 = no sampling, no uncertainty).
        decode
            Point prediction: ``"expected"`` (probability-weighted codes, the default), ``"mean_of_samples"`` (mean
            of the sampled decodes) or ``"greedy"`` (most likely code at each scale).
        temperature, top_k, top_p
            Sampling controls.
        cfg
            Classifier-free guidance scale (1 = none).
        batch_size
            Sequences generated at a time: ``batch_size // n_samples`` spots per batch when sampling (each spot is
            generated ``n_samples`` times), ``batch_size`` spots otherwise. Memory scales with it, not with the number
            of spots. Capped so that a batch's feature maps stay under about 2 GB (every sequence holds a few
            ``genes x embed_dim`` maps: 512 sequences of 10,000 genes would need about 13 GB); with the ``cpu`` preset,
            512 sequences fit for up to 1,365 genes.
        add_to_adata
            Write ``layers['varst_predicted']`` and ``layers['varst_uncertainty']`` (NaN for genes the model does
            not predict) and ``obsm['varst_tokens']``; when the query lacks some model genes the predictions go to
            ``obsm['varst_predicted']`` / ``obsm['varst_uncertainty']`` as DataFrames with gene columns instead.
        seed
            Seed of the sampler (defaults to the model's seed).
        return_prefixes
            Also return the point prediction after each generated scale, ``[n_scales, n_spots, n_genes]``.
        use_cache
            Generate with the KV cache (one pass per scale over the new tokens only).
        uncertainty
            ``"total"``: sd of the decoded draws combined with the per-gene observation noise calibrated after
            stage 2 (a predictive sd for observed expression; without sampling, the noise alone); ``"model"``: sd
            of the decoded draws alone (how much the generated tokens disagree).
        ridge_blend
            Weight of the linear probe in the prediction, ``(1 - w) * transformer + w * probe``; None = the model's
            ``var_config["ridge_blend"]`` (0.5 in the cpu preset), 0 = the transformer alone. The calibrated noise
            of ``uncertainty="total"`` belongs to the model's own weight.

        Returns
        -------
        ``[n_spots, n_genes]`` on the target scale: in the query's gene order when it holds exactly the model's genes,
        otherwise in the model's order (``model.gene_names_``). With ``return_prefixes``, a tuple with the prefixes.
        """
        self._require(2)
        if uncertainty not in ("total", "model"):
            raise ValueError(f"uncertainty must be 'total' or 'model', got {uncertainty!r}.")
        if decode not in ("expected", "mean_of_samples", "greedy"):
            raise ValueError(f"decode must be 'expected', 'mean_of_samples' or 'greedy', got {decode!r}.")
        if n_samples < 0 or (decode == "mean_of_samples" and n_samples < 1):
            raise ValueError(f"n_samples must be >= 0 (>= 1 for decode='mean_of_samples'), got {n_samples}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        adata = self._validate_adata(adata)
        sp = self._spatial_inputs(adata)
        rows = self._rows(adata, indices)
        missing = ~sp["has_histology"][rows]
        if missing.all():
            raise ValueError(
                "None of the requested spots has histology (all-NaN rows in the histology obsm); embed their images "
                "first (varst.pp.embed_histology)."
            )
        if missing.any():
            warn_user(f"{int(missing.sum())} spots have no histology (all-NaN rows); their predictions are NaN.")
        keep = np.flatnonzero(~missing)  # output rows that get a prediction
        seed = self.init_params_["seed"] if seed is None else seed
        gen = torch.Generator().manual_seed(seed)
        self.module.eval()
        out = _RowFiller(len(rows))
        if ridge_blend is not None and not 0.0 <= ridge_blend <= 1.0:
            raise ValueError(f"ridge_blend must lie in [0, 1] (0 = the transformer alone), got {ridge_blend}.")
        sample_kw = {
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "cfg": cfg,
            "use_cache": use_cache,
            "ridge_blend": ridge_blend,
        }
        for at in _chunks(keep, _spots_per_batch(batch_size, n_samples, self.module)):
            b = self._batch_tensors(sp, rows[at])
            args = (b["histology"], b["coords"], b.get("neighbours"))
            samples = None
            if n_samples > 0:
                mos_prefixes = return_prefixes and decode == "mean_of_samples"
                s = self.module.generate(
                    *args,
                    decode="sample",
                    n_samples=n_samples,
                    generator=gen,
                    return_prefixes=mos_prefixes,
                    **sample_kw,
                )
                samples = s["expression"]
            if decode == "mean_of_samples":
                point = samples.mean(0)
                tokens = s["tokens"][0]
                pre = s["prefix_expression"].mean(1) if return_prefixes else None
            else:
                p = self.module.generate(
                    *args, decode=decode, n_samples=1, return_prefixes=return_prefixes, **sample_kw
                )
                point, tokens = p["expression"][0], p["tokens"][0]
                pre = p["prefix_expression"][:, 0] if return_prefixes else None
            var = samples.var(0, unbiased=False) if samples is not None else torch.zeros_like(point)
            if uncertainty == "total":
                var = var + self.module.noise_std**2
            out.put("pred", at, point.numpy(), np.nan)
            out.put("unc", at, var.sqrt().numpy(), np.nan)
            out.put("tokens", at, tokens.numpy(), -1)
            if pre is not None:  # [n_scales, b, n_genes] stored spot-first
                out.put("prefixes", at, pre.numpy().swapaxes(0, 1), np.nan)
        pred, unc, tokens = out.arrays["pred"], out.arrays["unc"], out.arrays["tokens"]
        pre_parts = [out.arrays["prefixes"].swapaxes(0, 1)] if "prefixes" in out.arrays else []
        pos = adata.var_names.get_indexer(self.gene_names_)
        if add_to_adata and indices is None:
            self._write_predictions(adata, pred, unc, tokens, pos)
        same_genes = adata.n_vars == len(self.gene_names_) and (pos >= 0).all()
        if same_genes:
            order = np.argsort(pos)
            pred = pred[:, order]
            pre_parts = [p[..., order] for p in pre_parts]
        if return_prefixes:
            return pred, pre_parts[0]
        return pred

    def predict_samples(
        self,
        adata: AnnData | None = None,
        n_samples: int = 10,
        batch_size: int = 512,
        seed: int | None = None,
        add_noise: bool = True,
        **kw,
    ) -> np.ndarray:
        """Sampled predictions ``[n_samples, n_spots, n_genes]`` in the model's gene order (for calibration checks).

        With ``add_noise`` (default) each draw includes the calibrated per-gene observation noise, so the draws form
        a predictive distribution for observed expression; ``batch_size`` counts generated sequences
        (``batch_size // n_samples`` spots at a time); keyword arguments go to the sampler.
        """
        self._require(2)
        adata = self._validate_adata(adata)
        sp = self._spatial_inputs(adata)
        gen = torch.Generator().manual_seed(self.init_params_["seed"] if seed is None else seed)
        self.module.eval()
        parts = []
        with torch.inference_mode():
            for chunk in _chunks(np.arange(adata.n_obs), _spots_per_batch(batch_size, n_samples, self.module)):
                b = self._batch_tensors(sp, chunk)
                out = self.module.generate(
                    b["histology"],
                    b["coords"],
                    b.get("neighbours"),
                    decode="sample",
                    n_samples=n_samples,
                    generator=gen,
                    add_noise=add_noise,
                    **kw,
                )
                parts.append(out["expression"].numpy())
        return np.concatenate(parts, axis=1)

    def _write_predictions(self, adata, pred, unc, tokens, pos) -> None:
        adata.obsm[ADATA_KEYS.TOKENS] = tokens
        if (pos >= 0).all():
            for key, val in ((ADATA_KEYS.PREDICTED, pred), (ADATA_KEYS.UNCERTAINTY, unc)):
                layer = np.full((adata.n_obs, adata.n_vars), np.nan, dtype=np.float32)
                layer[:, pos] = val
                adata.layers[key] = layer
        else:
            for key, val in ((ADATA_KEYS.PREDICTED, pred), (ADATA_KEYS.UNCERTAINTY, unc)):
                adata.obsm[key] = pd.DataFrame(val, index=adata.obs_names, columns=self.gene_names_)

    def _require(self, stage: int) -> None:
        if stage == 1 and not self.module.stage1_trained:
            raise RuntimeError("Stage 1 is not trained yet; call `model.train(stage=1)` first.")
        if stage == 2 and not self.module.stage2_trained:
            what = "model.train(stage=2)" if self.module.stage1_trained else "model.train(stage=1), then stage=2"
            raise RuntimeError(f"Stage 2 is not trained yet; call `{what}` before predicting from histology.")

    def get_model_info(self) -> dict[str, Any]:
        """Parameters per stage, current stage, vocabulary, scales, token counts, configs and training state."""
        info = self.module.get_model_info()
        info.update(
            {
                "target": self.init_params_["target"],
                "n_genes": len(self.gene_names_),
                "setup_args": dict(self.setup_args_),
                "epochs_trained": {k: _epochs(v) for k, v in self.history_.items()},
                "ridge_probe": {
                    "blend": float(self.module.var_config["ridge_blend"]),
                    "fitted": self.module.has_probe,
                    "alpha": float(self.module.probe_alpha[0]),
                },
            }
        )
        return info

    def codebook_usage(self, adata: AnnData | None = None) -> np.ndarray:
        """How often each code is used by the tokens of ``adata`` (default: the training data), ``[vocab_size]``."""
        tokens = self.get_tokens(adata)
        return np.bincount(tokens.reshape(-1), minlength=self.module.vqvae_config["vocab_size"])

    # ------------------------------------------------------------------ persistence
    def save(self, dir_path: str | os.PathLike, overwrite: bool = False, save_anndata: bool = False) -> None:
        """Save weights (safetensors) and everything else (JSON) to ``dir_path``; never unpickled on load.

        Parameters
        ----------
        dir_path
            Target directory; written to a temporary sibling first and then renamed into place.
        overwrite
            Replace an existing directory. Without it an existing path is an error and stays untouched.
        save_anndata
            Also write the training AnnData as ``adata.h5ad``.
        """
        dir_path = Path(dir_path)
        if dir_path.exists() and not overwrite:
            raise FileExistsError(f"{dir_path} already exists; pass overwrite=True to replace it.")
        dir_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dir_path.name}.", dir=dir_path.parent))
        try:
            self.module.save_complete_model(tmp / _WEIGHTS_FILE)
            meta = {
                "format_version": FORMAT_VERSION,
                "class": type(self).__name__,
                "init_params": _json_safe(self.init_params_),
                "setup_args": self.setup_args_,
                "gene_names": self.gene_names_,
                "is_trained": {str(k): v for k, v in self.is_trained_.items()},
                "history": {k: v.to_dict(orient="list") for k, v in self.history_.items()},
            }
            (tmp / _META_FILE).write_text(json.dumps(meta, indent=1))
            if save_anndata:
                self.adata.write_h5ad(tmp / "adata.h5ad")
            if dir_path.exists():
                old = dir_path.with_name(f".{dir_path.name}.old")
                if old.exists():
                    shutil.rmtree(old)
                os.replace(dir_path, old)
                os.replace(tmp, dir_path)
                shutil.rmtree(old)
            else:
                os.replace(tmp, dir_path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata: AnnData | None = None) -> VARST:
        """Load a model saved with :meth:`save`.

        Parameters
        ----------
        dir_path
            Directory written by :meth:`save`.
        adata
            AnnData to attach (a query for prediction, or training data to continue training). Registered with the
            saved setup arguments when it is not registered yet (only possible when it holds the counts layer);
            defaults to ``adata.h5ad`` in the directory when saved with ``save_anndata=True``.
        """
        import anndata as ad

        dir_path = Path(dir_path)
        meta_file = dir_path / _META_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} not found; pass a directory written by VARST.save().")
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_file} is damaged: {err}") from err
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{dir_path} was saved by a newer varst-scverse; upgrade to load it.")
        tensors, ck_meta = load_checkpoint(dir_path / _WEIGHTS_FILE)
        if adata is None and (dir_path / "adata.h5ad").is_file():
            adata = ad.read_h5ad(dir_path / "adata.h5ad")
        if adata is None:
            raise ValueError(f"Pass adata= to VARST.load: {dir_path} holds no saved AnnData.")
        check_anndata(adata)
        self = cls.__new__(cls)
        self.setup_args_ = meta["setup_args"]
        self.init_params_ = meta["init_params"]
        self.gene_names_ = list(meta["gene_names"])
        self.is_trained_ = {int(k): bool(v) for k, v in meta["is_trained"].items()}
        self.history_ = {k: pd.DataFrame(v) for k, v in meta["history"].items()}
        module = TwoStageVARST.from_checkpoint_meta(ck_meta)
        try:
            module.load_state_dict(module.fill_missing_state(tensors))
        except RuntimeError as err:
            raise ValueError(f"{dir_path}: weights do not match the saved architecture: {err}") from err
        module.stage1_trained = bool(ck_meta["stage1_trained"])
        module.stage2_trained = bool(ck_meta["stage2_trained"])
        module.preset = self.init_params_["preset"]
        module.set_training_stage(ck_meta["current_stage"], _allow_untrained=True)
        module.eval()
        self.module = module
        self.adata = adata
        uid = adata.uns.get("_scvi_uuid")
        self.adata_manager = cls._managers.get(uid) if uid is not None else None
        layer = self.setup_args_["layer"]
        if self.adata_manager is None and (layer is None or layer in adata.layers) and adata.n_vars > 0:
            try:
                cls.setup_anndata(adata, **self.setup_args_)
                self.adata_manager = cls._managers[adata.uns["_scvi_uuid"]]
            except (KeyError, ValueError, TypeError) as err:
                _logger.info("Loaded model attached to an AnnData that cannot be registered for training: %s", err)
        return self


class _RowFiller:
    """Output arrays with one row per requested spot, allocated on first write and filled batch by batch.

    Rows never written keep ``fill`` (spots without histology; NaN for floats, -1 for tokens), so no per-batch list
    has to be concatenated.
    """

    def __init__(self, n_rows: int):
        self.n_rows = n_rows
        self.arrays: dict[str, np.ndarray] = {}

    def put(self, name: str, at: np.ndarray, values: np.ndarray, fill) -> None:
        if name not in self.arrays:
            self.arrays[name] = np.full((self.n_rows, *values.shape[1:]), fill, dtype=values.dtype)
        self.arrays[name][at] = values


def _epochs(history: pd.DataFrame) -> int:
    """Epochs a stage trained (per member for an ensemble's stage 2, whose history has a ``member`` column)."""
    if "member" in history and len(history):
        return int(history.groupby("member").size().max())
    return len(history)


def _spots_per_batch(batch_size: int, n_samples: int, module: TwoStageVARST) -> int:
    """Spots per generation batch when each spot is generated ``n_samples`` times (memory ∝ sequences).

    ``batch_size`` sequences, fewer when the module's gene panel would take more than
    :data:`~varst_scverse.model._memory.GENERATION_BUDGET_BYTES` of feature maps at that size.
    """
    fit = generation_sequences_that_fit(module.num_positions, module.vqvae_config["embed_dim"])
    return max(1, min(int(batch_size), fit) // max(1, int(n_samples)))


def _chunks(rows: np.ndarray, size: int):
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [_json_safe(v) for v in obj]
    return obj
