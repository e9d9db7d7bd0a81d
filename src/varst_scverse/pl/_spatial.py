"""Spatial maps on the tissue: observed vs predicted vs uncertainty per gene, and stage-1 token maps.

Drawn with :func:`squidpy.pl.spatial_scatter` on the H&E when the AnnData carries an image, else as a plain scatter.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._constants import ADATA_KEYS, SPATIAL_UNS_KEYS
from .._targets import TargetKind, expression_target
from ._utils import finish, panel_grid

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

#: Width × height (inches) of one map panel.
PANEL_SIZE = (4.2, 3.6)
#: Default scales of the stage-1 tokens; ``None`` is the finest scale, one token per gene.
DEFAULT_SCALES: tuple[int | None, ...] = (1, 8, 32, None)
#: Scale-factor key of the spot diameter in full-resolution pixels (squidpy / Space Ranger convention).
_SIZE_KEY = SPATIAL_UNS_KEYS.SPOT_DIAMETER


# --------------------------------------------------------------------------------------------------------- helpers
def _preview(items: Sequence[Any], n: int = 8) -> str:
    items = [str(i) for i in items]
    return str(items[:n])[:-1] + (", ...]" if len(items) > n else "]")


def _resolve_library(adata: AnnData, library_id: str | None, library_key: str | None) -> tuple[str | None, np.ndarray]:
    """Return the library to draw and the boolean mask of its spots.

    With ``obs[library_key]`` present, the library is one of its values (the only one when ``library_id`` is None);
    otherwise every spot belongs to the library, which must then be a key of ``uns["spatial"]`` if given.
    """
    uns = adata.uns.get(ADATA_KEYS.UNS_SPATIAL, {})
    uns_libs = [str(k) for k in uns] if isinstance(uns, Mapping) else []
    if library_key is not None and library_key in adata.obs:
        sections = adata.obs[library_key].astype(str).to_numpy()
        present = list(pd.unique(sections))
        if library_id is None:
            if len(present) != 1:
                raise ValueError(
                    f"The AnnData holds {len(present)} sections in obs[{library_key!r}] {_preview(present)}; "
                    "pass library_id= one of them."
                )
            library_id = present[0]
        library_id = str(library_id)
        if library_id not in present:
            raise ValueError(f"Unknown library_id {library_id!r}: obs[{library_key!r}] holds {_preview(present)}.")
        return library_id, sections == library_id
    if library_id is None:
        library_id = uns_libs[0] if len(uns_libs) == 1 else None
    elif str(library_id) not in uns_libs:
        raise ValueError(
            f"Unknown library_id {library_id!r}: there is no obs[{library_key!r}] and "
            f"uns[{ADATA_KEYS.UNS_SPATIAL!r}] holds {_preview(uns_libs)}."
        )
    return (None if library_id is None else str(library_id)), np.ones(adata.n_obs, dtype=bool)


def _spot_diameter(coords: np.ndarray) -> float:
    """Estimate the spot diameter (coordinate units) as 0.55 × the median nearest-neighbour distance."""
    from scipy.spatial import cKDTree

    if len(coords) < 2:
        return 1.0
    dist, _ = cKDTree(coords).query(coords, k=2)
    d = float(np.median(dist[:, 1]))
    return 0.55 * d if d > 0 else 1.0


def _image_entry(adata: AnnData, library_id: str | None, coords: np.ndarray) -> dict | None:
    """Copy of ``uns["spatial"][library_id]`` ready for squidpy when it holds an image, else None.

    A missing ``spot_diameter_fullres`` is estimated from the spot spacing; an image without the scale factor
    that maps coordinates onto it cannot be placed, so the map falls back to a plain scatter (with a warning).
    """
    if library_id is None:
        return None
    uns = adata.uns.get(ADATA_KEYS.UNS_SPATIAL, {})
    entry = uns.get(library_id) if isinstance(uns, Mapping) else None
    if not isinstance(entry, Mapping):
        return None
    images = entry.get(SPATIAL_UNS_KEYS.IMAGES)
    if not isinstance(images, Mapping) or not any(np.ndim(v) >= 2 for v in images.values()):
        return None
    res = "hires" if "hires" in images else next(iter(images))
    scalefactors = dict(entry.get(SPATIAL_UNS_KEYS.SCALEFACTORS) or {})
    if not any(res in k for k in scalefactors):
        warnings.warn(
            f"uns[{ADATA_KEYS.UNS_SPATIAL!r}][{library_id!r}] has a {res!r} image but no 'tissue_{res}_scalef' "
            "scale factor; drawing without the image.",
            UserWarning,
            stacklevel=3,
        )
        return None
    scalefactors.setdefault(_SIZE_KEY, _spot_diameter(coords))
    return {**entry, SPATIAL_UNS_KEYS.SCALEFACTORS: scalefactors}


def _coords(adata: AnnData, rows: np.ndarray) -> np.ndarray:
    if ADATA_KEYS.SPATIAL not in adata.obsm:
        raise KeyError(f"adata.obsm[{ADATA_KEYS.SPATIAL!r}] (spot coordinates) is missing.")
    xy = np.asarray(adata.obsm[ADATA_KEYS.SPATIAL], dtype=np.float64)[rows]
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ValueError(f"adata.obsm[{ADATA_KEYS.SPATIAL!r}] must be [n_spots, 2]; got shape {xy.shape}.")
    return xy[:, :2]


def _dense_rows(x, rows: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
    x = x[rows] if cols is None else x[rows][:, cols]
    return np.asarray(x.toarray() if sparse.issparse(x) else x, dtype=np.float64)


def _obsm_table(adata: AnnData, key: str) -> pd.DataFrame | None:
    """``obsm[key]`` when it is a gene-named table (predictions for genes that differ from the AnnData's)."""
    block = adata.obsm[key] if key in adata.obsm else None
    return block if isinstance(block, pd.DataFrame) else None


def _prediction_block(adata: AnnData, key: str, genes: list[str], rows: np.ndarray) -> np.ndarray | None:
    """``[n_rows, n_genes]`` from ``layers[key]``, or from ``obsm[key]`` (a gene-named DataFrame); None if absent."""
    if key in adata.layers:
        return _dense_rows(adata.layers[key], rows, adata.var_names.get_indexer(genes))
    block = _obsm_table(adata, key)
    return None if block is None else block.loc[:, genes].to_numpy(dtype=np.float64)[rows]


def _valid_genes(adata: AnnData, genes: str | Sequence[str]) -> list[str]:
    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    if not genes:
        raise ValueError("genes is empty.")
    known = set(adata.var_names)
    block = _obsm_table(adata, ADATA_KEYS.PREDICTED)
    if ADATA_KEYS.PREDICTED not in adata.layers and block is not None:
        known = set(map(str, block.columns))
    unknown = [g for g in genes if g not in known]
    if unknown:
        raise ValueError(
            f"Unknown genes {_preview(unknown)}: not in adata.var_names (e.g. {_preview(sorted(known), 5)})."
        )
    return genes


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def _norm(*blocks: np.ndarray, vmin: float | None = None) -> Normalize:
    from matplotlib.colors import Normalize

    vals = np.concatenate([np.ravel(b) for b in blocks])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return Normalize()
    lo = float(vals.min()) if vmin is None else float(vmin)
    return Normalize(vmin=lo, vmax=max(float(vals.max()), lo))


def _default_size(n_spots: int) -> float:
    """Marker area (points²) that roughly tiles a ~4 inch panel with ``n_spots`` spots."""
    return float(np.clip(40000.0 / max(n_spots, 1), 2.0, 200.0))


def _img_res_key(entry: Mapping) -> str:
    images = entry[SPATIAL_UNS_KEYS.IMAGES]
    return "hires" if "hires" in images else next(iter(images))


@contextmanager
def _quiet_squidpy() -> Iterator[None]:
    """Silence squidpy's internal use of the deprecated ``Colormap.set_bad`` (not the caller's to fix)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*set_bad.*", category=PendingDeprecationWarning)
        yield


class _Panels:
    """Draws one panel per call, on the H&E with squidpy when there is an image, else as a plain scatter."""

    def __init__(
        self, fig: Figure, coords: np.ndarray, library_id: str | None, image: dict | None, size: float | None, kwargs
    ):
        self.fig, self.coords, self.library_id, self.image = fig, coords, library_id, image
        self.size, self.kwargs = size, dict(kwargs)
        self._n = 0

    def _squidpy_adata(self, values: pd.Series, colors: list[str] | None) -> tuple[AnnData, str]:
        col = f"_varst_panel_{self._n}"
        self._n += 1
        pdata = AnnData(obs=pd.DataFrame({col: values.to_numpy()}, index=[str(i) for i in range(len(values))]))
        pdata.obsm[ADATA_KEYS.SPATIAL] = self.coords
        pdata.uns[ADATA_KEYS.UNS_SPATIAL] = {self.library_id: self.image}
        if colors is not None:
            pdata.uns[f"{col}_colors"] = colors
        return pdata, col

    def continuous(self, ax: Axes, values: np.ndarray, norm: Normalize, cmap: str, title: str) -> None:
        if self.image is not None:
            import squidpy as sq

            pdata, col = self._squidpy_adata(pd.Series(np.asarray(values, dtype=np.float64)), None)
            kw = {"img_res_key": _img_res_key(self.image), **self.kwargs}
            with _quiet_squidpy():
                sq.pl.spatial_scatter(
                    pdata,
                    color=col,
                    library_id=self.library_id,
                    img=True,
                    size=self.size,
                    cmap=cmap,
                    norm=norm,
                    title=title,
                    ax=ax,
                    fig=self.fig,
                    na_color="lightgray",
                    **kw,
                )
            return
        import matplotlib.pyplot as plt

        cm = plt.get_cmap(cmap).with_extremes(bad="lightgray")
        size = _default_size(len(values)) if self.size is None else self.size
        sc = ax.scatter(
            self.coords[:, 0],
            self.coords[:, 1],
            c=values,
            cmap=cm,
            norm=norm,
            s=size,
            linewidths=0,
            plotnonfinite=True,
            **self.kwargs,
        )
        self.fig.colorbar(sc, ax=ax, fraction=0.08, pad=0.01, aspect=30)
        self._frame(ax, title)

    def categorical(self, ax: Axes, values: pd.Categorical, colors: list[str], title: str, legend: bool) -> None:
        if self.image is not None:
            import squidpy as sq

            pdata, col = self._squidpy_adata(pd.Series(values), colors)
            kw = {"img_res_key": _img_res_key(self.image), "legend_loc": "right margin" if legend else None}
            with _quiet_squidpy():
                sq.pl.spatial_scatter(
                    pdata,
                    color=col,
                    library_id=self.library_id,
                    img=True,
                    size=self.size,
                    title=title,
                    ax=ax,
                    fig=self.fig,
                    **{**kw, **self.kwargs},
                )
            return
        size = _default_size(len(values)) if self.size is None else self.size
        point_colors = np.asarray(colors, dtype=object)[np.asarray(values.codes)]
        ax.scatter(self.coords[:, 0], self.coords[:, 1], c=list(point_colors), s=size, linewidths=0, **self.kwargs)
        if legend:
            from matplotlib.lines import Line2D

            handles = [
                Line2D([], [], marker="o", linestyle="", color=c, label=str(cat))
                for cat, c in zip(values.categories, colors)
            ]
            ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize="small")
        self._frame(ax, title)

    @staticmethod
    def _frame(ax: Axes, title: str) -> None:
        ax.set_aspect("equal")
        if not ax.yaxis_inverted():
            ax.invert_yaxis()  # image convention: y grows downwards, as squidpy draws it
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title)


# ------------------------------------------------------------------------------------------------------ public API
def spatial_prediction(
    adata: AnnData,
    genes: str | Sequence[str],
    library_id: str | None = None,
    library_key: str | None = ADATA_KEYS.SECTION,
    layer_observed: str | None = ADATA_KEYS.COUNTS_LAYER,
    target: TargetKind = "log1p",
    img: bool = True,
    size: float | None = None,
    cmap: str = "viridis",
    pearson: bool = True,
    save: str | Path | None = None,
    return_fig: bool = False,
    **kwargs: Any,
) -> Figure | None:
    """Observed, predicted and uncertainty maps of some genes on the tissue, one row per gene.

    The observed panel shows the counts on the model's target scale (:func:`~varst_scverse._targets.expression_target`);
    observed and predicted panels of a gene share one colour scale so the eye compares them fairly; the uncertainty
    panel (the predictive standard deviation) has its own scale starting at 0.

    Parameters
    ----------
    adata
        AnnData after :meth:`varst_scverse.VARST.predict_expression`: ``layers["varst_predicted"]`` and
        ``layers["varst_uncertainty"]`` (or the gene-named ``obsm`` tables written when the genes differ from the
        model's), ``obsm["spatial"]``, optionally counts in ``layers[layer_observed]`` and an image in
        ``uns["spatial"][library_id]``.
    genes
        Gene name(s), one row each.
    library_id
        Section to draw. Needed when ``obs[library_key]`` holds several sections; its spots are selected and its
        image (``uns["spatial"][library_id]``) drawn.
    library_key
        Column of ``obs`` naming each spot's section.
    layer_observed
        Layer of raw counts for the observed panel. When the layer is absent (an H&E-only query) or None, only the
        predicted and uncertainty panels are drawn.
    target
        Scale of the observed panel, as the model's target: ``"log1p"`` or ``"cp10k"``.
    img
        Draw on the H&E with :func:`squidpy.pl.spatial_scatter` when the library has an image; else (or when
        False) a plain scatter of ``obsm["spatial"]`` (image orientation, y downwards).
    size
        Spot size: a scale factor of the spot diameter on the image (squidpy), marker area in points² otherwise.
        Default: the spot diameter / a size that roughly tiles the panel.
    cmap
        Colour map of all panels.
    pearson
        Show the per-gene Pearson r between observed and predicted in the predicted panel's title.
    save
        Write the figure to this path (PNG by extension, 120 dpi) and close it unless ``return_fig``.
    return_fig
        Return the figure.
    **kwargs
        Passed to :func:`squidpy.pl.spatial_scatter` when drawing on the image, else to
        :meth:`matplotlib.axes.Axes.scatter`.

    Returns
    -------
    The figure if ``return_fig``, else None.

    Examples
    --------
    >>> model.predict_expression(adata)  # doctest: +SKIP
    >>> varst.pl.spatial_prediction(adata, ["ERBB2", "GRB7"], library_id="C2")  # doctest: +SKIP
    """
    if ADATA_KEYS.PREDICTED not in adata.layers and _obsm_table(adata, ADATA_KEYS.PREDICTED) is None:
        raise KeyError(
            f"adata.layers[{ADATA_KEYS.PREDICTED!r}] not found; run `model.predict_expression(adata)` first."
        )
    genes = _valid_genes(adata, genes)
    lib, rows = _resolve_library(adata, library_id, library_key)
    coords = _coords(adata, rows)
    pred = _prediction_block(adata, ADATA_KEYS.PREDICTED, genes, rows)
    unc = _prediction_block(adata, ADATA_KEYS.UNCERTAINTY, genes, rows)
    if unc is None:
        raise KeyError(
            f"adata.layers[{ADATA_KEYS.UNCERTAINTY!r}] not found; run `model.predict_expression(adata)` first."
        )
    obs = None
    if layer_observed is not None and layer_observed in adata.layers and all(g in adata.var_names for g in genes):
        counts = adata.layers[layer_observed]
        total = _dense_rows(counts, rows).sum(axis=1)
        obs = expression_target(
            _dense_rows(counts, rows, adata.var_names.get_indexer(genes)), kind=target, total_counts=total
        ).astype(np.float64)

    columns = (["observed"] if obs is not None else []) + ["predicted", "uncertainty"]
    fig, axs = panel_grid(len(genes), len(columns), PANEL_SIZE)
    image = _image_entry(adata, lib, coords) if img else None
    panels = _Panels(fig, coords, lib, image, size, kwargs)
    where = f" [{lib}]" if lib is not None else ""
    for i, gene in enumerate(genes):
        shared = _norm(pred[:, i], *([obs[:, i]] if obs is not None else []))
        j = 0
        if obs is not None:
            panels.continuous(axs[i, j], obs[:, i], shared, cmap, f"{gene} observed ({target}){where}")
            j += 1
        title = f"{gene} predicted"
        if pearson and obs is not None:
            title += f" (r = {_pearson(obs[:, i], pred[:, i]):.2f})"
        panels.continuous(axs[i, j], pred[:, i], shared, cmap, title)
        panels.continuous(axs[i, j + 1], unc[:, i], _norm(unc[:, i], vmin=0.0), cmap, f"{gene} uncertainty (sd)")
    return finish(fig, save, return_fig)


def _resolve_scales(scales: Sequence[int | None] | None, n_tokens: int) -> tuple[int, ...]:
    scales = tuple(DEFAULT_SCALES if scales is None else scales)
    if sum(s is None for s in scales) > 1:
        raise ValueError(f"At most one scale may be None (the gene-level scale); got {scales}.")
    fixed = sum(int(s) for s in scales if s is not None)
    out = tuple(n_tokens - fixed if s is None else int(s) for s in scales)
    if any(s < 1 for s in out) or sum(out) != n_tokens:
        raise ValueError(
            f"scales {scales} do not add up to the {n_tokens} tokens per spot in obsm[{ADATA_KEYS.TOKENS!r}]; "
            "pass the model's scales (`model.module.scales`)."
        )
    return out


def _token_colors(n: int) -> list[str]:
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    if n <= 20:
        return [to_hex(c) for c in plt.get_cmap("tab20").colors[:n]]
    cols = plt.get_cmap("nipy_spectral")(np.linspace(0.04, 0.96, n))
    perm = np.random.default_rng(0).permutation(n)  # neighbouring code ids get distant colours
    return [to_hex(c) for c in cols[perm]]


def token_map(
    adata: AnnData,
    scale: int = 0,
    position: int | Sequence[int] = 0,
    library_id: str | None = None,
    library_key: str | None = ADATA_KEYS.SECTION,
    scales: Sequence[int | None] | None = None,
    img: bool = True,
    size: float | None = None,
    legend_max: int = 20,
    save: str | Path | None = None,
    return_fig: bool = False,
    **kwargs: Any,
) -> Figure | None:
    """Map of the stage-1 token ids at one scale and position(s), as categories on the tissue.

    Tokens are stored coarse to fine in ``obsm["varst_tokens"]``, so position ``p`` of scale ``k`` is column
    ``sum(scales[:k]) + p``. Spots sharing a code are coloured alike: at scale 0 (one global token) the map shows
    which spots the model summarises alike; finer scales refine gene groups.

    Parameters
    ----------
    adata
        AnnData with ``obsm["varst_tokens"]`` (:meth:`varst_scverse.VARST.get_tokens` or ``predict_expression``) and
        ``obsm["spatial"]``.
    scale
        Index of the scale (0 = coarsest).
    position
        Token position(s) within the scale; one panel each.
    library_id
        Section to draw (needed when ``obs[library_key]`` holds several).
    library_key
        Column of ``obs`` naming each spot's section.
    scales
        Tokens per scale, coarse to fine, e.g. ``model.module.scales``; one entry may be None (the remainder, the
        gene-level scale). Default ``(1, 8, 32, None)``.
    img
        Draw on the H&E (squidpy) when the library has an image.
    size
        Spot size, as in :func:`spatial_prediction`.
    legend_max
        Show a legend only when a panel has at most this many distinct codes.
    save
        Write the figure to this path and close it unless ``return_fig``.
    return_fig
        Return the figure.
    **kwargs
        Passed to :func:`squidpy.pl.spatial_scatter` (image) or :meth:`matplotlib.axes.Axes.scatter`.

    Returns
    -------
    The figure if ``return_fig``, else None.

    Examples
    --------
    >>> varst.pl.token_map(adata, scale=1, position=[0, 1, 2], scales=model.module.scales)  # doctest: +SKIP
    """
    if ADATA_KEYS.TOKENS not in adata.obsm:
        raise KeyError(
            f"adata.obsm[{ADATA_KEYS.TOKENS!r}] not found; run `model.get_tokens(adata)` or "
            "`model.predict_expression(adata)` first."
        )
    tokens = np.asarray(adata.obsm[ADATA_KEYS.TOKENS])
    if tokens.ndim != 2:
        raise ValueError(f"obsm[{ADATA_KEYS.TOKENS!r}] must be [n_spots, n_tokens]; got shape {tokens.shape}.")
    sizes = _resolve_scales(scales, tokens.shape[1])
    if not 0 <= int(scale) < len(sizes):
        raise ValueError(f"scale={scale} is out of range; there are {len(sizes)} scales {sizes}.")
    scale = int(scale)
    positions = [int(position)] if np.isscalar(position) else [int(p) for p in position]
    bad = [p for p in positions if not 0 <= p < sizes[scale]]
    if bad or not positions:
        raise ValueError(f"position {bad or positions} out of range: scale {scale} has {sizes[scale]} tokens.")
    lib, rows = _resolve_library(adata, library_id, library_key)
    coords = _coords(adata, rows)
    offset = sum(sizes[:scale])
    fig, axs = panel_grid(1, len(positions), (PANEL_SIZE[0] + 0.6, PANEL_SIZE[1]))
    panels = _Panels(fig, coords, lib, _image_entry(adata, lib, coords) if img else None, size, kwargs)
    where = f"{lib} " if lib is not None else ""
    for ax, p in zip(axs[0], positions):
        codes = tokens[rows, offset + p].astype(np.int64)
        cats = pd.Categorical(codes.astype(str), categories=[str(c) for c in np.unique(codes)])
        n = len(cats.categories)
        title = f"{where}scale {scale} ({sizes[scale]} tok.), position {p}: {n} codes"
        panels.categorical(ax, cats, _token_colors(n), title, legend=n <= legend_max)
    return finish(fig, save, return_fig)
