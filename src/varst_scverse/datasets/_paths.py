"""Where the example data live: argument, ``$VARST_DATA_DIR``, a ``shared/data`` folder near the code, or a cache."""

from __future__ import annotations

import os
from pathlib import Path

from .._constants import DATA_DIR_ENV

#: name of the application folder inside the per-user cache (``pooch.os_cache``)
CACHE_NAME = "varst-scverse"


def default_cache_dir() -> Path:
    """Return the per-user cache a machine with internet fills with :func:`varst_scverse.datasets.download_her2st`."""
    try:
        import pooch

        return Path(pooch.os_cache(CACHE_NAME))
    except ImportError:  # pragma: no cover - pooch is a dependency
        return Path.home() / ".cache" / CACHE_NAME


def _holds(root: Path, dataset: str) -> bool:
    return (root / dataset).is_dir()


def _shared_candidates(start: Path) -> list[Path]:
    """``<ancestor>/shared/data`` for ``start`` and each of its ancestors (a checkout sits beside ``shared/``)."""
    start = start.resolve()
    return [p / "shared" / "data" for p in (start, *start.parents)]


def candidate_data_dirs(dataset: str = "her2st") -> list[tuple[str, Path]]:
    """Every place :func:`resolve_data_dir` looks, in order, as ``(how, path)`` pairs."""
    out: list[tuple[str, Path]] = []
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        out.append((f"${DATA_DIR_ENV}", Path(env).expanduser()))
    seen: set[Path] = set()
    for how, start in (("beside the package", Path(__file__).parent), ("beside the working directory", Path.cwd())):
        for cand in _shared_candidates(start):
            if cand not in seen:
                seen.add(cand)
                out.append((how, cand))
    out.append(("download cache", default_cache_dir()))
    return out


def resolve_data_dir(data_dir: str | Path | None = None, dataset: str = "her2st") -> Path:
    """Find the folder that holds the example data set ``dataset`` (a sub-folder, e.g. ``her2st/``).

    Parameters
    ----------
    data_dir
        Explicit location: the data root (containing ``her2st/``) or the data-set folder itself.
    dataset
        Name of the data-set sub-folder to look for.

    Returns
    -------
    The data root: ``<root>/<dataset>`` exists.

    Notes
    -----
    Without ``data_dir``, the order is: the environment variable ``VARST_DATA_DIR``; a ``shared/data`` folder next to
    any ancestor of the installed package, then of the current working directory (a checkout placed beside
    ``shared/``); the download cache filled by :func:`~varst_scverse.datasets.download_her2st`.

    Raises
    ------
    FileNotFoundError
        Listing every place searched and how to provide the data.
    """
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if _holds(root, dataset):
            return root.resolve()
        if root.is_dir() and root.name == dataset:
            return root.parent.resolve()
        raise FileNotFoundError(
            f"data_dir={str(data_dir)!r} does not contain a {dataset!r} folder (and is not one itself)."
        )
    tried = candidate_data_dirs(dataset)
    for _, root in tried:
        if _holds(root, dataset):
            return root.resolve()
    lines = "\n".join(f"  - {root / dataset}  ({how})" for how, root in tried)
    raise FileNotFoundError(
        f"Could not find the {dataset!r} data. Looked in:\n{lines}\n"
        f"Provide it by setting the environment variable {DATA_DIR_ENV} to the folder that contains {dataset}/ "
        f"(or pass data_dir=), or on a machine with internet run varst_scverse.datasets.download_{dataset}()."
    )
