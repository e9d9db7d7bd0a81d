r"""The ``varst`` command line: the seed guide's training flags, plus ``predict``, ``info``, ``demo`` and ``benchmark``.

Stage 1 (the gene VQ-VAE tokenizer)::

    varst train --dataset data.h5ad --model TWO_STAGE_VAR_ST --training_stage 1 \
        --epochs 150 --batch_size 256 --lr 1e-4 --gpus 1

writes ``logs/<dataset>/TWO_STAGE_VAR_ST/stage1_vqvae/`` with ``best_vqvae.ckpt`` (the tokenizer: safetensors
weights + JSON metadata, whatever the extension), ``model/`` (the :class:`~varst_scverse.VARST` model,
:meth:`~varst_scverse.VARST.load`-able), ``history.csv``, ``run.json``, TensorBoard logs (``tensorboard/``) and
Lightning's resume files (``checkpoints/``). Stage 2 (the VAR transformer) starts from that checkpoint::

    varst train --dataset data.h5ad --model TWO_STAGE_VAR_ST --training_stage 2 \
        --stage1_ckpt logs/data/TWO_STAGE_VAR_ST/stage1_vqvae/best_vqvae.ckpt \
        --epochs 300 --batch_size 64 --lr 1e-4 --gpus 1

and writes ``.../stage2_var/`` with ``best_model.ckpt`` (the complete model) and ``model/``. The seed's form without
a sub-command (``varst --dataset ... --training_stage 1``) means ``varst train``.

Datasets: an ``.h5ad`` with raw counts (layer ``counts`` when present, else ``X``), a histology embedding in
``obsm['X_histology']`` and coordinates in ``obsm['spatial']`` (keys configurable); all its genes are modelled unless
``--n_genes`` asks for the most variable ones. ``--dataset her2st`` reads the HER2ST study with
:func:`varst_scverse.datasets.her2st` (default: the six sections with H&E, ``--sections all`` for all 36), embeds the
H&E with the built-in, weights-free morphology descriptor (:func:`varst_scverse.pp.embed_histology`), selects the
200 most variable genes (:func:`varst_scverse.pp.select_genes`, ``--n_genes``) and caches the result as
``<output>/her2st/prepared_<sections>.h5ad`` for the next run. Stage 2 always models the genes of the stage-1
checkpoint, in its order.

Hidden options for tests and experiments: ``--vqvae_config JSON`` / ``--var_config JSON`` (a JSON object or the path
of a JSON file) override preset fields with the seed guide's key names.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as lpl

MODEL_NAME = "TWO_STAGE_VAR_ST"
STAGE_DIRS = {1: "stage1_vqvae", 2: "stage2_var"}
STAGE_CKPTS = {1: "best_vqvae.ckpt", 2: "best_model.ckpt"}
HER2ST_IMAGED = ("B4", "C2", "C3", "C4", "C5", "C6")
_MODEL_DIR = "model"
_META_FILE = "varst.json"

log = logging.getLogger("varst_scverse.cli")


class CLIError(Exception):
    """A user error: printed as ``varst <command>: error: <message>`` without a traceback."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------------------------------------
def _json_dict(value: str) -> dict[str, Any]:
    """A JSON object given inline or as the path of a file holding one."""
    text = Path(value).read_text() if value and not value.lstrip().startswith("{") and Path(value).is_file() else value
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not a JSON object or JSON file: {value!r} ({err})") from err
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(obj).__name__}: {value!r}")
    return obj


def _optional_int(value: str) -> int | None:
    return None if value.lower() in ("none", "null", "0") else int(value)


def _optional_float(value: str) -> float | None:
    return None if value.lower() in ("none", "null") else float(value)


