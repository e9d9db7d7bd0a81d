"""Small helpers shared by the plotting modules: finishing a figure (save / return / close) and panel grids.

Kept private: the public surface of :mod:`varst_scverse.pl` is its ``__init__``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Resolution of the files written by ``save=``.
SAVE_DPI = 120


def finish(fig: Figure, save: str | Path | None, return_fig: bool) -> Figure | None:
    """Save ``fig`` if asked (closing it unless it is returned) and return it when ``return_fig``."""
    import matplotlib.pyplot as plt

    if save is not None:
        path = Path(save)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=SAVE_DPI, bbox_inches="tight")
        if not return_fig:
            plt.close(fig)
    return fig if return_fig else None


def panel_grid(nrows: int, ncols: int, panel_size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    """Return a figure with an ``nrows × ncols`` array of axes (always 2-D), sized per panel."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    axs = np.asarray(fig.subplots(nrows, ncols, squeeze=False))
    return fig, axs


def drop_unused(axs: Sequence[Axes]) -> None:
    """Remove the axes of a grid that received no artist."""
    for ax in axs:
        if not ax.has_data():
            ax.remove()
