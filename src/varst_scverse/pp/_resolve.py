"""Accept AnnData or SpatialData everywhere, and find each section's H&E image.

Every ``varst.pp`` function calls :func:`resolve_adata` first, so users can pass either the AnnData they already have
(legacy ST / Visium as read by :mod:`varst_scverse.datasets`, scanpy or squidpy) or a
:class:`spatialdata.SpatialData` object; in the latter case the function works on (and writes into) the SpatialData's
table.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import ADATA_KEYS, SPATIAL_UNS_KEYS

# Keys inside ``uns["spatial"][library_id]`` (the squidpy / scanpy Visium layout) and our additions to it.
_IMAGES = SPATIAL_UNS_KEYS.IMAGES
_SCALEFACTORS = SPATIAL_UNS_KEYS.SCALEFACTORS
_METADATA = SPATIAL_UNS_KEYS.METADATA
_HIRES = SPATIAL_UNS_KEYS.HIRES
_LOWRES = SPATIAL_UNS_KEYS.LOWRES
_SCALEF_HIRES = SPATIAL_UNS_KEYS.SCALEF_HIRES
_SCALEF_LOWRES = SPATIAL_UNS_KEYS.SCALEF_LOWRES
_SPOT_DIAMETER = SPATIAL_UNS_KEYS.SPOT_DIAMETER
#: micrometres per full-resolution pixel (our addition to the Visium scalefactors)
_PIXEL_SIZE = SPATIAL_UNS_KEYS.PIXEL_SIZE
#: path of the full-resolution H&E (ours; scanpy's ``read_visium(source_image_path=...)`` writes the second one)
_IMAGE_PATH = SPATIAL_UNS_KEYS.IMAGE_PATH
_SOURCE_IMAGE_PATH = SPATIAL_UNS_KEYS.SOURCE_IMAGE_PATH
#: name of the SpatialData image element a table's library was matched to (ours)
_SDATA_IMAGE = SPATIAL_UNS_KEYS.SDATA_IMAGE
#: shape ``(height, width)`` of the full-resolution image (ours)
_FULLRES_SHAPE = SPATIAL_UNS_KEYS.FULLRES_SHAPE

#: largest side of the in-memory ``hires`` image kept in ``uns`` (the full-resolution image stays on disk)
HIRES_MAX_SIDE = 2000


def _is_spatialdata(obj: Any) -> bool:
    return type(obj).__name__ == "SpatialData" and type(obj).__module__.startswith("spatialdata")


def _uns_spatial(adata: AnnData) -> dict:
    spatial = adata.uns.get(ADATA_KEYS.UNS_SPATIAL, {})
    return spatial if isinstance(spatial, Mapping) else {}


def resolve_adata(data: AnnData | Any, table_key: str = "table") -> AnnData:
    """Return the AnnData behind ``data``.

    Parameters
    ----------
    data
        An :class:`~anndata.AnnData` (returned unchanged) or a :class:`spatialdata.SpatialData`.
    table_key
        Name of the table to use when ``data`` is a SpatialData holding several tables; with a single table that one
        is used whatever its name.

    Returns
    -------
    The AnnData itself, or the SpatialData's table **object** (not a copy), so that results written to it land in the
    SpatialData. For a SpatialData the table is completed in place where needed:

    - ``obsm["spatial"]`` is derived from the centroids of the shapes the table annotates when missing
      (in the shapes' intrinsic coordinates);
    - when ``uns["spatial"]`` has no image for a region but the SpatialData holds an image in a coordinate system
      shared with the region's shapes, an entry ``uns["spatial"][region]`` is added with a ``hires`` copy of that
      image (at most ``2000`` px a side) and its scale factor, and ``metadata["spatialdata_image"]`` naming the
      element, so that patches can be cut from it (at full resolution when the SpatialData itself is passed to
      :func:`varst_scverse.pp.extract_patches`) and squidpy can draw it.
    """
    if isinstance(data, AnnData):
        return data
    if not _is_spatialdata(data):
        raise TypeError(f"Expected an AnnData or a SpatialData, got {type(data).__name__}.")
    tables = data.tables
    if len(tables) == 0:
        raise ValueError("The SpatialData has no table; add the spot × gene table (TableModel) first.")
    if table_key in tables:
        table = tables[table_key]
    elif len(tables) == 1:
        table = next(iter(tables.values()))
    else:
        raise KeyError(f"No table {table_key!r} in the SpatialData; its tables are {list(tables)}. Pass table_key=.")
    _complete_from_sdata(data, table)
    return table


# --------------------------------------------------------------------------------------------------------------------
# SpatialData helpers
# --------------------------------------------------------------------------------------------------------------------
def _table_regions(sdata: Any, table: AnnData) -> tuple[list[str], str | None, str | None]:
    try:
        from spatialdata.models import get_table_keys

        region, region_key, instance_key = get_table_keys(table)
    except Exception:  # noqa: BLE001 - a plain AnnData inside a SpatialData without region annotation
        return [], None, None
    regions = [region] if isinstance(region, str) else list(region)
    return [r for r in regions if r in sdata.shapes], region_key, instance_key


def _affine(element: Any) -> dict[str, np.ndarray]:
    """3×3 matrices mapping the element's intrinsic (x, y) to each of its coordinate systems."""
    from spatialdata.transformations import get_transformation

    out = {}
    for cs, t in get_transformation(element, get_all=True).items():
        out[cs] = np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)
    return out