def _add_train_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train stage 1 (tokenizer) or stage 2 (transformer) on an .h5ad or HER2ST",
        description="Train one stage of Two-Stage VAR-ST (the seed guide's flags).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("the seed guide's flags")
    g.add_argument("--dataset", required=True, help="an .h5ad file, or 'her2st'")
    g.add_argument("--model", default=MODEL_NAME, choices=[MODEL_NAME], help="model name (one model here)")
    g.add_argument("--training_stage", type=int, choices=(1, 2), default=1, help="1: VQ-VAE, 2: VAR transformer")
    g.add_argument("--stage1_ckpt", default=None, help="stage-1 checkpoint (best_vqvae.ckpt) or model dir; stage 2")
    g.add_argument("--epochs", type=int, default=None, help="epochs (default: 150/300 seed preset, 60/60 cpu)")
    g.add_argument("--batch_size", type=int, default=None, help="spots per batch (default: 256 stage 1, 64 stage 2)")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    g.add_argument("--gpus", type=int, default=None, help="GPUs (0 = CPU; >1 = DDP); default: 1 if CUDA else 0")
    g.add_argument("--debug", action="store_true", help="verbose logs, anomaly detection, one-batch fast_dev_run")
    o = p.add_argument_group("outputs and model")
    o.add_argument("--output", default="logs", help="root folder of the run outputs")
    o.add_argument("--preset", choices=("seed", "cpu"), default=None, help="default: seed on GPU, cpu on CPU")
    o.add_argument("--target", choices=("log1p", "cp10k"), default="log1p", help="expression target (stage 1)")
    o.add_argument("--seed", type=int, default=0, help="seed of weights, split and sampling")
    o.add_argument(
        "--ensemble_size",
        type=int,
        default=None,
        help="stage 2: transformers trained with seeds seed, seed+1, ... and averaged (default: the preset's, 1)",
    )
    o.add_argument(
        "--gene_positions",
        type=int,
        default=None,
        help="stage 1: pool the ordered genes into at most this many tokenizer positions, for panels of thousands of "
        "genes (default: one position per gene)",
    )
    o.add_argument("--vqvae_config", type=_json_dict, default=None, help=argparse.SUPPRESS)
    o.add_argument("--var_config", type=_json_dict, default=None, help=argparse.SUPPRESS)
    d = p.add_argument_group("data")
    d.add_argument("--layer", default=None, help="layer with raw counts (default: 'counts' if present, else X)")
    d.add_argument("--histology_key", default="X_histology", help="obsm key of the histology embedding")
    d.add_argument("--spatial_key", default="spatial", help="obsm key of the spot coordinates")
    d.add_argument("--batch_key", default=None, help="obs column of the section (default: 'section' if present)")
    d.add_argument("--n_genes", type=int, default=None, help="most variable genes to model (her2st: 200; .h5ad: all)")
    d.add_argument("--sections", default=None, help="her2st: comma-separated sections or 'all' (default: imaged six)")
    d.add_argument("--data_dir", default=None, help="her2st: folder holding her2st/ (default: $VARST_DATA_DIR ...)")
    t = p.add_argument_group("training at scale (Lightning)")
    t.add_argument("--precision", choices=("32", "16-mixed", "bf16-mixed"), default="32", help="Lightning precision")
    t.add_argument("--accumulate_grad_batches", type=int, default=1, help="gradient accumulation")
    t.add_argument("--num_workers", type=int, default=0, help="DataLoader workers")
    t.add_argument("--train_size", type=float, default=0.9, help="training fraction (rest: validation)")
    t.add_argument("--early_stopping", action="store_true", help="stop when the validation loss stalls")
    t.add_argument("--early_stopping_patience", type=int, default=10, help="epochs without improvement")
    t.add_argument(
        "--resume",
        nargs="?",
        const="last",
        default=None,
        metavar="CKPT",
        help="resume an interrupted run from its last Lightning checkpoint (or from CKPT)",
    )
    t.add_argument("--accelerator", default=None, help="override --gpus: Lightning accelerator (cpu, gpu, ...)")
    t.add_argument("--devices", type=int, default=None, help="override --gpus: number of devices/processes")
    t.add_argument("--strategy", default=None, help="override: Lightning strategy (default: ddp when devices > 1)")
    t.add_argument("--progress_bar", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    return p


def _add_predict_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "predict",
        help="predict expression for an .h5ad with histology and coordinates",
        description="Predict expression with a trained model; writes layers varst_predicted / varst_uncertainty.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model directory (…/stage2_var/model or …/stage2_var)")
    p.add_argument("--adata", required=True, help="query .h5ad with the training histology and spatial keys")
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--n_samples", type=int, default=10, help="sampled generations per spot (uncertainty)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top_k", type=_optional_int, default=None, help="top-k filter (none = off)")
    p.add_argument("--top_p", type=_optional_float, default=None, help="nucleus filter (none = off)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--decode", choices=("expected", "mean_of_samples", "greedy"), default="expected")
    p.add_argument(
        "--ridge_blend",
        type=float,
        default=None,
        help="weight of the model's ridge probe (0 = the transformer alone; default: the model's own)",
    )
    p.add_argument("--batch_size", type=int, default=512, help="spots per batch")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the model's)")
    p.add_argument("--debug", action="store_true", help="verbose logs and full tracebacks")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``varst`` argument parser (``demo`` and ``benchmark`` forward their arguments untouched)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="varst",
        description="Two-Stage VAR-ST: predict spatial gene expression from histology.",
        epilog="The seed's form without a sub-command (varst --dataset ... --training_stage 1) runs `varst train`.",
    )
    parser.add_argument("--version", action="version", version=f"varst-scverse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,predict,info,demo,benchmark}")
    _add_train_parser(sub)
    _add_predict_parser(sub)
    p = sub.add_parser("info", help="print a saved model's get_model_info() as JSON")
    p.add_argument("path", help="model directory (VARST.save) or checkpoint file (best_vqvae.ckpt, best_model.ckpt)")
    p.add_argument("--debug", action="store_true", help="full tracebacks")
    sub.add_parser("demo", help="HER2ST end to end (`varst demo --help` for its options)", add_help=False)
    sub.add_parser("benchmark", help="the benchmark (`varst benchmark --help` for its options)", add_help=False)
    return parser


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------
class _StderrHandler(logging.StreamHandler):
    """Log to whatever ``sys.stderr`` is at the time of the record (stays valid when stderr is swapped)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("[varst] %(message)s"))

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO
    pkg = logging.getLogger("varst_scverse")
    pkg.setLevel(level)
    handler = next((h for h in pkg.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        pkg.addHandler(handler)
    handler.setLevel(level)
    if debug:
        logging.getLogger("lightning.pytorch").setLevel(logging.DEBUG)


def _is_rank_zero() -> bool:
    """True outside distributed runs and on the global rank 0 of one (only it writes outputs).

    Before the process group exists, Lightning's DDP children are recognised by the rank variables it sets.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return all(os.environ.get(k, "0") in ("", "0") for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _dataset_name(dataset: str) -> str:
    return "her2st" if dataset.lower() == "her2st" else Path(dataset).stem


