"""Shared fixtures: the HER2ST data folder and small synthetic legacy-ST sections written to disk."""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from varst_scverse._constants import DATA_DIR_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]

#: geometry of the synthetic sections: spot (x, y) sits at pixel (PX_PER_STEP·x + OFFSET_X, PX_PER_STEP·y + OFFSET_Y)
PX_PER_STEP = 50.0  # 200 µm spot spacing → 4 µm per pixel
PIXEL_SIZE_UM = 200.0 / PX_PER_STEP
OFFSET_X, OFFSET_Y = 20.0, 30.0
GRID_X, GRID_Y = range(1, 9), range(1, 7)
PINK = (230, 180, 200)
PURPLE = (100, 60, 150)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _data_root() -> Path:
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        root = Path(env).expanduser()
        return root if root.is_absolute() else (REPO_ROOT / root)
    return REPO_ROOT.parent / "shared" / "data"


def _missing_reason(root: Path) -> str | None:
    her2st = root / "her2st"
    needed = [her2st / "ST-cnts" / "C2.tsv.gz", her2st / "ST-spotfiles" / "C2_selection.tsv", her2st / "ST-imgs"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        return (
            f"HER2ST data not found (missing {missing[0]}); set {DATA_DIR_ENV} to the folder that contains her2st/ "
            "(default: <repo>/../shared/data)."
        )
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Real-data tests skip without the data locally, but FAIL on CI (CI=true) so that a missing copy is noticed."""
    if item.get_closest_marker("realdata") is None:
        return
    reason = _missing_reason(_data_root())
    if reason is None:
        return
    if _in_ci():
        pytest.fail(f"[CI] {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Return the folder holding ``her2st/``: ``$VARST_DATA_DIR`` (relative to the repo) or ``../shared/data``."""
    root = _data_root()
    reason = _missing_reason(root)
    if reason is not None:
        if _in_ci():
            pytest.fail(f"[CI] {reason}", pytrace=False)
        pytest.skip(reason)
    return root.resolve()


def _write_jpeg(path: Path, img: np.ndarray, quality: int = 95) -> None:
    from PIL import Image

    Image.fromarray(img).save(path, quality=quality)


def synthetic_st_image(
    black_square_at: tuple[int, int] | None = (3, 3), side_px: int = 50, scale: float = 1.0
) -> np.ndarray:
    """Pink tissue, purple for array x ≥ 5, and a black square of ``side_px`` centred on one spot."""
    w = int(round((PX_PER_STEP * (max(GRID_X) + 1) + 2 * OFFSET_X) * scale))
    h = int(round((PX_PER_STEP * (max(GRID_Y) + 1) + 2 * OFFSET_Y) * scale))
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = PINK
    x_split = int(round((PX_PER_STEP * 4.5 + OFFSET_X) * scale))
    img[:, x_split:] = PURPLE
    if black_square_at is not None:
        cx = (PX_PER_STEP * black_square_at[0] + OFFSET_X) * scale
        cy = (PX_PER_STEP * black_square_at[1] + OFFSET_Y) * scale
        half = side_px * scale / 2
        img[int(round(cy - half)) : int(round(cy + half)), int(round(cx - half)) : int(round(cx + half))] = 0
    return img


@pytest.fixture(scope="session")
def st_geometry() -> SimpleNamespace:
    """Constants of the synthetic sections written by ``write_st_section`` (tests cannot import conftest)."""
    return SimpleNamespace(
        px_per_step=PX_PER_STEP,
        pixel_size_um=PIXEL_SIZE_UM,
        offset_x=OFFSET_X,
        offset_y=OFFSET_Y,
        pink=PINK,
        purple=PURPLE,
        image=synthetic_st_image,
    )


@pytest.fixture
def write_st_section(tmp_path: Path) -> Callable[..., dict]:
    """Write a small legacy-ST section (counts .tsv.gz, spot table, JPEG) and return paths and the truth.

    The counts table has the 48 grid spots plus one row (``20x20``) missing from the spot table; the spot table marks
    spot ``8x6`` unselected and lists one spot (``9x1``) without counts — so 47 spots match. Gene ``G5`` appears
    twice. Pixel coordinates follow the grid exactly (4 µm per pixel).
    """

    def make(
        name: str = "S1",
        genes: list[str] | None = None,
        image: bool = True,
        seed: int = 0,
        folder: Path | None = None,
        image_scale: float = 1.0,
    ) -> dict:
        folder = tmp_path if folder is None else folder
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        if genes is None:
            genes = [f"G{i}" for i in range(29)] + ["G5"]
        grid = [(x, y) for y in GRID_Y for x in GRID_X]
        rows = [f"{x}x{y}" for x, y in grid] + ["20x20"]
        lam = rng.gamma(2.0, 2.0, size=len(genes))
        counts = rng.poisson(lam, size=(len(rows), len(genes)))
        cnt = pd.DataFrame(counts, index=rows, columns=genes)
        counts_path = folder / f"{name}.tsv.gz"
        with gzip.open(counts_path, "wt") as fh:
            cnt.to_csv(fh, sep="\t")  # first header cell empty, as the ST pipeline writes it
        spot_rows = []
        for x, y in [*grid, (9, 1)]:
            nx, ny = x + rng.normal(0, 0.02), y + rng.normal(0, 0.02)
            selected = 0 if (x, y) == (8, 6) else 1
            px, py = PX_PER_STEP * nx + OFFSET_X, PX_PER_STEP * ny + OFFSET_Y
            spot_rows.append(
                (x, y, round(nx, 3), round(ny, 3), round(px * image_scale, 2), round(py * image_scale, 2), selected)
            )
        spots = pd.DataFrame(spot_rows, columns=["x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"])
        spots_path = folder / f"{name}_selection.tsv"
        spots.to_csv(spots_path, sep="\t", index=False)
        image_path = None
        if image:
            image_path = folder / f"{name}_HE.jpg"
            _write_jpeg(image_path, synthetic_st_image(scale=image_scale))
        expected = [f"{x}x{y}" for x, y in grid if (x, y) != (8, 6)]
        return {
            "counts": counts_path,
            "spots": spots_path,
            "image": image_path,
            "table": cnt,
            "spot_table": spots,
            "expected_spots": expected,
            "name": name,
        }

    return make


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models train far faster on one thread than on two contended ones; keep the suite predictable."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
