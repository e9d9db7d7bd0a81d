"""Checkpoint files: safetensors weights plus JSON metadata — loading never unpickles anything.

A SHA-256 of the tensor bytes travels in the metadata so that a truncated or altered file is refused with a clear
message, and a format version lets later releases read older files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT_NAME = "varst-scverse"
FORMAT_VERSION = 1
_META_KEY = "varst"


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` and JSON-serialisable ``meta`` to ``path`` atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    full_meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **meta, "sha256": _digest(tensors)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(full_meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`; refuse damaged, foreign or too-new files clearly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}. Pass the file written by save_stage_checkpoint/save.")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{path} is not a readable varst-scverse checkpoint (it may be truncated or not a safetensors file): {err}"
        ) from err
    if raw is None:
        raise ValueError(
            f"{path} is a safetensors file but not a varst-scverse checkpoint (no '{_META_KEY}' metadata)."
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"The metadata of {path} is damaged: {err}") from err
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {FORMAT_NAME!r}.")
    if int(meta.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer varst-scverse (checkpoint format {meta['version']}, this release reads "
            f"up to {FORMAT_VERSION}); upgrade varst-scverse."
        )
    if meta.get("sha256") != _digest(tensors):
        raise ValueError(f"{path} failed its integrity check: the weights were altered or damaged after saving.")
    return tensors, meta