def _stage_dir(output: str | Path, dataset: str, stage: int) -> Path:
    return Path(output) / _dataset_name(dataset) / MODEL_NAME / STAGE_DIRS[stage]


def _devices(args: argparse.Namespace) -> dict[str, Any]:
    """Lightning accelerator / devices / strategy from --gpus (or the explicit overrides)."""
    import torch

    if args.accelerator is not None or args.devices is not None:
        accelerator = args.accelerator or "auto"
        devices = args.devices if args.devices is not None else 1
    else:
        gpus = args.gpus if args.gpus is not None else (1 if torch.cuda.is_available() else 0)
        if gpus < 0:
            raise CLIError(f"--gpus must be >= 0, got {gpus}.", code=2)
        if gpus > 0:
            available = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if available < gpus:
                raise CLIError(
                    f"--gpus {gpus} asks for {gpus} GPU(s) but {available} CUDA device(s) are visible; "
                    "use --gpus 0 to train on the CPU.",
                    code=2,
                )
        accelerator, devices = ("gpu", gpus) if gpus > 0 else ("cpu", 1)
    if devices < 1:
        raise CLIError(f"--devices must be >= 1, got {devices}.", code=2)
    strategy = args.strategy or ("ddp" if devices > 1 else "auto")
    return {"accelerator": accelerator, "devices": devices, "strategy": strategy}


