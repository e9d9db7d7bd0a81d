"""Execute the tutorials in place, so that they are committed with their outputs and figures.

Run from the repository root with the project's environment::

    .venv/bin/python docs/_scripts/execute_tutorials.py                 # all of tutorials/*.ipynb
    .venv/bin/python docs/_scripts/execute_tutorials.py tutorials/02_bring_your_own_embeddings.ipynb

Each notebook runs in a fresh kernel with ``tutorials/`` as its working directory; its outputs are replaced and the
notebook is written back. ``--quick`` sets ``VARST_TUTORIAL_QUICK=1`` (reduced size, as the tests run them) and does
not write anything back.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = ROOT / "tutorials"


def execute(path: str | os.PathLike, quick: bool = False, timeout: int = 1800, write: bool = True) -> float:
    """Execute one notebook in a fresh ``python3`` kernel; return the seconds it took."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    env_before = os.environ.get("VARST_TUTORIAL_QUICK")
    os.environ["VARST_TUTORIAL_QUICK"] = "1" if quick else "0"
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # the tutorials' models are small: on a busy 2-core machine one torch thread is several times faster than two
    # contended ones (the kernel inherits this environment; set OMP_NUM_THREADS yourself to override)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    try:
        client = NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
        )
        client.execute()
    finally:
        if env_before is None:
            os.environ.pop("VARST_TUTORIAL_QUICK", None)
        else:
            os.environ["VARST_TUTORIAL_QUICK"] = env_before
    seconds = time.time() - t0
    if write:
        nbformat.write(nb, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    """Command-line entry."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebooks", nargs="*", help="default: tutorials/*.ipynb")
    p.add_argument("--quick", action="store_true", help="reduced size; nothing is written back")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = p.parse_args(argv)
    paths = [Path(n) for n in args.notebooks] or sorted(TUTORIALS.glob("*.ipynb"))
    for path in paths:
        seconds = execute(path, quick=args.quick, timeout=args.timeout, write=not args.quick)
        size = path.stat().st_size / 1024
        print(f"{path.name}: {seconds:.0f} s" + ("" if args.quick else f", {size:.0f} KB"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
