"""Readers: legacy ST, HER2ST, data-folder resolution, SpatialData conversion."""

from __future__ import annotations

import gzip
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from varst_scverse import datasets
from varst_scverse._constants import ADATA_KEYS, DATA_DIR_ENV
from varst_scverse.datasets import _paths, read_st_legacy, resolve_data_dir, to_spatialdata

PIXEL_SIZE_UM = 4.0  # the synthetic sections of conftest.write_st_section: 200 µm spacing over 50 px


def _uns(adata, lib):
    return adata.uns[ADATA_KEYS.UNS_SPATIAL][lib]


# ----------------------------------------------------------------------------------------------------------------------
# read_st_legacy on synthetic files
# ----------------------------------------------------------------------------------------------------------------------
def test_read_st_legacy_matches_spots_and_counts(write_st_section):
    sec = write_st_section("S1")
    adata = read_st_legacy(sec["counts"], sec["spots"], sec["image"])
    expected = sec["expected_spots"]
    assert adata.n_obs == len(expected) == 47
    assert adata.obs_names.tolist() == [f"S1_{s}" for s in expected]
    # raw counts, sparse int, X a separate copy of layers["counts"]
    counts = adata.layers[ADATA_KEYS.COUNTS_LAYER]
    assert sparse.isspmatrix_csr(counts) or isinstance(counts, sparse.csr_array)
    assert np.issubdtype(counts.dtype, np.integer)
    table = sec["table"].loc[expected].to_numpy()
    np.testing.assert_array_equal(counts.toarray(), table)
    np.testing.assert_array_equal(adata.X.toarray(), table)
    assert adata.X is not counts
    adata.X.data[:] = 0
    assert counts.sum() == table.sum()
    # duplicated gene name made unique
    assert adata.var_names.is_unique
    assert "G5" in adata.var_names and "G5-1" in adata.var_names
    # array positions and full-resolution pixel coordinates of the matching spot-table rows
    st = sec["spot_table"].set_index(["x", "y"])
    keys = [tuple(map(int, s.split("x"))) for s in expected]
    np.testing.assert_array_equal(adata.obs[["array_x", "array_y"]].to_numpy(), np.array(keys))
    np.testing.assert_allclose(adata.obsm[ADATA_KEYS.SPATIAL], st.loc[keys, ["pixel_x", "pixel_y"]].to_numpy())
    assert adata.obsm[ADATA_KEYS.SPATIAL].dtype == np.float64
    assert (adata.obs[ADATA_KEYS.SECTION] == "S1").all()


def test_read_st_legacy_image_and_scalefactors(write_st_section, st_geometry):
    assert st_geometry.pixel_size_um == PIXEL_SIZE_UM
    sec = write_st_section("S1")
    adata = read_st_legacy(sec["counts"], sec["spots"], sec["image"], library_id="lib")
    entry = _uns(adata, "lib")
    sf = entry["scalefactors"]
    # 200 µm between spots over PX_PER_STEP pixels → 4 µm / px, estimated from the grid
    assert sf["pixel_size_um_fullres"] == pytest.approx(PIXEL_SIZE_UM, rel=0.01)
    assert sf["spot_diameter_fullres"] == pytest.approx(100.0 / PIXEL_SIZE_UM, rel=0.01)
    hires = entry["images"]["hires"]
    assert hires.dtype == np.uint8 and hires.ndim == 3 and hires.shape[2] == 3
    assert sf["tissue_hires_scalef"] == pytest.approx(1.0)  # small image is kept as is
    assert Path(entry["metadata"]["image_path"]) == sec["image"].resolve()
    # spot (3, 3) sits on the black square, spot (6, 2) on purple tissue
    s = sf["tissue_hires_scalef"]
    xy = adata[["lib_3x3", "lib_6x2"]].obsm[ADATA_KEYS.SPATIAL] * s
    px = hires[np.round(xy[:, 1]).astype(int), np.round(xy[:, 0]).astype(int)].astype(int)
    assert px[0].max() < 40
    assert abs(px[1] - np.array([100, 60, 150])).max() < 30
    # explicit pixel size wins
    ad2 = read_st_legacy(sec["counts"], sec["spots"], pixel_size_um=2.0, spot_diameter_um=55.0)
    assert _uns(ad2, "S1")["scalefactors"]["pixel_size_um_fullres"] == 2.0
    assert _uns(ad2, "S1")["scalefactors"]["spot_diameter_fullres"] == pytest.approx(27.5)
    assert _uns(ad2, "S1")["images"] == {}