def _read_h5ad(path: str | Path):
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise CLIError(f"No file at {path}; pass an .h5ad file (or --dataset her2st).", code=2)
    try:
        return ad.read_h5ad(path)
    except Exception as err:  # noqa: BLE001 - any reader failure is a user-facing "cannot read" message
        raise CLIError(f"Cannot read {path} as .h5ad: {err}") from err


def _her2st(args: argparse.Namespace):
    """HER2ST with built-in morphology embeddings and the most variable genes, cached under the output folder."""
    import numpy as np

    import varst_scverse as varst
    from varst_scverse._constants import ADATA_KEYS

    if args.sections is None:
        sections = list(HER2ST_IMAGED)
    elif args.sections.strip().lower() == "all":
        sections = None
    else:
        sections = [s.strip().upper() for s in args.sections.split(",") if s.strip()]
    tag = "all" if sections is None else "-".join(sections)
    cache = Path(args.output) / "her2st" / f"prepared_{tag}.h5ad"
    if cache.is_file():
        log.info("reading the prepared HER2ST data from %s", cache)
        return _read_h5ad(cache)
    log.info("reading HER2ST sections %s", tag)
    adata = varst.datasets.her2st(sections=sections, data_dir=args.data_dir)
    section = adata.obs[ADATA_KEYS.SECTION].astype(str)
    imaged = adata[section.isin(HER2ST_IMAGED).to_numpy()].copy()
    if imaged.n_obs == 0:
        raise CLIError(f"None of the sections {tag} has an H&E image here; include some of {list(HER2ST_IMAGED)}.")
    log.info("embedding the H&E of %d spots with the built-in morphology descriptor", imaged.n_obs)
    varst.pp.embed_histology(imaged, show_progress=args.progress_bar)
    emb = imaged.obsm[ADATA_KEYS.HISTOLOGY]
    hist = np.full((adata.n_obs, emb.shape[1]), np.nan, dtype=np.float32)
    hist[adata.obs_names.get_indexer(imaged.obs_names)] = emb
    adata.obsm[ADATA_KEYS.HISTOLOGY] = hist
    if _is_rank_zero():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp")
        adata.write_h5ad(tmp)
        os.replace(tmp, cache)
        log.info("cached the prepared data (all genes) at %s", cache)
    return adata


def _load_dataset(args: argparse.Namespace):
    if args.dataset.lower() == "her2st":
        adata = _her2st(args)
        if args.n_genes is None:
            args.n_genes = 200
    else:
        adata = _read_h5ad(args.dataset)
    if not adata.obs_names.is_unique:
        adata.obs_names_make_unique()
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    return adata


def _subset_genes(adata, args: argparse.Namespace, genes: list[str] | None):
    """Model ``genes`` (from a stage-1 checkpoint) or the ``--n_genes`` most variable ones, or all."""
    import varst_scverse as varst

    if genes is not None:
        missing = [g for g in genes if g not in adata.var_names]
        if missing:
            raise CLIError(
                f"The stage-1 checkpoint models {len(genes)} genes, {len(missing)} of which are missing from "
                f"{args.dataset} (e.g. {missing[:5]}); train stage 2 on data with the same genes."
            )
        return adata[:, genes].copy()
    if args.n_genes is not None and args.n_genes < adata.n_vars:
        layer = _layer(adata, args)
        selected = varst.pp.select_genes(adata, n_top=args.n_genes, layer=layer, batch_key=None)
        log.info("selected the %d most variable genes", len(selected))
        return adata[:, selected].copy()
    return adata


def _layer(adata, args: argparse.Namespace) -> str | None:
    if args.layer is not None:
        if args.layer.upper() == "X":
            return None
        if args.layer not in adata.layers:
            raise CLIError(f"--layer {args.layer!r} not found; layers: {list(adata.layers)} (or --layer X).", code=2)
        return args.layer
    return "counts" if "counts" in adata.layers else None