def _image_array(element: Any) -> Any:
    """Return the full-resolution (``scale0``) DataArray of an image element, multiscale or not."""
    if hasattr(element, "children") and "scale0" in getattr(element, "children", {}):
        node = element["scale0"]
        return next(iter(node.ds.data_vars.values()))
    return element


def _image_for_shapes(sdata: Any, shapes_name: str, image_name: str | None = None) -> tuple[str, np.ndarray] | None:
    """Find an image sharing a coordinate system with ``shapes_name``; return it and the shapes→image-pixel affine."""
    shapes_t = _affine(sdata.shapes[shapes_name])
    names = [image_name] if image_name is not None else list(sdata.images)
    for name in names:
        if name not in sdata.images:
            continue
        img_t = _affine(_image_array(sdata.images[name]))
        common = [cs for cs in shapes_t if cs in img_t]
        if not common:
            continue
        cs = "global" if "global" in common else common[0]
        return name, np.linalg.inv(img_t[cs]) @ shapes_t[cs]
    return None


def _library_of_regions(table: AnnData, regions: list[str], region_key: str, library_key: str | None) -> dict[str, str]:
    """Library id of each region: the region's single ``obs[library_key]`` value, else the region name."""
    out = {}
    region_of = table.obs[region_key].astype(str).to_numpy()
    for name in regions:
        lib = name
        if library_key is not None and library_key in table.obs:
            values = pd.unique(table.obs[library_key].astype(str).to_numpy()[region_of == name])
            if len(values) == 1:
                lib = str(values[0])
        out[name] = lib
    return out