def test_read_st_legacy_large_image_downsampled(write_st_section):
    sec = write_st_section("big", image_scale=6.0)  # 3,000 px wide
    adata = read_st_legacy(sec["counts"], sec["spots"], sec["image"])
    entry = _uns(adata, "big")
    hires = entry["images"]["hires"]
    full_h, full_w = entry["metadata"]["image_shape_fullres"]
    assert max(hires.shape[:2]) <= 2000 and max(hires.shape[:2]) >= 1900
    assert entry["scalefactors"]["tissue_hires_scalef"] == pytest.approx(hires.shape[1] / full_w, rel=1e-6)
    assert entry["scalefactors"]["pixel_size_um_fullres"] == pytest.approx(PIXEL_SIZE_UM / 6.0, rel=0.01)
    # the black square is still under spot (3, 3) in hires coordinates
    x, y = adata["big_3x3"].obsm[ADATA_KEYS.SPATIAL][0] * entry["scalefactors"]["tissue_hires_scalef"]
    assert hires[int(round(y)), int(round(x))].max() < 40


def test_read_st_legacy_gene_subset_and_fallback_parser(write_st_section, tmp_path):
    sec = write_st_section("S1")
    sub = read_st_legacy(sec["counts"], sec["spots"], genes=["G3", "G1", "nope"])
    assert sub.var_names.tolist() == ["G3", "G1"]
    np.testing.assert_array_equal(sub.X.toarray(), sec["table"].loc[sec["expected_spots"], ["G3", "G1"]].to_numpy())
    # a table with NA and quoted names takes the pandas path; NA becomes 0
    tab = sec["table"].astype(object)
    tab.iloc[0, 0] = "NA"
    path = tmp_path / "na.tsv"
    tab.to_csv(path, sep="\t", quoting=1)
    ad = read_st_legacy(path, sec["spots"], library_id="na")
    assert ad.n_obs == 47 and ad.X[0, 0] == 0
    np.testing.assert_array_equal(ad.X.toarray()[1:], sec["table"].loc[sec["expected_spots"][1:]].to_numpy())


def test_read_st_legacy_float_counts_kept_as_float(write_st_section, tmp_path):
    sec = write_st_section("S1")
    tab = sec["table"] + 0.5
    path = tmp_path / "f.tsv.gz"
    with gzip.open(path, "wt") as fh:
        tab.to_csv(fh, sep="\t")
    with pytest.warns(UserWarning, match="not integers"):
        ad = read_st_legacy(path, sec["spots"])
    np.testing.assert_allclose(ad.X.toarray(), tab.loc[sec["expected_spots"]].to_numpy())


def test_read_st_legacy_errors(write_st_section, tmp_path):
    sec = write_st_section("S1")
    with pytest.raises(FileNotFoundError, match="missing.tsv.gz"):
        read_st_legacy(tmp_path / "missing.tsv.gz", sec["spots"])
    with pytest.raises(FileNotFoundError, match="nospots.tsv"):
        read_st_legacy(sec["counts"], tmp_path / "nospots.tsv")
    with pytest.raises(FileNotFoundError, match="noimage.jpg"):
        read_st_legacy(sec["counts"], sec["spots"], tmp_path / "noimage.jpg")
    other = sec["spot_table"].assign(x=sec["spot_table"]["x"] + 100)
    bad = tmp_path / "shifted_selection.tsv"
    other.to_csv(bad, sep="\t", index=False)
    with pytest.raises(ValueError, match="No spot"):
        read_st_legacy(sec["counts"], bad)


# ----------------------------------------------------------------------------------------------------------------------
# her2st on a fake data folder (logic), resolve_data_dir
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_her2st(tmp_path, write_st_section):
    root = tmp_path / "data"
    base = root / "her2st"
    a = write_st_section("A1", genes=["G0", "G1", "G2"], image=False, folder=base / "tmp", seed=1)
    c = write_st_section("C2", genes=["G1", "G2", "G3", "G4"], image=True, folder=base / "tmp", seed=2)
    for sec in (a, c):
        name = sec["name"]
        (base / "ST-cnts").mkdir(parents=True, exist_ok=True)
        (base / "ST-spotfiles").mkdir(parents=True, exist_ok=True)
        shutil.copy(sec["counts"], base / "ST-cnts" / f"{name}.tsv.gz")
        shutil.copy(sec["spots"], base / "ST-spotfiles" / f"{name}_selection.tsv")
    img_dir = base / "ST-imgs" / "C" / "C2"
    img_dir.mkdir(parents=True)
    shutil.copy(c["image"], img_dir / "HE_C2.jpg")
    lbl = base / "ST-pat" / "lbl"
    lbl.mkdir(parents=True)
    labels = pd.DataFrame(
        {
            "Row.names": ["1x1", "2x1", "3x3", "99x99"],
            "x": [1.02, 1.98, 3.01, 99.0],
            "y": [0.97, 1.03, np.nan, 99.0],
            "pixel_x": 0.0,
            "pixel_y": 0.0,
            "label": ["invasive cancer", "adipose tissue", "lost", "far"],
        }
    )
    labels.to_csv(lbl / "A1_labeled_coordinates.tsv", sep="\t", index=False)
    return root, a, c