def _stage1_source(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """Resolve --stage1_ckpt (file, model dir or stage-1 dir) to a checkpoint file and its descriptive metadata."""
    from varst_scverse.module import load_checkpoint

    path = Path(path)
    extra: dict[str, Any] = {}
    if path.is_dir():
        model_dir = path if (path / _META_FILE).is_file() else path / _MODEL_DIR
        if (model_dir / _META_FILE).is_file():
            meta = json.loads((model_dir / _META_FILE).read_text())
            extra = {
                "gene_names": meta.get("gene_names"),
                "target": meta.get("init_params", {}).get("target"),
                "preset": meta.get("init_params", {}).get("preset"),
            }
            path = model_dir / "model.safetensors"
        elif (path / STAGE_CKPTS[1]).is_file():
            path = path / STAGE_CKPTS[1]
        else:
            raise CLIError(f"{path} holds neither a model ({_META_FILE}) nor {STAGE_CKPTS[1]}.", code=2)
    if not path.is_file():
        raise CLIError(f"--stage1_ckpt: no checkpoint at {path}.", code=2)
    try:
        _, meta = load_checkpoint(path)
    except ValueError as err:
        raise CLIError(f"--stage1_ckpt: {err}", code=2) from err
    if not meta.get("stage1_trained", False):
        raise CLIError(f"--stage1_ckpt: {path} holds an untrained tokenizer (stage1_trained is false).", code=2)
    meta = {**meta, **{k: v for k, v in extra.items() if v is not None}}
    return path, meta


def _stage2_refusal(args: argparse.Namespace) -> CLIError:
    expected = _stage_dir(args.output, args.dataset, 1) / STAGE_CKPTS[1]
    msg = (
        "--training_stage 2 needs a stage-1 checkpoint: pass --stage1_ckpt PATH. Stage 2 trains the VAR transformer "
        "on the frozen stage-1 VQ-VAE; train stage 1 first (`varst train --dataset "
        f"{args.dataset} --training_stage 1`), which writes {expected}."
    )
    if expected.is_file():
        msg += f" A checkpoint exists there: --stage1_ckpt {expected}"
    return CLIError(msg, code=2)


def _vq_overrides(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--vqvae_config`` plus ``--gene_positions``."""
    out = dict(args.vqvae_config or {})
    if args.gene_positions is not None:
        out["gene_positions"] = args.gene_positions
    return out or None


def _var_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--var_config`` plus ``--ensemble_size``."""
    out = dict(args.var_config or {})
    if args.ensemble_size is not None:
        out["ensemble_size"] = args.ensemble_size
    return out


def _build_model(adata, args: argparse.Namespace, stage1: tuple[Path, dict[str, Any]] | None, on_gpu: bool):
    """Register ``adata`` and build VARST; for stage 2 with the stage-1 checkpoint's configs, weights and genes."""
    import varst_scverse as varst

    layer = _layer(adata, args)
    batch_key = args.batch_key if args.batch_key is not None else ("section" if "section" in adata.obs else None)
    varst.VARST.setup_anndata(
        adata, layer=layer, histology_key=args.histology_key, spatial_key=args.spatial_key, batch_key=batch_key
    )
    if stage1 is None:
        preset = args.preset or ("seed" if on_gpu else "cpu")
        log.info("preset %r%s", preset, "" if args.preset else " (from the device; --preset to choose)")
        return varst.VARST(
            adata,
            preset=preset,
            vqvae_config=_vq_overrides(args),
            var_config=_var_overrides(args),
            target=args.target,
            seed=args.seed,
        )
    path, meta = stage1
    ck_preset = meta.get("preset", "seed")
    preset = args.preset or ck_preset
    for flag in ("vqvae_config", "gene_positions"):
        if getattr(args, flag) is not None:
            log.warning("--%s is ignored in stage 2: the tokenizer's configuration comes from %s", flag, path)
    # the tokenizer is the checkpoint's; the transformer keeps the checkpoint's settings unless the preset changes
    var_cfg = dict(meta["var_config"]) if preset == ck_preset else {"vocab_size": meta["vqvae_config"]["vocab_size"]}
    var_cfg.update(_var_overrides(args))
    target = meta.get("target") or args.target
    if meta.get("target") and args.target != meta["target"]:
        log.info("target %r from the stage-1 checkpoint (not %r)", meta["target"], args.target)
    try:
        model = varst.VARST(
            adata,
            preset=preset,
            vqvae_config=dict(meta["vqvae_config"]),
            var_config=var_cfg,
            target=target,
            seed=args.seed,
        )
    except ValueError as err:
        raise CLIError(f"Cannot build the model from the stage-1 checkpoint {path}: {err}") from err
    if meta.get("num_genes") != adata.n_vars:
        raise CLIError(
            f"The stage-1 checkpoint {path} models {meta.get('num_genes')} genes, the data has {adata.n_vars}; "
            "pass the data stage 1 was trained on (or one with its genes)."
        )
    if not meta.get("gene_names"):
        log.warning(
            "%s does not record its genes; assuming the data's %d genes are the same, in order", path, adata.n_vars
        )
    model.module.load_stage1(path)
    model.module.stage1_trained = True
    model.is_trained_[1] = True
    log.info("loaded the stage-1 tokenizer from %s", path)
    return model


class _StepRecorder(lpl.Callback):
    """Record the run's optimizer steps (``trainer.global_step``) at its end, summed over an ensemble's members.

    Module-level so that ``ddp_spawn`` can pickle it; there the record stays in the spawned process (None here).
    """

    def __init__(self) -> None:
        self.global_step: int | None = None

    def on_fit_end(self, trainer, pl_module) -> None:  # noqa: D102
        self.global_step = (self.global_step or 0) + int(trainer.global_step)


def _row(history, i: int) -> dict[str, float]:
    return {k: float(v) for k, v in history.iloc[i].items()} if len(history) else {}


def _checkpoint_meta(model, dataset: str) -> dict[str, Any]:
    return {
        "gene_names": list(model.gene_names_),
        "target": model.init_params_["target"],
        "setup_args": dict(model.setup_args_),
        "dataset": dataset,
    }


# --------------------------------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    """``varst train``: one stage, outputs under ``<output>/<dataset>/TWO_STAGE_VAR_ST/stage<k>_.../``."""
    stage = args.training_stage
    if stage == 2 and not args.stage1_ckpt:
        raise _stage2_refusal(args)
    if stage == 1 and args.stage1_ckpt:
        log.warning("--stage1_ckpt is only used by --training_stage 2; ignoring it")
    for name in ("epochs", "batch_size", "accumulate_grad_batches", "ensemble_size", "gene_positions"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CLIError(f"--{name} must be >= 1, got {value}.", code=2)
    if not 0 < args.train_size <= 1:
        raise CLIError(f"--train_size must lie in (0, 1], got {args.train_size}.", code=2)
    if args.debug:
        os.environ.setdefault("CUDA_LAUNCH_BLOCKING", "1")
    dev = _devices(args)
    stage1 = _stage1_source(args.stage1_ckpt) if stage == 2 else None

    import torch

    torch.autograd.set_detect_anomaly(bool(args.debug))
    out_dir = _stage_dir(args.output, args.dataset, stage)
    adata = _load_dataset(args)
    adata = _subset_genes(adata, args, stage1[1].get("gene_names") if stage1 else None)
    model = _build_model(adata, args, stage1, on_gpu=dev["accelerator"] in ("gpu", "cuda"))
    log.info("%s on %d spots x %d genes; %s", model, adata.n_obs, adata.n_vars, dev)

    resume = args.resume
    if resume not in (None, "last") and not Path(resume).is_file():
        raise CLIError(f"--resume: no checkpoint at {resume}.", code=2)
    if resume is None and _is_rank_zero():  # a fresh run must not resume from an older run's files later
        for name in ("last.ckpt", "best.ckpt"):
            stale = out_dir / "checkpoints" / f"stage{stage}" / name
            if stale.is_file():
                stale.unlink()
    # Lightning checkpoints hold one transformer: an ensemble's stage 2 is trained without them (its model is saved)
    ensemble = stage == 2 and model.module.n_members > 1
    if ensemble and resume is not None:
        raise CLIError(
            f"--resume: stage 2 of an ensemble ({model.module.n_members} transformers) keeps no Lightning checkpoints "
            "to resume from; run it again without --resume.",
            code=2,
        )
    has_val = args.train_size < 1
    # stage 1 goes back to its best validation epoch; stage 2 keeps the average of its last epochs (VARST.train)
    restore_best = has_val and not args.debug and stage == 1  # a fast_dev_run writes no checkpoint
    recorder = _StepRecorder()
    logger = lpl.loggers.TensorBoardLogger(str(out_dir), name="tensorboard")
    trainer_kwargs: dict[str, Any] = {"fast_dev_run": True} if args.debug else {}
    t0 = time.time()
    try:
        history = model.train(
            stage=stage,
            max_epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            train_size=args.train_size,
            early_stopping=args.early_stopping,
            early_stopping_patience=args.early_stopping_patience,
            precision=args.precision,
            accumulate_grad_batches=args.accumulate_grad_batches,
            num_workers=args.num_workers,
            pin_memory=dev["accelerator"] in ("gpu", "cuda"),
            enable_progress_bar=args.progress_bar,
            logger=logger,
            default_root_dir=str(out_dir),
            callbacks=[recorder],
            ckpt_path=resume,
            save_checkpoints=not ensemble,
            restore_best=restore_best,
            **dev,
            **trainer_kwargs,
        )
    finally:
        torch.autograd.set_detect_anomaly(False)
    seconds = time.time() - t0
    if not _is_rank_zero():
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / STAGE_CKPTS[stage]
    model.module.save_stage_checkpoint(ckpt, stage=stage, extra_meta=_checkpoint_meta(model, args.dataset))
    model.save(out_dir / _MODEL_DIR, overwrite=True)
    full_history = model.history_.get(f"stage{stage}", history)
    full_history.to_csv(out_dir / "history.csv", index=False)
    summary = {
        "stage": stage,
        "dataset": args.dataset,
        "n_spots": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "preset": model.preset,
        "epochs": len(full_history),
        "global_step": recorder.global_step,
        "seconds": round(seconds, 2),
        "resumed_from": resume,
        "restored_best": restore_best,
        "final": _row(full_history, -1),
        "best": _row(full_history, int(full_history["validation_loss"].argmin()))
        if has_val and "validation_loss" in full_history and full_history["validation_loss"].notna().any()
        else None,
        "checkpoint": str(ckpt),
        "model_dir": str(out_dir / _MODEL_DIR),
        "tensorboard": str(Path(logger.log_dir)),
        "devices": dev,
        "precision": args.precision,
        "debug": bool(args.debug),
    }
    (out_dir / "run.json").write_text(json.dumps(summary, indent=1))
    log.info(
        "stage %d done in %.1fs (%s optimizer steps): %s and %s",
        stage,
        seconds,
        recorder.global_step,
        ckpt,
        out_dir / _MODEL_DIR,
    )
    if stage == 1:
        log.info("next: the same command with --training_stage 2 --stage1_ckpt %s", ckpt)
    return 0


def _model_dir(path: str | Path) -> Path:
    path = Path(path)
    for cand in (path, path / _MODEL_DIR):
        if (cand / _META_FILE).is_file():
            return cand
    if path.is_file():
        raise CLIError(
            f"{path} is a file; pass the model directory written by `varst train` (e.g. …/stage2_var/model).", code=2
        )
    raise CLIError(f"No saved model in {path} (no {_META_FILE} there or in {path / _MODEL_DIR}).", code=2)


def cmd_predict(args: argparse.Namespace) -> int:
    """``varst predict``: load a model directory, predict a query .h5ad, write it with the predictions."""
    import varst_scverse as varst

    model_dir = _model_dir(args.model)
    query = _read_h5ad(args.adata)
    model = varst.VARST.load(model_dir, adata=query)
    if not model.is_trained_.get(2, False):
        raise CLIError(
            f"The model in {model_dir} has no trained stage 2; predict with the stage-2 model "
            "(…/stage2_var/model), trained with `varst train --training_stage 2 --stage1_ckpt ...`.",
            code=2,
        )
    pred = model.predict_expression(
        query,
        n_samples=args.n_samples,
        decode=args.decode,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        cfg=args.cfg,
        batch_size=args.batch_size,
        seed=args.seed,
        ridge_blend=args.ridge_blend,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    query.write_h5ad(out)
    keys = [k for k in ("varst_predicted", "varst_uncertainty") if k in query.layers]
    where = f"layers {keys}" if keys else "obsm ['varst_predicted', 'varst_uncertainty']"
    log.info("predicted %d spots x %d genes -> %s (%s, obsm['varst_tokens'])", pred.shape[0], pred.shape[1], out, where)
    return 0


def model_info(path: str | Path) -> dict[str, Any]:
    """``get_model_info()`` of a saved model directory or of a checkpoint file, without training data."""
    import anndata as ad
    import pandas as pd

    import varst_scverse as varst
    from varst_scverse.module import TwoStageVARST, load_checkpoint

    path = Path(path)
    if path.is_file():
        try:
            _, meta = load_checkpoint(path)
            module = TwoStageVARST.load_complete_model(path)
        except ValueError as err:
            raise CLIError(str(err), code=2) from err
        module.preset = meta.get("preset", module.preset)
        info = module.get_model_info()
        info["checkpoint_kind"] = meta.get("kind")
        for key in ("target", "setup_args", "dataset"):
            if key in meta:
                info[key] = meta[key]
        if meta.get("gene_names"):
            info["n_genes"] = len(meta["gene_names"])
        return info
    model_dir = _model_dir(path)
    meta = json.loads((model_dir / _META_FILE).read_text())
    genes = [str(g) for g in meta["gene_names"]]
    stub = ad.AnnData(obs=pd.DataFrame(index=["0"]), var=pd.DataFrame(index=genes))  # no data needed for info
    logging.getLogger("varst_scverse.model._varst").disabled = True
    try:
        model = varst.VARST.load(model_dir, adata=stub)
    finally:
        logging.getLogger("varst_scverse.model._varst").disabled = False
    info = model.get_model_info()
    info["model_dir"] = str(model_dir)
    return info


def cmd_info(args: argparse.Namespace) -> int:
    """``varst info``: print ``get_model_info()`` as JSON on stdout."""
    print(json.dumps(model_info(args.path), indent=1, default=str))
    return 0


def _forward(command: str, argv: list[str]) -> int:
    if command == "demo":
        from varst_scverse._demo import main as demo_main

        return int(demo_main(argv) or 0)
    try:
        from varst_scverse.benchmark import main as bench_main
    except ModuleNotFoundError as err:
        if err.name not in ("varst_scverse.benchmark",):
            raise
        raise CLIError(
            "the benchmark is not part of this installation (module varst_scverse.benchmark is missing); "
            "install varst-scverse from a checkout that includes it.",
            code=1,
        ) from err
    return int(bench_main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``varst`` console script; returns the exit code.

    Parameters
    ----------
    argv
        Arguments without the program name (default: ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--") and argv[0] not in ("--help", "--version"):
        argv = ["train", *argv]  # the seed's `python src/main.py --dataset ... --training_stage 1`
    command = argv[0] if argv else None
    debug = "--debug" in argv
    _setup_logging(debug)
    try:
        if command in ("demo", "benchmark"):
            return _forward(command, argv[1:])
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # argparse: usage errors (2), --help / --version (0)
            return int(exc.code or 0) if not isinstance(exc.code, str) else 2
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        handler = {"train": cmd_train, "predict": cmd_predict, "info": cmd_info}[args.command]
        return handler(args)
    except CLIError as err:
        if debug:
            raise
        print(f"varst {command}: error: {err}", file=sys.stderr)
        return err.code
    except (FileNotFoundError, FileExistsError, KeyError, ValueError, TypeError, RuntimeError) as err:
        if debug:
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"varst {command}: error: {msg}\n(run with --debug for the full traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
