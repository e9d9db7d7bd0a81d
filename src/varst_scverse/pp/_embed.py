"""Per-spot histology embeddings: the built-in morphology descriptor, an RGB control, or any image encoder."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from anndata import AnnData

from .._constants import ADATA_KEYS
from ._morphology import morphology_feature_names, morphology_features, rgb_features
from ._patches import DEFAULT_SIZE_PX, extract_patches
from ._resolve import describe, resolve_adata

#: uns entry describing how ``obsm[key_added]`` was computed
UNS_HISTOLOGY = ADATA_KEYS.UNS_HISTOLOGY
#: output side of the patches fed to a torch module (the usual ViT input)
MODULE_SIZE_PX = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BUILTIN = {"morphology": morphology_features, "rgb": rgb_features}


def _module_encoder(module: Any, device: str) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    module.to(device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def encode(patches: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(patches)).to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - mean) / std
        with torch.inference_mode():
            out = module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"The encoder module returned {type(out).__name__}; expected a tensor [batch, ...].")
        return out.reshape(out.shape[0], -1).float().cpu().numpy()

    return encode


def embed_histology(
    adata: AnnData | Any,
    encoder: str | Callable | Any | None = None,
    key_added: str = ADATA_KEYS.HISTOLOGY,
    size_um: float = 200.0,
    size_px: int | None = None,
    batch_size: int = 128,
    device: str = "cpu",
    library_key: str = ADATA_KEYS.SECTION,
    copy: bool = False,
    show_progress: bool = True,
    pixel_size_um: float | Mapping[str, float] | None = None,
    standardize: bool | None = None,
    table_key: str = "table",
) -> AnnData | None:
    """Embed the H&E around every spot into ``obsm[key_added]``.

    Patches of ``size_um`` µm are cut around each spot (:func:`~varst_scverse.pp.extract_patches`, one section image
    in memory at a time) and encoded batch by batch.

    Parameters
    ----------
    adata
        AnnData or SpatialData with spot positions and H&E images (see :func:`~varst_scverse.pp.extract_patches`).
    encoder
        - ``None`` or ``"morphology"``: the built-in, weights-free morphology descriptor
          (:func:`~varst_scverse.pp.morphology_features`: stain statistics, nuclei density, LBP/GLCM/Gabor/DoG
          texture; 156 values), standardised per feature;
        - ``"rgb"``: 6-d RGB mean/std control (:func:`~varst_scverse.pp.rgb_features`), standardised;
        - a :class:`torch.nn.Module`: patches become float tensors ``[b, 3, H, W]`` in ``[0, 1]`` normalised with
          the ImageNet mean ``(0.485, 0.456, 0.406)`` and std ``(0.229, 0.224, 0.225)``, run in ``eval`` mode under
          :func:`torch.inference_mode` on ``device`` (the module is moved there); the output is flattened per patch
          (a tuple/list output contributes its first element);
        - any other callable: called with uint8 patches ``[b, H, W, 3]``, returning ``[b, d]``.
    key_added
        obsm key of the embedding.
    size_um
        Physical side of each patch in µm.
    size_px
        Side of the patches in pixels; default 64 for the built-in encoders and callables, 224 for torch modules.
    batch_size
        Patches encoded at once.
    device
        Torch device for module encoders.
    library_key
        obs column with each spot's section.
    copy
        Return a modified copy instead of writing in place.
    show_progress
        Show a tqdm progress bar.
    pixel_size_um
        µm per unit of ``obsm["spatial"]`` when ``uns["spatial"]`` does not record it.
    standardize
        Z-score every feature over all embedded spots (mean and std stored in ``uns``). Default: ``True`` for the
        built-in encoders, ``False`` otherwise. The scaling depends on the spots embedded together; models should
        still standardise with their training statistics.
    table_key
        Table to use when ``adata`` is a SpatialData with several tables.

    Returns
    -------
    ``None`` (or the AnnData when ``copy=True``). Writes ``obsm[key_added]`` (float32 ``[n_obs, d]``; **all-NaN
    rows** for spots without an image — the model reads those as "no histology") and ``uns["varst_histology"]``
    (encoder, size_um, size_px, key_added, standardize, skipped sections, and, when standardised, the feature
    means and stds).

    Examples
    --------
    Built-in descriptor::

        varst.pp.embed_histology(adata)  # obsm["X_histology"], 156 features

    A pathology foundation model, e.g. UNI through ``timm`` with weights you downloaded yourself (UNI expects
    224 px at 0.5 µm/px, i.e. 112 µm patches)::

        import timm, torch

        uni = timm.create_model(
            "vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True
        )
        uni.load_state_dict(torch.load("/path/to/uni/pytorch_model.bin", map_location="cpu"), strict=True)
        varst.pp.embed_histology(adata, encoder=uni, key_added="X_uni", size_um=112, size_px=224, device="cuda")
    """
    from tqdm.auto import tqdm

    data = adata
    target = resolve_adata(data, table_key=table_key)
    is_module = False
    try:
        import torch

        is_module = isinstance(encoder, torch.nn.Module)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if encoder is None or isinstance(encoder, str):
        name = "morphology" if encoder is None else encoder.lower()
        if name not in _BUILTIN:
            raise ValueError(
                f"Unknown encoder {encoder!r}; use one of {sorted(_BUILTIN)}, a torch module or a callable."
            )
        encode = _BUILTIN[name]
        builtin = True
    elif is_module:
        name = describe(encoder)
        encode = _module_encoder(encoder, device)
        builtin = False
    elif callable(encoder):
        name = describe(encoder)
        encode = encoder
        builtin = False
    else:
        raise TypeError(f"encoder must be None, a name, a torch module or a callable, got {type(encoder).__name__}.")
    if size_px is None:
        size_px = MODULE_SIZE_PX if is_module else DEFAULT_SIZE_PX
    if standardize is None:
        standardize = builtin

    batches = extract_patches(
        data,
        size_um=size_um,
        size_px=size_px,
        library_key=library_key,
        pixel_size_um=pixel_size_um,
        batch_size=batch_size,
        table_key=table_key,
    )
    out_adata = target.copy() if copy else target
    emb: np.ndarray | None = None
    was_training = bool(getattr(encoder, "training", False)) if is_module else False
    if is_module:
        encoder.eval()
    try:
        with tqdm(total=batches.n_patches, desc=f"embed ({name})", unit="patch", disable=not show_progress) as bar:
            for idx, patches in batches:
                feats = np.asarray(encode(patches), dtype=np.float32)
                if feats.ndim != 2 or feats.shape[0] != len(idx):
                    raise ValueError(
                        f"The encoder returned shape {feats.shape} for {len(idx)} patches; expected [n_patches, d]."
                    )
                if emb is None:
                    emb = np.full((out_adata.n_obs, feats.shape[1]), np.nan, dtype=np.float32)
                emb[idx] = feats
                bar.update(len(idx))
    finally:
        if is_module and was_training:
            encoder.train()
    assert emb is not None  # extract_patches raises when nothing has an image
    done = batches.obs_indices
    info: dict[str, Any] = {
        "encoder": name,
        "key_added": key_added,
        "size_um": float(size_um),
        "size_px": int(size_px),
        "standardize": bool(standardize),
        "n_embedded": int(done.size),
        "skipped_sections": list(batches.skipped_libraries),
    }
    if standardize:
        values = emb[done].astype(np.float64)
        mean = values.mean(axis=0)
        std = values.std(axis=0)
        std = np.where(std > 1e-12 * np.maximum(np.abs(mean), 1.0), std, 1.0)
        emb[done] = ((values - mean) / std).astype(np.float32)
        info["feature_mean"] = mean
        info["feature_std"] = std
    if name == "morphology" and builtin:
        info["feature_names"] = np.asarray(morphology_feature_names(), dtype=object)
    out_adata.obsm[key_added] = emb
    out_adata.uns[UNS_HISTOLOGY] = info
    return out_adata if copy else None