def test_her2st_concatenates_sections(fake_her2st):
    root, a, c = fake_her2st
    adata = datasets.her2st(["A1", "C2"], data_dir=root)
    assert adata.n_obs == 94
    assert set(adata.var_names) == {"G0", "G1", "G2", "G3", "G4"}
    # outer join: genes missing from a section are 0 there; others are the file's counts
    x = pd.DataFrame(adata.layers[ADATA_KEYS.COUNTS_LAYER].toarray(), index=adata.obs_names, columns=adata.var_names)
    a_rows = [f"A1_{s}" for s in a["expected_spots"]]
    c_rows = [f"C2_{s}" for s in c["expected_spots"]]
    assert (x.loc[a_rows, ["G3", "G4"]] == 0).all().all()
    assert (x.loc[c_rows, "G0"] == 0).all()
    np.testing.assert_array_equal(x.loc[c_rows, ["G1", "G2", "G3", "G4"]], c["table"].loc[c["expected_spots"]])
    np.testing.assert_array_equal(x.loc[a_rows, ["G0", "G1", "G2"]], a["table"].loc[a["expected_spots"]])
    np.testing.assert_array_equal(adata.X.toarray(), x.to_numpy())
    assert adata.obs[ADATA_KEYS.SECTION].tolist() == ["A1"] * 47 + ["C2"] * 47
    assert adata.obs[ADATA_KEYS.PATIENT].tolist() == ["A"] * 47 + ["C"] * 47
    # labels: matched on the rounded grid position, NaN elsewhere and for the unlabelled section
    lab = adata.obs[ADATA_KEYS.LABEL]
    assert lab["A1_1x1"] == "invasive cancer" and lab["A1_2x1"] == "adipose tissue"
    assert lab.notna().sum() == 2
    # images only where present, uns keyed by section
    spatial = adata.uns[ADATA_KEYS.UNS_SPATIAL]
    assert set(spatial) == {"A1", "C2"}
    assert "hires" in spatial["C2"]["images"] and spatial["A1"]["images"] == {}
    # gene subset, order as requested, genes absent everywhere dropped with a warning
    with pytest.warns(UserWarning, match="absent"):
        sub = datasets.her2st(["C2", "A1"], data_dir=root / "her2st", genes=["G4", "G0", "ZZZ"])
    assert sub.var_names.tolist() == ["G4", "G0"]
    assert sub.obs[ADATA_KEYS.SECTION].tolist()[0] == "C2"


def test_her2st_bad_arguments(fake_her2st):
    root, _, _ = fake_her2st
    with pytest.raises(ValueError, match="Unknown HER2ST section"):
        datasets.her2st(["Z9"], data_dir=root)
    with pytest.raises(ValueError, match="Duplicated"):
        datasets.her2st(["A1", "A1"], data_dir=root)
    with pytest.raises(FileNotFoundError):
        datasets.her2st(["A1"], data_dir=root / "nowhere")


def test_resolve_data_dir(fake_her2st, monkeypatch, tmp_path):
    root, _, _ = fake_her2st
    assert resolve_data_dir(root) == root.resolve()
    assert resolve_data_dir(root / "her2st") == root.resolve()  # the data-set folder itself is accepted
    monkeypatch.setenv(DATA_DIR_ENV, str(root))
    assert resolve_data_dir() == root.resolve()
    # nothing anywhere: the error lists every place searched and how to fix it
    monkeypatch.delenv(DATA_DIR_ENV)
    monkeypatch.setattr(_paths, "_shared_candidates", lambda start: [tmp_path / "nope" / start.name])
    monkeypatch.setattr(_paths, "default_cache_dir", lambda: tmp_path / "cache")
    with pytest.raises(FileNotFoundError) as err:
        resolve_data_dir()
    msg = str(err.value)
    assert DATA_DIR_ENV in msg and str(tmp_path / "cache" / "her2st") in msg and "nope" in msg
    # a shared/data folder above the working directory is found
    monkeypatch.setattr(_paths, "_shared_candidates", lambda start: [root] if start == Path.cwd() else [])
    assert resolve_data_dir() == root.resolve()


