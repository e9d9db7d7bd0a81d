"""Convert the readers' AnnData into a :class:`spatialdata.SpatialData`."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import ADATA_KEYS
from ..pp._resolve import (
    _HIRES,
    _IMAGES,
    _METADATA,
    _SCALEF_HIRES,
    _SCALEFACTORS,
    _SDATA_IMAGE,
    _SPOT_DIAMETER,
    _uns_spatial,
    image_sources,
    spot_libraries,
)

#: obs columns of the SpatialData table linking each row to its spot circle
REGION_KEY = ADATA_KEYS.REGION
INSTANCE_KEY = ADATA_KEYS.INSTANCE


def to_spatialdata(
    adata: AnnData,
    library_key: str = ADATA_KEYS.SECTION,
    image_resolution: Literal["hires", "fullres", "none"] = "hires",
):
    """Wrap an AnnData of spots (e.g. from :func:`read_st_legacy` / :func:`her2st`) as a SpatialData.

    Every section (library) gets its own coordinate system (named after it, in full-resolution pixels), a
    ``ShapesModel`` of spot circles ``"{library}_spots"`` and, when an image is known, an ``Image2DModel``
    ``"{library}_image"``. The table is a copy of ``adata`` annotating the circles (``obs["region"]``,
    ``obs["spot_id"]``).

    Parameters
    ----------
    adata
        Spots with ``obsm["spatial"]`` and, for images and spot sizes, ``uns["spatial"]``.
    library_key
        obs column naming each spot's section (not needed with a single library).
    image_resolution
        ``"hires"``: the in-memory ``uns`` image, scaled into the full-resolution frame (small);
        ``"fullres"``: the full-resolution file (``metadata["image_path"]``), read into memory (≈ 280 MB per HER2ST
        section); ``"none"``: no images.

    Returns
    -------
    :class:`spatialdata.SpatialData` with images, shapes and ``tables["table"]``.
    """
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    if ADATA_KEYS.SPATIAL not in adata.obsm:
        raise KeyError(f"adata.obsm[{ADATA_KEYS.SPATIAL!r}] (spot centres) is required.")
    if image_resolution not in ("hires", "fullres", "none"):
        raise ValueError(f"image_resolution must be 'hires', 'fullres' or 'none', got {image_resolution!r}.")
    libs = spot_libraries(adata, library_key)
    order = list(dict.fromkeys(libs.tolist()))
    spatial = _uns_spatial(adata)
    coords = np.asarray(adata.obsm[ADATA_KEYS.SPATIAL], dtype=float)[:, :2]

    table = adata.copy()
    uns_spatial = {k: dict(v) for k, v in spatial.items()} if spatial else {}
    regions = np.empty(adata.n_obs, dtype=object)
    instance = np.zeros(adata.n_obs, dtype=np.int64)
    shapes, images = {}, {}
    for lib in order:
        cs = lib if lib else "global"
        rows = np.flatnonzero(libs == lib)
        region = f"{lib}_spots" if lib else "spots"
        regions[rows] = region
        instance[rows] = np.arange(len(rows))
        diameter = spatial.get(lib, {}).get(_SCALEFACTORS, {}).get(_SPOT_DIAMETER)
        if diameter is None:  # no size known: half the median nearest-neighbour distance
            from scipy.spatial import cKDTree

            pts = coords[rows]
            d = cKDTree(pts).query(pts, k=2)[0][:, 1] if len(pts) > 1 else np.ones(1)
            diameter = float(np.median(d) / 2)
        shapes[region] = ShapesModel.parse(
            coords[rows],
            geometry=0,
            radius=np.full(len(rows), float(diameter) / 2),
            index=pd.RangeIndex(len(rows)),
            transformations={cs: Identity()},
        )
        if image_resolution == "none":
            continue
        entry = spatial.get(lib, {})
        hires = (entry.get(_IMAGES, {}) or {}).get(_HIRES)
        scalef = (entry.get(_SCALEFACTORS, {}) or {}).get(_SCALEF_HIRES)
        if image_resolution == "hires" and hires is not None and scalef is not None:
            arr, aff = np.asarray(hires), np.diag([float(scalef), float(scalef), 1.0])
        else:
            src = image_sources(None, adata, [lib]).get(lib)
            if src is None:
                continue
            arr, aff = src.load()
        s = float(aff[0, 0])
        name = f"{lib}_image" if lib else "image"
        transform = Identity() if np.isclose(s, 1.0) else Scale([1 / s, 1 / s], axes=("x", "y"))
        images[name] = Image2DModel.parse(
            np.moveaxis(np.asarray(arr), -1, 0), dims=("c", "y", "x"), transformations={cs: transform}
        )
        if lib in uns_spatial:
            uns_spatial[lib][_METADATA] = {**dict(uns_spatial[lib].get(_METADATA, {})), _SDATA_IMAGE: name}
    if uns_spatial:
        table.uns[ADATA_KEYS.UNS_SPATIAL] = uns_spatial
    table.obs[REGION_KEY] = pd.Categorical(regions, categories=[r for r in dict.fromkeys(regions.tolist())])
    table.obs[INSTANCE_KEY] = instance
    table = TableModel.parse(table, region=list(shapes), region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    return SpatialData(images=images, shapes=shapes, tables={"table": table})
