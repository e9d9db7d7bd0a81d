"""Preprocessing: patch extraction, morphology / RGB / custom encoders, gene selection."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
import torch
from anndata import AnnData
from PIL import Image
from scipy import sparse

from varst_scverse import pp
from varst_scverse._constants import ADATA_KEYS
from varst_scverse.datasets import her2st, read_st_legacy, to_spatialdata


def _concat_batches(batches):
    idx, patches = [], []
    for i, p in batches:
        idx.append(i)
        patches.append(p)
    return np.concatenate(idx), np.concatenate(patches)


@pytest.fixture
def section(write_st_section):
    sec = write_st_section("S1")
    return read_st_legacy(sec["counts"], sec["spots"], sec["image"]), sec


def _dark_fraction(patch: np.ndarray) -> float:
    return float((patch.max(axis=-1) < 60).mean())


# ----------------------------------------------------------------------------------------------------------------------
# extract_patches
# ----------------------------------------------------------------------------------------------------------------------
def test_extract_patches_physical_size(section):
    adata, _ = section
    pos = adata.obs_names.get_loc("S1_3x3")  # the black square (200 µm = 50 px) is centred on this spot
    # window side / square side = size_um / 200 µm, so the dark fraction is (200 / size_um)² (edges blur by ~1 px)
    for size_um, lo, hi in ((100.0, 0.98, 1.0), (200.0, 0.85, 1.0), (400.0, 0.21, 0.29), (800.0, 0.045, 0.08)):
        idx, patches = _concat_batches(pp.extract_patches(adata, size_um=size_um, size_px=32))
        assert patches.shape == (adata.n_obs, 32, 32, 3) and patches.dtype == np.uint8
        p = patches[np.flatnonzero(idx == pos)[0]]
        assert lo <= _dark_fraction(p) <= hi, size_um
        if size_um == 400.0:
            assert _dark_fraction(p[9:23, 9:23]) == 1.0 and _dark_fraction(p[:6]) == 0.0
    # purple spot vs pink spot
    idx, patches = _concat_batches(pp.extract_patches(adata, size_um=100.0, size_px=16))
    purple = patches[np.flatnonzero(idx == adata.obs_names.get_loc("S1_7x4"))[0]].reshape(-1, 3).mean(0)
    pink = patches[np.flatnonzero(idx == adata.obs_names.get_loc("S1_1x5"))[0]].reshape(-1, 3).mean(0)
    np.testing.assert_allclose(purple, (100, 60, 150), atol=12)
    np.testing.assert_allclose(pink, (230, 180, 200), atol=12)


def test_extract_patches_pads_white_at_borders(section):
    adata, _ = section
    pos = adata.obs_names.get_loc("S1_1x1")  # pixel (70, 80): a 1,000 µm (250 px) window leaves the image
    idx, patches = _concat_batches(pp.extract_patches(adata, size_um=1000.0, size_px=50))
    p = patches[np.flatnonzero(idx == pos)[0]]
    assert (p[:5, :5] == 255).all()  # top-left corner is outside the image
    assert (p[-5:, -5:] != 255).any()


def test_extract_patches_batches_and_laziness(section, monkeypatch):
    adata, _ = section
    calls = []
    from varst_scverse.pp import _resolve

    real = _resolve.read_image
    monkeypatch.setattr(_resolve, "read_image", lambda *a, **k: calls.append(a) or real(*a, **k))
    batches = pp.extract_patches(adata, batch_size=10, size_px=8)
    assert calls == []  # nothing decoded before iterating
    sizes = [len(i) for i, _ in batches]
    assert sizes == [10, 10, 10, 10, 7] and len(batches) == 5
    assert len(calls) == 1  # one image decode per section
    assert batches.n_patches == adata.n_obs
    np.testing.assert_array_equal(np.sort(batches.obs_indices), np.arange(adata.n_obs))


def test_extract_patches_default_size_and_validation(section):
    adata, _ = section
    first = next(iter(pp.extract_patches(adata)))
    assert first[1].shape[1:] == (64, 64, 3)
    with pytest.raises(ValueError, match="size_px"):
        pp.extract_patches(adata, size_px=0)
    bare = adata.copy()
    del bare.uns["spatial"]
    with pytest.raises(ValueError, match="No section has an H&E image"):
        pp.extract_patches(bare, pixel_size_um=4.0)


def test_extract_patches_sources(section, write_st_section, tmp_path, st_geometry):
    adata, sec = section
    ref_idx, ref = _concat_batches(pp.extract_patches(adata, size_px=16))
    # the full-resolution file is gone: fall back to the in-memory hires image, with a warning
    moved = adata.copy()
    moved.uns["spatial"]["S1"]["metadata"]["image_path"] = str(tmp_path / "gone.jpg")
    with pytest.warns(UserWarning, match="not found"):
        _, p_hires = _concat_batches(pp.extract_patches(moved, size_px=16))
    assert np.abs(p_hires.astype(int) - ref.astype(int)).mean() < 3
    # explicit in-memory array (full resolution, PNG-exact)
    arr = st_geometry.image()
    bare = adata.copy()
    del bare.uns["spatial"]
    _, p_arr = _concat_batches(pp.extract_patches(bare, size_px=16, image=arr, pixel_size_um=4.0))
    assert np.abs(p_arr.astype(int) - ref.astype(int)).mean() < 3
    # SpatialData input
    _, p_sd = _concat_batches(pp.extract_patches(to_spatialdata(adata), size_px=16))
    np.testing.assert_array_equal(p_sd, ref)
    # two sections, one without image: its spots are skipped and reported
    import anndata as ad

    other = write_st_section("S2", image=False, seed=3)
    b = read_st_legacy(other["counts"], other["spots"])
    both = ad.concat([adata, b], uns_merge="unique")
    both.uns["spatial"] = {"S1": adata.uns["spatial"]["S1"], "S2": b.uns["spatial"]["S2"]}
    with pytest.warns(UserWarning, match="47 spot"):
        batches = pp.extract_patches(both, size_px=16)
    assert batches.skipped_libraries == ["S2"] and batches.n_skipped == 47
    idx, _ = _concat_batches(batches)
    np.testing.assert_array_equal(np.sort(idx), np.arange(47))


# ----------------------------------------------------------------------------------------------------------------------
# encoders
# ----------------------------------------------------------------------------------------------------------------------
def _texture_patches(rng, n=4, size=64):
    """Pink stroma-like patches and dark-blue 'nuclei' patches."""
    stroma = np.empty((n, size, size, 3), np.uint8)
    stroma[:] = (225, 160, 190)
    stroma = np.clip(stroma + rng.normal(0, 4, stroma.shape), 0, 255).astype(np.uint8)
    nuclei = stroma.copy()
    yy, xx = np.mgrid[:size, :size]
    for k in range(n):
        for cy, cx in rng.integers(4, size - 4, size=(25, 2)):
            nuclei[k][(yy - cy) ** 2 + (xx - cx) ** 2 <= 6] = (60, 40, 120)
    return stroma, nuclei


def test_morphology_features_properties():
    rng = np.random.default_rng(0)
    stroma, nuclei = _texture_patches(rng)
    f = pp.morphology_features(np.concatenate([stroma, nuclei]))
    names = pp._morphology.morphology_feature_names()
    assert f.shape == (8, len(names)) and 100 <= len(names) <= 200 and len(set(names)) == len(names)
    assert f.dtype == np.float32 and np.isfinite(f).all()
    col = {n: i for i, n in enumerate(names)}
    # haematoxylin-rich blobs raise nuclear fraction, blob density and H; stroma has none
    for key in ("nuclei_frac_0.1", "blob_density", "H_mean"):
        assert f[4:, col[key]].min() > f[:4, col[key]].max()
    assert (f[:4, col["blob_density"]] == 0).all()
    # deterministic, batch-independent
    np.testing.assert_array_equal(f, pp.morphology_features(np.concatenate([stroma, nuclei])))
    np.testing.assert_allclose(f[5], pp.morphology_features(nuclei[1:2])[0], rtol=1e-5, atol=1e-6)
    # degenerate patches stay finite
    flat = np.stack([np.full((32, 32, 3), v, np.uint8) for v in (0, 255)])
    assert np.isfinite(pp.morphology_features(flat)).all()
    with pytest.raises(ValueError, match="batch"):
        pp.morphology_features(np.zeros((2, 8, 8)))


def test_rgb_features_exact():
    p = np.zeros((2, 4, 4, 3), np.uint8)
    p[0] = (10, 20, 30)
    p[1, :2] = (0, 0, 0)
    p[1, 2:] = (100, 200, 50)
    f = pp.rgb_features(p)
    np.testing.assert_allclose(f[0], [10, 20, 30, 0, 0, 0])
    np.testing.assert_allclose(f[1], [50, 100, 25, 50, 100, 25])


def test_morphology_throughput():
    rng = np.random.default_rng(1)
    stroma, nuclei = _texture_patches(rng, n=64)
    batch = np.concatenate([stroma, nuclei])
    pp.morphology_features(batch[:8])
    t0 = time.perf_counter()
    pp.morphology_features(batch)
    rate = len(batch) / (time.perf_counter() - t0)
    assert rate > 40, f"{rate:.0f} patches/s"  # ≈200/s on 1 core; generous floor for loaded CI machines


def test_embed_histology_morphology(section, write_st_section):
    import anndata as ad

    adata, _ = section
    other = write_st_section("S2", image=False, seed=3)
    b = read_st_legacy(other["counts"], other["spots"])
    both = ad.concat([adata, b])
    both.uns["spatial"] = {"S1": adata.uns["spatial"]["S1"], "S2": b.uns["spatial"]["S2"]}
    with pytest.warns(UserWarning, match="without an image"):
        out = pp.embed_histology(both, show_progress=False, size_px=32)
    assert out is None
    emb = both.obsm[ADATA_KEYS.HISTOLOGY]
    assert emb.dtype == np.float32 and emb.shape == (94, 156)
    img, noimg = emb[:47], emb[47:]
    assert np.isnan(noimg).all() and np.isfinite(img).all()
    # standardised over the embedded spots: each non-constant feature has mean 0, std 1
    std = img.std(0)
    varying = std > 1e-3
    assert varying.sum() > 50
    np.testing.assert_allclose(img.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(std[varying], 1, atol=1e-3)
    info = both.uns["varst_histology"]
    assert info["encoder"] == "morphology" and info["size_um"] == 200.0 and info["size_px"] == 32
    assert info["skipped_sections"] == ["S2"] and info["n_embedded"] == 47
    # raw features are recoverable from the stored scaling, and equal a direct computation
    _, patches = _concat_batches(pp.extract_patches(adata, size_px=32))
    raw = pp.morphology_features(patches)
    np.testing.assert_allclose(img * info["feature_std"] + info["feature_mean"], raw, rtol=1e-3, atol=1e-3)
    # deterministic; copy=True leaves the input alone
    again = pp.embed_histology(adata, show_progress=False, size_px=32, copy=True)
    assert ADATA_KEYS.HISTOLOGY not in adata.obsm
    np.testing.assert_array_equal(again.obsm[ADATA_KEYS.HISTOLOGY], img)


def test_embed_histology_rgb_and_callable(section):
    adata, _ = section
    pp.embed_histology(adata, encoder="rgb", key_added="X_rgb", show_progress=False, size_px=16)
    assert adata.obsm["X_rgb"].shape == (47, 6)
    seen = {}

    def enc(patches):
        seen["dtype"], seen["shape"] = patches.dtype, patches.shape
        return patches.reshape(len(patches), -1, 3).mean(1)

    pp.embed_histology(adata, encoder=enc, key_added="X_fn", show_progress=False, size_px=16, batch_size=20)
    assert seen["dtype"] == np.uint8 and seen["shape"][1:] == (16, 16, 3)
    _, patches = _concat_batches(pp.extract_patches(adata, size_px=16))
    # callables are not standardised by default
    np.testing.assert_allclose(adata.obsm["X_fn"], patches.reshape(47, -1, 3).mean(1), rtol=1e-5)
    assert adata.uns["varst_histology"]["encoder"] == "enc"
    with pytest.raises(ValueError, match="Unknown encoder"):
        pp.embed_histology(adata, encoder="uni", show_progress=False)
    with pytest.raises(ValueError, match="expected"):
        pp.embed_histology(adata, encoder=lambda p: np.zeros((1, 3)), show_progress=False)


class _MeanNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = None
        self.lin = torch.nn.Identity()

    def forward(self, x):
        self.seen = (tuple(x.shape), x.dtype, self.training)
        return x.mean(dim=(2, 3))


def test_embed_histology_torch_module(section):
    adata, _ = section
    net = _MeanNet().train()
    pp.embed_histology(adata, encoder=net, key_added="X_net", show_progress=False, batch_size=16)
    shape, dtype, training = net.seen
    assert shape[1:] == (3, 224, 224) and dtype == torch.float32 and training is False
    assert net.training  # restored
    # ImageNet normalisation of the patch means
    _, patches = _concat_batches(pp.extract_patches(adata, size_px=224))
    mean = patches.reshape(47, -1, 3).mean(1) / 255.0
    expected = (mean - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(adata.obsm["X_net"], expected, atol=1e-4)
    assert adata.uns["varst_histology"]["size_px"] == 224


# ----------------------------------------------------------------------------------------------------------------------
# select_genes
# ----------------------------------------------------------------------------------------------------------------------
def _gene_adata(seed=0, n=200):
    rng = np.random.default_rng(seed)
    n_genes = 60
    mu = rng.gamma(2.0, 3.0, n_genes)
    disp = np.r_[np.full(20, 0.05), np.full(20, 2.0), np.full(20, 0.3)]  # genes 20–39 very over-dispersed
    lam = rng.gamma(1 / disp, mu * disp, size=(n, n_genes))
    counts = rng.poisson(lam)
    counts[:, 55:] = 0
    counts[: int(0.05 * n), 55:] = 3  # genes 55–59 detected in 5% of spots only
    adata = AnnData(
        X=sparse.csr_matrix(counts.astype(np.int32)),
        obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]),
    )
    adata.layers[ADATA_KEYS.COUNTS_LAYER] = adata.X.copy()
    return adata


@pytest.mark.parametrize("flavor", ["seurat_v3", "variance"])
def test_select_genes_basic(flavor):
    adata = _gene_adata()
    genes = pp.select_genes(adata, n_top=15, flavor=flavor)
    assert len(genes) == 15 and len(set(genes)) == 15
    assert adata.var[ADATA_KEYS.HIGHLY_VARIABLE].sum() == 15
    assert set(adata.var_names[adata.var[ADATA_KEYS.HIGHLY_VARIABLE]]) == set(genes)
    rank = adata.var["varst_hvg_rank"]
    assert rank[genes].tolist() == list(range(15))
    # rarely detected genes are not eligible; over-dispersed genes dominate
    assert rank[[f"g{i}" for i in range(55, 60)]].isna().all()
    assert sum(int(g[1:]) in range(20, 40) for g in genes) >= 12
    sub = adata.copy()
    assert pp.select_genes(sub, n_top=15, flavor=flavor, subset=True) == genes
    assert sub.n_vars == 15


def test_select_genes_uses_training_spots_only():
    adata = _gene_adata(n=300)
    train = np.zeros(adata.n_obs, bool)
    train[:150] = True
    genes = pp.select_genes(adata, n_top=20, train_mask=train)
    rank = adata.var["varst_hvg_rank"].copy()
    # scramble the test spots completely: same selection, same ranks
    changed = adata.copy()
    x = changed.layers[ADATA_KEYS.COUNTS_LAYER].toarray()
    rng = np.random.default_rng(5)
    x[150:] = rng.poisson(50, size=x[150:].shape)
    changed.layers[ADATA_KEYS.COUNTS_LAYER] = sparse.csr_matrix(x)
    assert pp.select_genes(changed, n_top=20, train_mask=train) == genes
    pd.testing.assert_series_equal(changed.var["varst_hvg_rank"], rank)
    # but the whole data set gives a different answer (the test is sensitive)
    assert pp.select_genes(changed, n_top=20) != genes
    # obs names and boolean Series are equivalent masks
    assert pp.select_genes(adata, n_top=20, train_mask=adata.obs_names[:150].tolist()) == genes
    assert pp.select_genes(adata, n_top=20, train_mask=pd.Series(train, index=adata.obs_names)) == genes


def test_select_genes_errors():
    adata = _gene_adata()
    with pytest.raises(ValueError, match="entries but adata has"):
        pp.select_genes(adata, train_mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="fewer than n_top"):
        pp.select_genes(adata, n_top=58)
    with pytest.raises(KeyError, match="not obs names"):
        pp.select_genes(adata, n_top=5, train_mask=["s1", "zzz"])
    with pytest.raises(ValueError, match="flavor"):
        pp.select_genes(adata, n_top=5, flavor="magic")
    with pytest.raises(KeyError, match="layer"):
        pp.select_genes(adata, n_top=5, layer="raw")


# ----------------------------------------------------------------------------------------------------------------------
# real HER2ST data
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def c2_a1(data_dir):
    return her2st(["C2", "A1"], data_dir=data_dir)


@pytest.mark.realdata
def test_real_patches_physical_size(c2_a1):
    adata = c2_a1[c2_a1.obs[ADATA_KEYS.SECTION] == "C2"].copy()
    entry = adata.uns["spatial"]["C2"]
    px_um = entry["scalefactors"]["pixel_size_um_fullres"]
    picks = [0, 50, 100]
    idx, patches = _concat_batches(pp.extract_patches(adata, size_um=200.0, size_px=64))
    assert patches.shape == (187, 64, 64, 3)
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(entry["metadata"]["image_path"]) as im:
        full = np.asarray(im.convert("RGB"))
    side = int(round(200.0 / px_um))  # ≈ 290 full-resolution pixels
    assert 250 < side < 330
    for k in picks:
        cx, cy = adata.obsm["spatial"][k]
        x0, y0 = int(np.floor(cx - side / 2 + 0.5)), int(np.floor(cy - side / 2 + 0.5))
        ref = np.asarray(Image.fromarray(full[y0 : y0 + side, x0 : x0 + side]).resize((64, 64), Image.BILINEAR))
        got = patches[np.flatnonzero(idx == k)[0]].astype(float)
        # same window: close pixel agreement (reduced JPEG decode); a window 20% larger agrees clearly worse
        err = np.abs(got - ref).mean()
        big = int(round(side * 1.2))
        x1, y1 = int(np.floor(cx - big / 2 + 0.5)), int(np.floor(cy - big / 2 + 0.5))
        wrong = np.asarray(Image.fromarray(full[y1 : y1 + big, x1 : x1 + big]).resize((64, 64), Image.BILINEAR))
        assert err < 6 and err < 0.6 * np.abs(got - wrong).mean()


@pytest.mark.realdata
def test_real_morphology_embedding(c2_a1):
    adata = c2_a1.copy()
    with pytest.warns(UserWarning, match="without an image"):
        pp.embed_histology(adata, show_progress=False)
    emb = adata.obsm[ADATA_KEYS.HISTOLOGY]
    c2 = (adata.obs[ADATA_KEYS.SECTION] == "C2").to_numpy()
    assert np.isfinite(emb[c2]).all() and np.isnan(emb[~c2]).all()
    std = emb[c2].std(0)
    np.testing.assert_allclose(emb[c2].mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(std[std > 1e-3], 1, atol=1e-3)
    assert (std > 1e-3).sum() >= 140
    with pytest.warns(UserWarning, match="without an image"):
        again = pp.embed_histology(adata, show_progress=False, copy=True)
    np.testing.assert_array_equal(again.obsm[ADATA_KEYS.HISTOLOGY], emb)
    # the descriptor carries expression signal: total UMI correlates with the best single feature
    depth = np.log1p(np.asarray(adata[c2].X.sum(1)).ravel())
    r = [abs(np.corrcoef(emb[c2][:, j], depth)[0, 1]) for j in np.flatnonzero(std > 1e-3)]
    assert max(r) > 0.4


@pytest.mark.realdata
def test_real_select_genes_ignores_test_spots(c2_a1):
    adata = c2_a1.copy()
    train = (adata.obs[ADATA_KEYS.SECTION] == "A1").to_numpy()
    genes = pp.select_genes(adata, n_top=50, train_mask=train)
    changed = adata.copy()
    x = changed.layers[ADATA_KEYS.COUNTS_LAYER].tocsr(copy=True)
    rows = np.flatnonzero(~train)
    test_block = x[rows]
    test_block.data = test_block.data * 7 + 1
    x = sparse.vstack([x[np.flatnonzero(train)], test_block]).tocsr()
    order = np.r_[np.flatnonzero(train), rows]
    changed = changed[order].copy()
    changed.layers[ADATA_KEYS.COUNTS_LAYER] = x
    assert pp.select_genes(changed, n_top=50, train_mask=train[order]) == genes
    assert pp.select_genes(changed, n_top=50) != genes