# ----------------------------------------------------------------------------------------------------------------------
# SpatialData
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:The table is annotating")
def test_to_spatialdata_round_trip(write_st_section):
    from spatialdata.transformations import get_transformation

    from varst_scverse.pp import resolve_adata

    sec = write_st_section("S1")
    adata = read_st_legacy(sec["counts"], sec["spots"], sec["image"])
    sdata = to_spatialdata(adata)
    assert set(sdata.images) == {"S1_image"} and set(sdata.shapes) == {"S1_spots"}
    table = sdata.tables["table"]
    assert table.n_obs == adata.n_obs
    circles = sdata.shapes["S1_spots"]
    np.testing.assert_allclose(np.column_stack([circles.geometry.x, circles.geometry.y]), adata.obsm["spatial"])
    np.testing.assert_allclose(circles["radius"], 100.0 / PIXEL_SIZE_UM / 2, rtol=0.01)
    # the image is placed in the full-resolution frame of the spots
    t = get_transformation(sdata.images["S1_image"], to_coordinate_system="S1")
    m = t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    np.testing.assert_allclose(np.diag(m)[:2], 1.0 / adata.uns["spatial"]["S1"]["scalefactors"]["tissue_hires_scalef"])
    # resolve_adata returns the very table object
    assert resolve_adata(sdata) is table
    # a foreign SpatialData without obsm["spatial"] / uns["spatial"]: positions come from the circles, image found
    from spatialdata import SpatialData

    bare = table.copy()
    del bare.obsm["spatial"]
    del bare.uns["spatial"]
    foreign = SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes), tables={"t": bare})
    resolved = resolve_adata(foreign, table_key="t")
    assert resolved is foreign.tables["t"]
    np.testing.assert_allclose(resolved.obsm["spatial"], adata.obsm["spatial"])
    entry = resolved.uns["spatial"]["S1"]
    assert entry["metadata"]["spatialdata_image"] == "S1_image"
    assert entry["images"]["hires"].shape == adata.uns["spatial"]["S1"]["images"]["hires"].shape
    assert entry["scalefactors"]["spot_diameter_fullres"] == pytest.approx(100.0 / PIXEL_SIZE_UM, rel=0.01)
    with pytest.raises(KeyError, match="table"):
        resolve_adata(SpatialData(tables={"a": bare.copy(), "b": bare.copy()}))
    with pytest.raises(TypeError):
        resolve_adata(np.zeros(3))


# ----------------------------------------------------------------------------------------------------------------------
# real HER2ST data
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def her2st_c2_b4(data_dir):
    return datasets.her2st(["C2", "B4"], data_dir=data_dir)


@pytest.mark.realdata
def test_her2st_real_sections(her2st_c2_b4, data_dir):
    adata = her2st_c2_b4
    counts = adata.obs[ADATA_KEYS.SECTION].value_counts()
    assert counts["C2"] == 187 and counts["B4"] == 283  # spots under tissue present in both tables
    assert adata.n_vars > 15000
    assert np.issubdtype(adata.X.dtype, np.integer)
    # the counts of a spot are the file's row
    row = pd.read_csv(data_dir / "her2st" / "ST-cnts" / "C2.tsv.gz", sep="\t", index_col=0, nrows=3)
    spot = row.index[0]
    got = adata[f"C2_{spot}", row.columns].X.toarray().ravel()
    np.testing.assert_array_equal(got, row.iloc[0].to_numpy())
    for lib in ("C2", "B4"):
        entry = adata.uns[ADATA_KEYS.UNS_SPATIAL][lib]
        h, w = entry["metadata"]["image_shape_fullres"]
        xy = adata[adata.obs[ADATA_KEYS.SECTION] == lib].obsm[ADATA_KEYS.SPATIAL]
        assert (xy[:, 0] > 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] > 0).all() and (xy[:, 1] < h).all()
        assert 0.6 < entry["scalefactors"]["pixel_size_um_fullres"] < 0.8
        assert max(entry["images"]["hires"].shape[:2]) == 2000
        assert Path(entry["metadata"]["image_path"]).is_file()


@pytest.mark.realdata
def test_her2st_real_labels(data_dir):
    adata = datasets.her2st("C1", data_dir=data_dir, genes="hist2st")
    assert adata.n_vars == 785
    lab = adata.obs[ADATA_KEYS.LABEL]
    assert lab.notna().sum() == adata.n_obs == 176
    assert {"invasive cancer", "connective tissue"} <= set(lab.cat.categories)
    # one row of the label file, end to end
    lbl = pd.read_csv(data_dir / "her2st" / "ST-pat" / "lbl" / "C1_labeled_coordinates.tsv", sep="\t")
    first = lbl.iloc[0]
    name = f"C1_{int(round(first['x']))}x{int(round(first['y']))}"
    assert lab[name] == first["label"]


@pytest.mark.realdata
def test_her2st_gene_subset_is_fast(data_dir):
    t0 = time.perf_counter()
    adata = datasets.her2st(["A1", "B1", "C1", "D1"], data_dir=data_dir, genes=["ERBB2", "GAPDH", "ACTB"])
    assert time.perf_counter() - t0 < 30
    assert adata.var_names.tolist() == ["ERBB2", "GAPDH", "ACTB"]
    assert (np.asarray(adata.X.sum(axis=0)).ravel() > 0).all()
    assert adata.obs[ADATA_KEYS.LABEL].notna().sum() > 0.9 * adata.n_obs