def _complete_from_sdata(sdata: Any, table: AnnData, library_key: str | None = ADATA_KEYS.SECTION) -> None:
    regions, region_key, instance_key = _table_regions(sdata, table)
    if not regions:
        if ADATA_KEYS.SPATIAL not in table.obsm:
            warnings.warn(
                "The SpatialData table annotates no shapes element and has no obsm['spatial']; spot positions are "
                "unknown.",
                stacklevel=3,
            )
        return
    region_of = table.obs[region_key].astype(str).to_numpy()
    if ADATA_KEYS.SPATIAL not in table.obsm:
        coords = np.full((table.n_obs, 2), np.nan)
        for name in regions:
            rows = np.flatnonzero(region_of == name)
            gdf = sdata.shapes[name]
            geom = gdf.geometry
            cent = geom if (geom.geom_type == "Point").all() else geom.centroid
            xy = pd.DataFrame({"x": cent.x.to_numpy(), "y": cent.y.to_numpy()}, index=gdf.index)
            ids = table.obs[instance_key].to_numpy()[rows]
            try:
                coords[rows] = xy.loc[ids].to_numpy()
            except KeyError as err:
                raise KeyError(f"Table instances missing from shapes element {name!r}: {err}") from None
        table.obsm[ADATA_KEYS.SPATIAL] = coords
    spatial = dict(_uns_spatial(table))
    changed = False
    for name, lib in _library_of_regions(table, regions, region_key, library_key).items():
        entry = dict(spatial.get(lib, {}))
        images = dict(entry.get(_IMAGES, {}) or {})
        scalefactors = dict(entry.get(_SCALEFACTORS, {}) or {})
        metadata = dict(entry.get(_METADATA, {}) or {})
        gdf = sdata.shapes[name]
        if _SPOT_DIAMETER not in scalefactors and "radius" in gdf.columns and len(gdf):
            scalefactors[_SPOT_DIAMETER] = float(2 * np.median(gdf["radius"].to_numpy()))
            changed = True
        if images:
            if changed:
                spatial[lib] = {**entry, _SCALEFACTORS: scalefactors}
            continue
        found = _image_for_shapes(sdata, name, metadata.get(_SDATA_IMAGE))
        if found is None:
            if changed:
                spatial[lib] = {**entry, _IMAGES: images, _SCALEFACTORS: scalefactors, _METADATA: metadata}
            continue
        img_name, aff = found
        metadata[_SDATA_IMAGE] = img_name
        lin, shift = aff[:2, :2], aff[:2, 2]
        s = float(np.sqrt(abs(np.linalg.det(lin))))
        if np.allclose(lin, np.eye(2) * s, rtol=1e-6, atol=1e-9) and np.allclose(shift, 0, atol=1e-6):
            arr = _image_array(sdata.images[img_name])
            hires, f = _downsample_max_side(_to_uint8_rgb(np.asarray(arr.transpose("y", "x", "c"))), HIRES_MAX_SIDE)
            images[_HIRES] = hires
            scalefactors[_SCALEF_HIRES] = s * f
        else:
            warnings.warn(
                f"Image {img_name!r} is not a pure scaling of region {name!r}'s coordinates; it is used for patches "
                "only when the SpatialData itself is passed.",
                stacklevel=3,
            )
        spatial[lib] = {**entry, _IMAGES: images, _SCALEFACTORS: scalefactors, _METADATA: metadata}
        changed = True
    if changed:
        table.uns[ADATA_KEYS.UNS_SPATIAL] = spatial


# --------------------------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------------------------
def _to_uint8_rgb(arr: np.ndarray) -> np.ndarray:
    """Convert an image (H, W[, C]) of any dtype to uint8 RGB (H, W, 3)."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"Expected an image of shape (height, width[, channels]), got {arr.shape}.")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[..., :3]
    elif arr.shape[2] != 3:
        raise ValueError(f"Expected 1, 3 or 4 channels, got {arr.shape[2]}.")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        top = 1.0 if np.nanmax(arr) <= 1.0 else 255.0
        return np.clip(np.nan_to_num(arr) * (255.0 / top), 0, 255).round().astype(np.uint8)
    if arr.dtype == np.uint16:
        return (arr // 257).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _downsample_max_side(img: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Shrink ``img`` so its longer side is at most ``max_side``; return it and the scale factor applied."""
    from PIL import Image

    h, w = img.shape[:2]
    f = min(1.0, max_side / max(h, w))
    if f >= 1.0:
        return img, 1.0
    size = (max(1, round(w * f)), max(1, round(h * f)))
    out = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BOX))
    return out, size[0] / w


def _open_image(path: str | Path):
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # legacy-ST / Visium full-resolution slides are far above PIL's default limit
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    return Image.open(path)


def read_image(path: str | Path, max_side: int | None = None, min_scale: float = 1.0) -> tuple[np.ndarray, float]:
    """Read an RGB image, optionally reduced while decoding.

    Parameters
    ----------
    path
        Image file (anything Pillow reads; JPEGs are decoded at reduced size directly when allowed).
    max_side
        Shrink so that the longer side is at most this many pixels.
    min_scale
        Do not reduce below this scale (fraction of full resolution) when decoding; used by patch extraction to keep
        at least the output resolution.

    Returns
    -------
    ``(image, scale)``: a uint8 array (H, W, 3) and its width relative to the full-resolution width.
    """
    from PIL import Image

    with _open_image(path) as im:
        full_w, full_h = im.size
        target = min_scale
        if max_side is not None:
            target = min(1.0, max_side / max(full_w, full_h))
        if target < 1.0:
            # JPEG DCT scaling (1/2, 1/4, 1/8) never goes below the requested size
            im.draft("RGB", (max(1, int(np.ceil(full_w * target))), max(1, int(np.ceil(full_h * target)))))
        im = im.convert("RGB")
        if max_side is not None and max(im.size) > max_side:
            f = max_side / max(im.size)
            im = im.resize((max(1, round(im.size[0] * f)), max(1, round(im.size[1] * f))), Image.Resampling.BOX)
        arr = np.asarray(im)
    return arr, arr.shape[1] / full_w


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image file, without decoding it."""
    with _open_image(path) as im:
        w, h = im.size
    return h, w


@dataclass
class _ImageSource:
    """Where one library's pixels come from, and how spot coordinates map onto them."""

    library: str
    kind: str  # "file" | "array" | "sdata"
    description: str
    #: 3×3 affine mapping obsm["spatial"] (x, y, 1) to pixel (column, row, 1) of the *full* source image
    affine: np.ndarray
    path: Path | None = None
    array: Any = None
    meta: dict = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """Image pixels per spatial unit."""
        return float(np.sqrt(abs(np.linalg.det(self.affine[:2, :2]))))

    def load(self, min_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Return the image (uint8 H×W×3) and the affine from spatial coordinates to its pixels.

        ``min_scale`` (≤ 1) allows a reduced decode of files when the patches are downsampled anyway.
        """
        if self.kind == "file":
            arr, f = read_image(self.path, min_scale=min(1.0, max(min_scale, 1e-3)))
            return arr, np.diag([f, f, 1.0]) @ self.affine
        if self.kind == "sdata":
            arr = _to_uint8_rgb(np.asarray(self.array.transpose("y", "x", "c")))
            return arr, self.affine
        return _to_uint8_rgb(self.array), self.affine


def spot_libraries(adata: AnnData, library_key: str | None = ADATA_KEYS.SECTION) -> np.ndarray:
    """Library (section) id of every spot as strings.

    Uses ``obs[library_key]``; without that column, the single library of ``uns["spatial"]``, or the SpatialData
    region column; else every spot gets the library ``""``.
    """
    if library_key is not None and library_key in adata.obs:
        return adata.obs[library_key].astype(str).to_numpy()
    libs = list(_uns_spatial(adata))
    attrs = adata.uns.get("spatialdata_attrs", {})
    region_key = attrs.get("region_key") if isinstance(attrs, Mapping) else None
    if region_key is not None and region_key in adata.obs:
        return adata.obs[region_key].astype(str).to_numpy()
    if len(libs) == 1:
        return np.full(adata.n_obs, str(libs[0]), dtype=object)
    if len(libs) > 1:
        raise KeyError(
            f"obs has no column {library_key!r} telling which of the libraries {libs} of uns['spatial'] each spot "
            "belongs to; pass library_key=."
        )
    return np.full(adata.n_obs, "", dtype=object)


def pixel_size(adata: AnnData, library: str, pixel_size_um: float | Mapping[str, float] | None) -> float:
    """Micrometres per unit of ``obsm["spatial"]`` for ``library``: argument, else the stored scale factor."""
    if isinstance(pixel_size_um, Mapping):
        if library in pixel_size_um:
            return float(pixel_size_um[library])
    elif pixel_size_um is not None:
        return float(pixel_size_um)
    value = _uns_spatial(adata).get(library, {}).get(_SCALEFACTORS, {}).get(_PIXEL_SIZE)
    if value is None or not np.isfinite(value) or value <= 0:
        raise ValueError(
            f"Pixel size of library {library!r} unknown: pass pixel_size_um= (µm per unit of obsm['spatial']), or "
            f"store it in uns['spatial'][{library!r}]['scalefactors'][{_PIXEL_SIZE!r}]."
        )
    return float(value)


def image_sources(
    data: Any,
    adata: AnnData,
    libraries: list[str],
    image: str | Path | np.ndarray | Mapping[str, Any] | None = None,
    library_key: str | None = ADATA_KEYS.SECTION,
) -> dict[str, _ImageSource]:
    """Locate each library's image; libraries without one are absent from the result.

    The ``image`` argument wins (full-resolution pixels in the frame of ``obsm["spatial"]``: a path or an array, or a
    mapping ``{library: path | array}``). Otherwise the source with the highest resolution among the full-resolution
    file named in ``uns["spatial"][lib]["metadata"]`` (``image_path`` or scanpy's ``source_image_path``), the
    SpatialData image element (when ``data`` is a SpatialData) and the in-memory ``uns["spatial"][lib]["images"]``.
    """
    spatial = _uns_spatial(adata)
    lib_region: dict[str, str] = {}
    if _is_spatialdata(data):
        regions, region_key, _ = _table_regions(data, adata)
        if regions:
            lib_region = {lib: r for r, lib in _library_of_regions(adata, regions, region_key, library_key).items()}
    out: dict[str, _ImageSource] = {}
    for lib in libraries:
        explicit = None
        if isinstance(image, Mapping):
            explicit = image.get(lib)
        elif image is not None:
            if len(libraries) > 1:
                raise ValueError(
                    f"image= was given once but the data hold {len(libraries)} libraries; pass a mapping "
                    "{library_id: image}."
                )
            explicit = image
        if explicit is not None:
            if isinstance(explicit, (str, Path)):
                if not Path(explicit).is_file():
                    raise FileNotFoundError(f"Image file for library {lib!r} not found: {explicit}")
                out[lib] = _ImageSource(lib, "file", f"file {explicit}", np.eye(3), path=Path(explicit))
            else:
                out[lib] = _ImageSource(lib, "array", "array passed as image=", np.eye(3), array=np.asarray(explicit))
            continue
        entry = spatial.get(lib, {})
        entry = entry if isinstance(entry, Mapping) else {}
        metadata = entry.get(_METADATA, {}) or {}
        candidates: list[_ImageSource] = []
        path = next((metadata.get(k) for k in (_IMAGE_PATH, _SOURCE_IMAGE_PATH) if metadata.get(k)), None)
        if path is not None and Path(path).is_file():
            candidates.append(_ImageSource(lib, "file", f"file {path}", np.eye(3), path=Path(path)))
        if lib in lib_region:
            found = _image_for_shapes(data, lib_region[lib], metadata.get(_SDATA_IMAGE))
            if found is not None:
                name, aff = found
                arr = _image_array(data.images[name])
                candidates.append(_ImageSource(lib, "sdata", f"SpatialData image {name!r}", aff, array=arr))
        images = entry.get(_IMAGES, {}) or {}
        scalefactors = entry.get(_SCALEFACTORS, {}) or {}
        for key, scalef_key in ((_HIRES, _SCALEF_HIRES), (_LOWRES, _SCALEF_LOWRES)):
            if key in images and scalef_key in scalefactors:
                s = float(scalefactors[scalef_key])
                desc = f"in-memory uns image {key!r} (scale {s:.3g})"
                candidates.append(_ImageSource(lib, "array", desc, np.diag([s, s, 1.0]), array=images[key]))
        if not candidates:
            continue
        best = max(candidates, key=lambda c: c.scale)  # first of equals wins: file, SpatialData, in-memory
        if path is not None and best.kind != "file":
            warnings.warn(
                f"Full-resolution image of library {lib!r} not found at {path}; cutting patches from the "
                f"{best.description} instead.",
                stacklevel=3,
            )
        out[lib] = best
    return out


def describe(fn: Callable | Any) -> str:
    """Return a short name for an encoder object."""
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return str(name)
