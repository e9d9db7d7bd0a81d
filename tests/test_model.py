"""Tests of varst_scverse.VARST: AnnData validation, both training stages, prediction, persistence."""

from __future__ import annotations

import re
import warnings
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse
from threadpoolctl import threadpool_limits

import varst_scverse as varst
from varst_scverse import VARST
from varst_scverse._constants import ADATA_KEYS

VQ = {"vocab_size": 64, "embed_dim": 16, "hidden_dim": 32, "gene_mixing_dim": 16, "scales": (1, 4, 8, None)}
VAR = {"embed_dim": 32, "num_heads": 2, "num_layers": 2, "feedforward_dim": 64, "condition_embed_dim": 32}
N_GENES = 32
N_GENERATED = 1 + 4 + 8  # the cpu preset generates the 3 coarsest scales
FAST = {"batch_size": 32, "lr": 3e-3, "enable_progress_bar": False}
SETUP = {"layer": "counts", "histology_key": "X_histology", "spatial_key": "spatial", "batch_key": "section"}


def _small(n_spots: int = 60, n_genes: int = 16, **kw) -> ad.AnnData:
    return varst.datasets.synthetic(n_spots=n_spots, n_genes=n_genes, n_sections=2, histology_dim=8, **kw)


def _unregister(adata: ad.AnnData) -> ad.AnnData:
    for key in [k for k in adata.uns if k.startswith("_scvi")]:
        del adata.uns[key]
    return adata


def _pearson_per_gene(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    t = truth - truth.mean(0)
    p = pred - pred.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (t * p).sum(0) / np.sqrt((t * t).sum(0) * (p * p).sum(0))


def _same_sparse(a, b) -> bool:
    return a.shape == b.shape and (sparse.csr_matrix(a) != sparse.csr_matrix(b)).nnz == 0


# --- fixtures ---
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread is as fast, and several threads on busy cores are many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data() -> SimpleNamespace:
    """Three sections; train on S0 + S1, hold out S2.

    The synthetic sections share one coordinate frame and one latent field, so coordinates alone would predict the
    held-out section; they are shuffled here so that histology is the only informative input.
    """
    full = varst.datasets.synthetic(n_spots=360, n_genes=N_GENES, n_sections=3, histology_dim=16, seed=0)
    rng = np.random.default_rng(1)
    full.obsm["spatial"] = full.obsm["spatial"][rng.permutation(full.n_obs)]
    train = full[full.obs["section"] != "S2"].copy()
    test = full[full.obs["section"] == "S2"].copy()
    return SimpleNamespace(train=train, test=test)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> SimpleNamespace:
    """One model trained through both stages on the training sections (serves most tests)."""
    adata = data.train.copy()
    VARST.setup_anndata(adata, **SETUP)
    model = VARST(adata, preset="cpu", vqvae_config=VQ, var_config=VAR, seed=0)
    h1 = model.train(stage=1, max_epochs=30, **FAST)
    stage1_dir = tmp_path_factory.mktemp("stage1") / "model"
    model.save(stage1_dir)
    vq_before = {k: v.clone() for k, v in model.module.vqvae.state_dict().items()}
    h2 = model.train(stage=2, max_epochs=30, **FAST)
    return SimpleNamespace(model=model, adata=adata, h1=h1, h2=h2, stage1_dir=stage1_dir, vq_before=vq_before)


@pytest.fixture
def query(data) -> ad.AnnData:
    """A fresh copy of the held-out section (with counts)."""
    return data.test.copy()


# --- setup_anndata ---
def test_setup_registers_and_init_builds(data):
    a = _small()
    VARST.setup_anndata(a, **SETUP)
    m = VARST(a, preset="cpu", vqvae_config=VQ, var_config=VAR)
    assert m.module.num_genes == 16 and m.module.histology_dim == 8
    assert m.gene_names_ == list(a.var_names)
    assert "VARST(" in repr(m)


def test_unregistered_adata_is_refused():
    with pytest.raises(ValueError, match="setup_anndata"):
        VARST(_small(), preset="cpu")


def test_missing_layer():
    with pytest.raises(KeyError, match="Layer 'raw' not found.*counts"):
        VARST.setup_anndata(_small(), layer="raw")


def test_missing_obsm_keys():
    with pytest.raises(KeyError, match="'X_uni' not found.*X_histology"):
        VARST.setup_anndata(_small(), layer="counts", histology_key="X_uni")
    with pytest.raises(KeyError, match="'coords' not found"):
        VARST.setup_anndata(_small(), layer="counts", spatial_key="coords")
    with pytest.raises(KeyError, match="batch_key 'slide'"):
        VARST.setup_anndata(_small(), layer="counts", batch_key="slide")


@pytest.mark.parametrize(
    ("value", "match"),
    [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"), (-1.0, "negative"), (0.5, "non-integer")],
)
def test_bad_counts(value, match):
    a = _small()
    x = a.layers["counts"].toarray().astype(np.float32)
    x[3, 2] = value
    a.layers["counts"] = x
    with pytest.raises(ValueError, match=match):
        VARST.setup_anndata(a, layer="counts")
    a.X = x  # the same checks on X
    with pytest.raises(ValueError, match=match):
        VARST.setup_anndata(a, layer=None)


def test_float_integer_counts_are_accepted():
    a = _small()
    a.layers["counts"] = a.layers["counts"].toarray().astype(np.float64)
    VARST.setup_anndata(a, layer="counts")


def test_histology_wrong_shape():
    a = _small()
    a.obsm["X_histology"] = np.zeros((a.n_obs, 2, 4))
    with pytest.raises(ValueError, match="2-D"):
        VARST.setup_anndata(a, layer="counts")
    a.obsm["X_histology"] = np.zeros((a.n_obs, 0))
    with pytest.raises(ValueError, match="zero columns"):
        VARST.setup_anndata(a, layer="counts")
    a.obsm["X_histology"] = np.full((a.n_obs, 8), np.inf)
    with pytest.raises(ValueError, match="infinite"):
        VARST.setup_anndata(a, layer="counts")


def test_partly_nan_histology_row_is_an_error():
    a = _small()
    a.obsm["X_histology"][4, :3] = np.nan
    with pytest.raises(ValueError, match="1 spots have partly-NaN histology"):
        VARST.setup_anndata(a, layer="counts")


def test_histology_check_in_blocks_matches_whole_array():
    """The block-wise check (no full-size boolean copies) finds problems in any block, not only the first."""
    from varst_scverse.model._validation import check_histology

    rng = np.random.default_rng(0)
    h = rng.normal(size=(50, 4))
    h[[3, 17, 49]] = np.nan
    np.testing.assert_array_equal(check_histology(h, "h", chunk_rows=7), check_histology(h, "h", chunk_rows=1000))
    assert check_histology(h, "h", chunk_rows=7).sum() == 47
    bad = h.copy()
    bad[45, 1] = np.nan
    bad[30, 0] = np.nan
    with pytest.raises(ValueError, match="2 spots have partly-NaN"):
        check_histology(bad, "h", chunk_rows=7)
    bad = h.copy()
    bad[44, 2] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        check_histology(bad, "h", chunk_rows=7)


def test_all_nan_histology_row_trains_stage1_only(monkeypatch):
    """An expression-only spot: accepted, used by stage 1, left out of stage 2, predicted as NaN."""
    import varst_scverse.model._varst as varst_mod

    a = _small(n_spots=64)
    missing = np.zeros(a.n_obs, dtype=bool)
    missing[[1, 5, 40]] = True
    a.obsm["X_histology"][missing] = np.nan
    VARST.setup_anndata(a, **SETUP)
    seen = []

    class Recording(varst_mod.SpotDataset):
        def __init__(self, arrays, indices):
            seen.append(np.asarray(indices))
            super().__init__(arrays, indices)

    monkeypatch.setattr(varst_mod, "SpotDataset", Recording)
    m = VARST(a, preset="cpu", vqvae_config=VQ, var_config=VAR)
    m.train(stage=1, max_epochs=1, train_size=1.0, **FAST)
    assert len(seen) == 1 and sorted(seen[0].tolist()) == list(range(a.n_obs))
    seen.clear()
    m.train(stage=2, max_epochs=1, train_size=1.0, **FAST)
    assert sorted(seen[0].tolist()) == np.flatnonzero(~missing).tolist()
    with pytest.warns(UserWarning, match="3 spots have no histology"):
        pred = m.predict_expression(n_samples=2)
    assert np.isnan(pred[missing]).all() and np.isfinite(pred[~missing]).all()
    assert (a.obsm[ADATA_KEYS.TOKENS][missing] == -1).all()
    assert np.isnan(a.layers[ADATA_KEYS.UNCERTAINTY][missing]).all()


def test_indices_out_of_range_and_warning_location(trained):
    """Spot positions past the end get our error (not numpy's), and our warnings point at the user's line."""
    m, a = trained.model, trained.adata
    for call in (m.predict_expression, m.get_tokens, m.reconstruct):
        with pytest.raises(ValueError, match=f"out of range for an AnnData with {a.n_obs} spots"):
            call(a, indices=[0, a.n_obs + 5])
    with pytest.raises(TypeError, match="integer positions or a boolean mask"):
        m.get_tokens(a, indices=[0.5, 1.0])
    np.testing.assert_array_equal(m.get_tokens(a, indices=[-1]), m.get_tokens(a, indices=[a.n_obs - 1]))
    q = a.copy()
    q.obsm["X_histology"][0] = np.nan
    with pytest.warns(UserWarning, match="1 spots have no histology") as rec:
        m.predict_expression(q, n_samples=0, add_to_adata=False)
    assert {w.filename for w in rec if "no histology" in str(w.message)} == {__file__}


def test_coordinates_wrong_shape_or_nan():
    a = _small()
    a.obsm["spatial"] = np.zeros((a.n_obs, 3))
    with pytest.raises(ValueError, match="2 columns"):
        VARST.setup_anndata(a, layer="counts")
    a.obsm["spatial"] = np.zeros((a.n_obs, 2))
    a.obsm["spatial"][7, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite coordinates"):
        VARST.setup_anndata(a, layer="counts")


def test_fewer_genes_than_the_scales_need():
    a = _small(n_genes=6)
    VARST.setup_anndata(a, layer="counts")
    with pytest.raises(ValueError, match="8 positions but there are only 6 genes"):
        VARST(a, preset="cpu", vqvae_config=VQ, var_config=VAR)
    b = _small(n_genes=16)
    VARST.setup_anndata(b, layer="counts")
    with pytest.raises(ValueError, match="32 positions but there are only 16 genes"):
        VARST(b, preset="cpu")  # default scales (1, 8, 32, G)


def test_empty_adata():
    a = _small()[:0].copy()
    with pytest.raises(ValueError, match="no spots"):
        VARST.setup_anndata(a, layer="counts")


def test_duplicated_obs_names():
    a = _small()
    a.obs_names = ["s0", "s0", *[f"s{i}" for i in range(2, a.n_obs)]]
    with pytest.raises(ValueError, match="Duplicated spot names.*obs_names_make_unique"):
        VARST.setup_anndata(a, layer="counts")


def test_backed_adata(tmp_path):
    path = tmp_path / "a.h5ad"
    _small().write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        with pytest.raises(ValueError, match="backed.*to_memory"):
            VARST.setup_anndata(backed, layer="counts")
    finally:
        backed.file.close()


def test_not_an_anndata():
    with pytest.raises(TypeError, match="Expected an AnnData"):
        VARST.setup_anndata(np.zeros((3, 3)))


# --- configs ---
def test_config_overrides_reach_the_module():
    a = _small()
    VARST.setup_anndata(a, **SETUP)
    m = VARST(a, preset="cpu", vqvae_config=VQ, var_config={**VAR, "num_layers": 1})
    assert m.module.vqvae_config["embed_dim"] == 16 and m.module.vqvae_config["vocab_size"] == 64
    assert m.module.var_config["vocab_size"] == 64  # one vocabulary for both stages
    assert len(m.module.var.blocks) == 1
    assert m.module.vqvae.quantizer.codebook.shape == (64, 16)
    assert m.module.var.head.out_features == 64


def test_unknown_config_key_lists_valid_keys():
    a = _small()
    VARST.setup_anndata(a, **SETUP)
    with pytest.raises(ValueError, match=r"Unknown vqvae_config key.*'embedding_dim'.*Valid keys.*'embed_dim'"):
        VARST(a, preset="cpu", vqvae_config={"embedding_dim": 8})
    with pytest.raises(ValueError, match=r"Unknown var_config key.*Valid keys.*'num_layers'"):
        VARST(a, preset="cpu", var_config={"layers": 2})
    with pytest.raises(ValueError, match="preset"):
        VARST(a, preset="laptop")
    with pytest.raises(ValueError, match="target"):
        VARST(a, preset="cpu", target="tpm")


def test_vocab_size_mismatch():
    a = _small()
    VARST.setup_anndata(a, **SETUP)
    with pytest.raises(ValueError, match="vocab_size must agree.*64.*128"):
        VARST(a, preset="cpu", vqvae_config={**VQ, "vocab_size": 64}, var_config={"vocab_size": 128})


# --- stage 1 ---
def test_stage2_refused_before_stage1(data):
    a = data.train.copy()
    VARST.setup_anndata(a, **SETUP)
    m = VARST(a, preset="cpu", vqvae_config=VQ, var_config=VAR)
    with pytest.raises(RuntimeError, match=r"stage-1 tokenizer.*train\(stage=1\).*stage1_ckpt"):
        m.train(stage=2, max_epochs=1)
    with pytest.raises(RuntimeError, match="Stage 1 is not trained"):
        m.get_tokens()
    with pytest.raises(RuntimeError, match=r"Stage 2 is not trained.*stage=1"):
        m.predict_expression(a)
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        m.train(stage=3)


def test_batch_memory_estimate_warns_before_the_machine_runs_out():
    from varst_scverse.model import _memory

    # stage 1 keeps about 80 [genes, embed_dim] float32 maps per spot: 256 x 10,000 genes x 64 needs ~52 GB
    need = _memory.training_batch_bytes(1, 256, 10_000, 64)
    assert need == 256 * 10_000 * 64 * 4 * 80
    assert _memory.training_batch_bytes(2, 256, 10_000, 64) < need
    assert _memory.training_batch_bytes(2, 256, 10_000, 64, aux_decode=False) < _memory.training_batch_bytes(
        2, 256, 10_000, 64
    )
    assert not _memory.warn_if_batch_too_large(1, 256, 250, 64, available=16 * 10**9)
    with pytest.warns(
        UserWarning, match=r"batch_size=256 and a tokenizer feature map of 10,000 positions needs about 52\.4 GB"
    ) as rec:
        assert _memory.warn_if_batch_too_large(1, 256, 10_000, 64, available=20 * 10**9)
    suggested = int(re.search(r"Pass batch_size=(\d+)", str(rec[0].message)).group(1))
    assert "gene_positions" in str(rec[0].message)  # the other way out: pool the genes into fewer positions
    assert 0 < suggested < 256
    assert _memory.training_batch_bytes(1, suggested, 10_000, 64) <= 0.8 * 20 * 10**9
    assert _memory.available_memory_bytes() is None or _memory.available_memory_bytes() > 0


def test_a_wide_unpooled_panel_warns_when_the_model_is_built():
    from varst_scverse.model import _memory

    assert not _memory.warn_if_map_is_wide(10_000, 256)  # pooled: any panel
    assert not _memory.warn_if_map_is_wide(_memory.WIDE_MAP_POSITIONS, _memory.WIDE_MAP_POSITIONS)
    with pytest.warns(UserWarning, match=r"one position per gene for 2,049 genes.*'gene_positions': 256"):
        assert _memory.warn_if_map_is_wide(2049, 2049)
    a = _small(n_spots=40, n_genes=2100)
    VARST.setup_anndata(a, **SETUP)
    with pytest.warns(UserWarning, match="one position per gene for 2,100 genes"):
        VARST(a, preset="cpu", vqvae_config=VQ, var_config=VAR)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        m = VARST(a, preset="cpu", vqvae_config={**VQ, "gene_positions": 256}, var_config=VAR)
    assert not [w for w in rec if "one position per gene" in str(w.message)]
    assert "genes=2100, positions=256, tokens=" in repr(m)
    small = _small()
    VARST.setup_anndata(small, **SETUP)
    assert "positions=" not in repr(VARST(small, preset="cpu", vqvae_config=VQ, var_config=VAR))


def test_train_warns_when_the_batch_exceeds_available_memory(data, monkeypatch):
    from varst_scverse.model import _memory

    a = data.train.copy()
    VARST.setup_anndata(a, **SETUP)
    m = VARST(a, preset="cpu", vqvae_config=VQ, var_config=VAR)
    monkeypatch.setattr(_memory, "available_memory_bytes", lambda: 10**5)
    with pytest.warns(UserWarning, match=r"Stage 1 with batch_size=32 and a tokenizer feature map of 32 positions"):
        m.train(stage=1, max_epochs=1, **FAST)
    # the estimate follows the feature map, which gene_positions shrinks
    pooled = VARST(a, preset="cpu", vqvae_config={**VQ, "gene_positions": 16}, var_config=VAR)
    with pytest.warns(UserWarning, match=r"feature map of 16 positions"):
        pooled.train(stage=1, max_epochs=1, **FAST)


def test_stage1_history_and_codebook_utilisation(trained):
    h = trained.h1
    assert len(h) == 30
    for col in ("train_loss", "train_recon_loss", "train_vq_loss", "codebook_utilisation", "codebook_perplexity"):
        assert col in h.columns
    assert h["train_loss"].iloc[-1] < 0.6 * h["train_loss"].iloc[0]
    assert h["codebook_utilisation"].iloc[-1] >= 0.3  # no code collapse: at least a third of the codes in use
    assert h["codebook_perplexity"].iloc[-1] > 10
    assert "validation_loss" in h.columns  # train_size=0.9 keeps a validation split
    assert trained.model.history_["stage1"] is not None


def test_reconstruction_improves_with_every_scale(trained):
    """The residual property: decoding from k+1 scales is at least as good as from k."""
    m, a = trained.model, trained.adata
    y = np.log1p(a.layers["counts"].toarray())
    mse = [float(((m.reconstruct(n_scales=k) - y) ** 2).mean()) for k in (1, 2, 3, 4)]
    for k in range(3):
        assert mse[k + 1] <= mse[k] + 1e-6, mse
    assert mse[-1] < 0.5 * mse[0], mse
    full = m.reconstruct()
    assert np.allclose(full, m.reconstruct(n_scales=4))
    assert np.allclose(a.layers[ADATA_KEYS.RECONSTRUCTED], full)


def test_tokens(trained):
    m, a = trained.model, trained.adata
    tok = m.get_tokens()
    assert tok.shape == (a.n_obs, 1 + 4 + 8 + N_GENES)
    assert tok.min() >= 0 and tok.max() < 64
    assert np.array_equal(a.obsm[ADATA_KEYS.TOKENS], tok)
    sub = m.get_tokens(indices=np.arange(5))
    assert np.array_equal(sub, tok[:5])
    assert m.codebook_usage().sum() == tok.size


def test_gene_order_is_clustered_and_reconstruct_follows_adata(trained):
    m, a = trained.model, trained.adata
    assert m.gene_names_ == list(a.var_names)
    order = m.module.gene_order.numpy()
    assert sorted(order.tolist()) == list(range(N_GENES))
    assert not np.array_equal(order, np.arange(N_GENES))  # the programmes are shuffled; clustering reorders them
    rec = m.reconstruct()
    perm = np.random.default_rng(0).permutation(N_GENES)
    shuffled = _unregister(a[:, perm].copy())
    rec_perm = m.reconstruct(shuffled)
    np.testing.assert_allclose(rec_perm, rec[:, perm], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(shuffled.layers[ADATA_KEYS.RECONSTRUCTED], rec[:, perm], rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="missing from this AnnData"):
        m.reconstruct(a[:, 1:].copy())


# --- stage 2 ---
def test_stage1_frozen_during_stage2(trained):
    after = trained.model.module.vqvae.state_dict()
    assert after.keys() == trained.vq_before.keys()
    for k, v in trained.vq_before.items():
        assert torch.equal(v, after[k]), k


def test_stage2_history(trained):
    h = trained.h2
    assert len(h) == 30
    for k in range(3):
        assert f"train_token_accuracy_scale{k}" in h.columns
    assert "train_aux_decode_loss" in h.columns
    assert h["train_ce_loss"].iloc[-1] < h["train_ce_loss"].iloc[0]


def test_stage2_ensemble_trains_each_member_and_averages_them(trained, query, tmp_path):
    a = trained.adata
    one = VARST(a, preset="cpu", vqvae_config=VQ, var_config=VAR, seed=0)
    ens = VARST(a, preset="cpu", vqvae_config=VQ, var_config={**VAR, "ensemble_size": 3}, seed=0)
    for m in (one, ens):
        m.module.load_stage1(trained.stage1_dir / "model.safetensors")
    with pytest.raises(ValueError, match="ensemble_size"):
        ens.train(stage=2, max_epochs=2, save_checkpoints=True, default_root_dir=str(tmp_path), **FAST)
    h1 = one.train(stage=2, max_epochs=8, **FAST)
    h = ens.train(stage=2, max_epochs=8, **FAST)
    assert h["member"].tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert ens.history_["stage2"]["member"].nunique() == 3
    # member 0 is trained exactly as the one-member model (same seed, split, batches); the others with seeds 1 and 2
    np.testing.assert_allclose(h.loc[h["member"] == 0, "train_loss"], h1["train_loss"], rtol=1e-5)
    assert not np.allclose(h.loc[h["member"] == 1, "train_loss"], h1["train_loss"])
    point = ens.predict_expression(query, n_samples=0, add_to_adata=False, ridge_blend=0.0)
    alone = one.predict_expression(query, n_samples=0, add_to_adata=False, ridge_blend=0.0)
    np.testing.assert_allclose(_member_prediction(ens, query, 0), alone, rtol=1e-5, atol=1e-5)
    mean = np.mean([_member_prediction(ens, query, k) for k in range(3)], axis=0)
    np.testing.assert_allclose(point, mean, rtol=1e-5, atol=1e-5)
    # persistence keeps every member
    ens.save(tmp_path / "ens")
    loaded = VARST.load(tmp_path / "ens", adata=a)
    assert loaded.module.n_members == 3
    np.testing.assert_array_equal(
        loaded.predict_expression(query, n_samples=0, add_to_adata=False),
        ens.predict_expression(query, n_samples=0, add_to_adata=False),
    )


def _member_prediction(model: VARST, query: ad.AnnData, k: int) -> np.ndarray:
    """Expected-value prediction (transformer alone) of member ``k`` of an ensemble, through a one-member copy."""
    one = VARST(model.adata, preset="cpu", vqvae_config=VQ, var_config=VAR, seed=0)
    with model.module.member(k):
        state = {n: v for n, v in model.module.state_dict().items() if not n.startswith("extra_members.")}
    one.module.load_state_dict(state)
    one.module.stage1_trained = one.module.stage2_trained = True
    one.module.set_training_stage(2)
    one.is_trained_ = {1: True, 2: True}
    return one.predict_expression(query, n_samples=0, add_to_adata=False, ridge_blend=0.0)


def test_get_model_info(trained):
    info = trained.model.get_model_info()
    for key in (
        "total_parameters",
        "stage1_parameters",
        "stage2_parameters",
        "current_stage",
        "vocab_size",
        "scales",
        "n_tokens",
        "vqvae_config",
        "var_config",
    ):
        assert key in info, key
    assert info["current_stage"] == 2
    assert info["vocab_size"] == 64
    assert info["scales"] == [1, 4, 8, N_GENES]
    assert info["n_tokens"] == 13 + N_GENES and info["n_generated_tokens"] == N_GENERATED
    assert info["stage1_parameters"] + info["stage2_parameters"] == info["total_parameters"] > 0
    assert info["vqvae_config"]["embed_dim"] == 16 and info["var_config"]["num_layers"] == 2
    assert info["epochs_trained"] == {"stage1": 30, "stage2": 30}


def test_predict_writes_documented_keys_and_leaves_counts(trained, query):
    m = trained.model
    x_before, counts_before = query.X.copy(), query.layers["counts"].copy()
    pred = m.predict_expression(query, n_samples=4)
    assert pred.shape == (query.n_obs, N_GENES) and np.isfinite(pred).all()
    np.testing.assert_array_equal(query.layers[ADATA_KEYS.PREDICTED], pred)
    unc = query.layers[ADATA_KEYS.UNCERTAINTY]
    assert unc.shape == pred.shape and (unc >= 0).all() and (unc > 0).any()
    tok = query.obsm[ADATA_KEYS.TOKENS]
    assert tok.shape == (query.n_obs, N_GENERATED) and tok.min() >= 0 and tok.max() < 64
    assert _same_sparse(query.X, x_before) and _same_sparse(query.layers["counts"], counts_before)
    no_spread = m.predict_expression(query, n_samples=0, uncertainty="model")
    np.testing.assert_allclose(no_spread, pred, rtol=1e-5, atol=1e-5)  # the point prediction does not sample
    assert (query.layers[ADATA_KEYS.UNCERTAINTY] == 0).all()
    # "total" without draws is the calibrated per-gene observation noise alone
    m.predict_expression(query, n_samples=0, uncertainty="total")
    noise = m.module.noise_std.numpy()
    assert (noise > 0).any()
    np.testing.assert_allclose(query.layers[ADATA_KEYS.UNCERTAINTY], np.broadcast_to(noise, pred.shape), rtol=1e-6)


def test_calibrated_noise_widens_intervals_towards_nominal_coverage(trained, query):
    m = trained.model
    truth = varst._targets.expression_target(query.layers["counts"])
    with_noise = m.predict_samples(query, n_samples=32)
    without = m.predict_samples(query, n_samples=32, add_noise=False)
    cov = [varst.tl.evaluate(truth, with_noise.mean(0), samples=s)["coverage_90"] for s in (with_noise, without)]
    assert cov[0] > cov[1] + 0.1  # token spread alone is far too narrow for observed counts
    assert 0.6 < cov[0] <= 1.0


def test_predict_follows_query_gene_order(trained, query):
    m = trained.model
    pred = m.predict_expression(query, n_samples=0, add_to_adata=False)
    perm = np.random.default_rng(2).permutation(N_GENES)
    shuffled = query[:, perm].copy()
    pred_perm = m.predict_expression(shuffled, n_samples=0)
    np.testing.assert_allclose(pred_perm, pred[:, perm], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(shuffled.layers[ADATA_KEYS.PREDICTED], pred[:, perm], rtol=1e-5, atol=1e-5)


def test_add_to_adata_false_writes_nothing(trained, query):
    layers, obsm, uns = set(query.layers), set(query.obsm), set(query.uns)
    pred = trained.model.predict_expression(query, n_samples=2, add_to_adata=False)
    assert pred.shape == (query.n_obs, N_GENES)
    assert set(query.layers) == layers and set(query.obsm) == obsm and set(query.uns) == uns


def test_predict_on_query_without_genes(trained, query):
    m = trained.model
    ref = m.predict_expression(query, n_samples=0, add_to_adata=False)
    bare = ad.AnnData(
        obs=query.obs[["section"]].copy(),
        obsm={"X_histology": query.obsm["X_histology"].copy(), "spatial": query.obsm["spatial"].copy()},
    )
    assert bare.n_vars == 0
    pred = m.predict_expression(bare, n_samples=2)
    assert pred.shape == (bare.n_obs, N_GENES)
    np.testing.assert_allclose(pred, ref, rtol=1e-5, atol=1e-5)
    df = bare.obsm[ADATA_KEYS.PREDICTED]
    assert isinstance(df, pd.DataFrame) and list(df.columns) == m.gene_names_
    assert list(df.index) == list(bare.obs_names)
    np.testing.assert_allclose(df.to_numpy(), pred)
    assert (bare.obsm[ADATA_KEYS.UNCERTAINTY].to_numpy() >= 0).all()
    assert bare.obsm[ADATA_KEYS.TOKENS].shape == (bare.n_obs, N_GENERATED)


def test_predict_on_query_with_unrelated_genes(trained, query):
    m = trained.model
    other = ad.AnnData(
        X=np.ones((query.n_obs, 3), dtype=np.float32),
        obs=query.obs[["section"]].copy(),
        var=pd.DataFrame(index=["GAPDH", "ACTB", "MYC"]),
        obsm={"X_histology": query.obsm["X_histology"].copy(), "spatial": query.obsm["spatial"].copy()},
    )
    pred = m.predict_expression(other, n_samples=0)
    assert pred.shape == (other.n_obs, N_GENES)
    assert list(other.obsm[ADATA_KEYS.PREDICTED].columns) == m.gene_names_
    assert ADATA_KEYS.PREDICTED not in other.layers
    assert np.array_equal(other.X, np.ones((other.n_obs, 3), dtype=np.float32))


def test_histology_width_mismatch_at_predict(trained, query):
    query.obsm["X_histology"] = np.zeros((query.n_obs, 5), dtype=np.float32)
    with pytest.raises(ValueError, match="5 features but the model was trained on 16"):
        trained.model.predict_expression(query)


def test_decode_options(trained, query):
    m = trained.model
    kw = {"add_to_adata": False}
    expected = m.predict_expression(query, decode="expected", n_samples=0, **kw)
    greedy1 = m.predict_expression(query, decode="greedy", n_samples=0, seed=1, **kw)
    greedy2 = m.predict_expression(query, decode="greedy", n_samples=0, seed=2, **kw)
    mos1 = m.predict_expression(query, decode="mean_of_samples", n_samples=3, seed=1, **kw)
    mos1b = m.predict_expression(query, decode="mean_of_samples", n_samples=3, seed=1, **kw)
    mos2 = m.predict_expression(query, decode="mean_of_samples", n_samples=3, seed=2, **kw)
    for p in (expected, greedy1, mos1):
        assert p.shape == (query.n_obs, N_GENES) and np.isfinite(p).all()
    np.testing.assert_array_equal(greedy1, greedy2)  # greedy does not sample
    np.testing.assert_array_equal(mos1, mos1b)  # seeded sampling is reproducible
    assert not np.allclose(mos1, mos2)
    assert not np.allclose(expected, greedy1)
    with pytest.raises(ValueError, match="decode"):
        m.predict_expression(query, decode="beam")
    with pytest.raises(ValueError, match="n_samples"):
        m.predict_expression(query, decode="mean_of_samples", n_samples=0)


def test_batching_and_guidance(trained, query):
    m = trained.model
    whole = m.predict_expression(query, n_samples=0, add_to_adata=False)
    chunked = m.predict_expression(query, n_samples=0, add_to_adata=False, batch_size=7)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
    guided = m.predict_expression(query, n_samples=2, cfg=2.0, add_to_adata=False)
    assert np.isfinite(guided).all() and not np.allclose(guided, whole)
    with pytest.raises(ValueError, match="batch_size"):
        m.predict_expression(query, batch_size=0)


def test_query_without_section_column_warns(trained, query):
    bare = ad.AnnData(obs=pd.DataFrame(index=query.obs_names), obsm={k: query.obsm[k].copy() for k in query.obsm})
    with pytest.warns(UserWarning, match="one section"):
        pred = trained.model.predict_expression(bare, n_samples=0)
    assert pred.shape == (query.n_obs, N_GENES) and np.isfinite(pred).all()


def test_kv_cache_matches_recompute_at_predict(trained, query):
    m = trained.model
    a = m.predict_expression(query, n_samples=2, add_to_adata=False, use_cache=True)
    b = m.predict_expression(query, n_samples=2, add_to_adata=False, use_cache=False)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("decode", ["expected", "greedy", "mean_of_samples"])
def test_return_prefixes(trained, query, decode):
    pred, prefixes = trained.model.predict_expression(
        query, n_samples=2, decode=decode, return_prefixes=True, add_to_adata=False
    )
    assert prefixes.shape == (3, query.n_obs, N_GENES)
    np.testing.assert_allclose(prefixes[-1], pred, rtol=1e-5, atol=1e-5)


def test_predict_indices_and_samples(trained, query):
    m = trained.model
    full = m.predict_expression(query, n_samples=0, add_to_adata=False)
    sub = m.predict_expression(query, indices=np.arange(10), n_samples=0)
    np.testing.assert_allclose(sub, full[:10], rtol=1e-5, atol=1e-5)
    assert ADATA_KEYS.PREDICTED not in query.layers  # a subset writes nothing
    samples = m.predict_samples(query, n_samples=3)
    assert samples.shape == (3, query.n_obs, N_GENES)


def test_learning_signal_beats_shuffled_histology(trained, query):
    """Held-out section: histology must carry signal the model learns; a shuffled-histology control must not.

    The control shares the trained stage 1 (loaded from disk) and trains stage 2 on the same spots with the histology
    rows permuted — so the only difference is whether histology matches expression.
    """
    truth = np.log1p(query.layers["counts"].toarray())
    r_model = np.nanmean(_pearson_per_gene(truth, trained.model.predict_expression(query, n_samples=0)))
    control_data = _unregister(trained.adata.copy())
    rng = np.random.default_rng(5)
    control_data.obsm["X_histology"] = control_data.obsm["X_histology"][rng.permutation(control_data.n_obs)]
    control = VARST.load(trained.stage1_dir, adata=control_data)
    assert control.module.stage1_trained and not control.module.stage2_trained
    control.train(stage=2, max_epochs=30, **FAST)
    r_control = np.nanmean(_pearson_per_gene(truth, control.predict_expression(query, n_samples=0)))
    assert r_model > 0.25, (r_model, r_control)
    assert r_model > r_control + 0.15, (r_model, r_control)


def test_pooled_gene_positions_learn_the_held_out_section(data, tmp_path):
    """A tokenizer whose feature map pools pairs of genes (gene_positions = G / 2) still learns every gene."""
    adata = data.train.copy()
    VARST.setup_anndata(adata, **SETUP)
    model = VARST(adata, preset="cpu", vqvae_config={**VQ, "gene_positions": N_GENES // 2}, var_config=VAR, seed=0)
    info = model.get_model_info()
    assert info["num_positions"] == N_GENES // 2 and info["scales"] == [1, 4, 8, N_GENES // 2]
    model.train(stage=1, max_epochs=30, **FAST)
    model.train(stage=2, max_epochs=30, **FAST)
    query = data.test.copy()
    truth = np.log1p(query.layers["counts"].toarray())
    pred = model.predict_expression(query, n_samples=0, add_to_adata=False)
    assert pred.shape == (query.n_obs, N_GENES)
    r = _pearson_per_gene(truth, pred)
    assert np.nanmean(r) > 0.25, r
    model.save(tmp_path / "pooled")
    loaded = VARST.load(tmp_path / "pooled", adata=adata)
    assert loaded.module.num_positions == N_GENES // 2
    np.testing.assert_array_equal(loaded.predict_expression(query, n_samples=0, add_to_adata=False), pred)


# --- persistence ---
def test_save_load_identity(trained, query, tmp_path):
    m, a = trained.model, trained.adata
    path = tmp_path / "saved"
    m.save(path)
    assert (path / "model.safetensors").is_file() and (path / "varst.json").is_file()
    loaded = VARST.load(path, adata=a)
    assert loaded.gene_names_ == m.gene_names_
    assert torch.equal(loaded.module.gene_order, m.module.gene_order)
    assert np.array_equal(loaded.get_tokens(a), m.get_tokens(a))
    assert loaded.is_trained_ == {1: True, 2: True}
    assert loaded.module.stage1_trained and loaded.module.stage2_trained
    pd.testing.assert_frame_equal(loaded.history_["stage1"], m.history_["stage1"], check_dtype=False)
    p1 = m.predict_expression(query, n_samples=2, seed=3, add_to_adata=False)
    p2 = loaded.predict_expression(query, n_samples=2, seed=3, add_to_adata=False)
    np.testing.assert_array_equal(p1, p2)
    assert loaded.get_model_info()["total_parameters"] == m.get_model_info()["total_parameters"]
    # a query without genes can be attached directly for prediction
    bare = ad.AnnData(obs=query.obs[["section"]].copy(), obsm={k: query.obsm[k].copy() for k in query.obsm})
    on_bare = VARST.load(path, adata=bare)
    np.testing.assert_array_equal(on_bare.predict_expression(n_samples=2, seed=3), p1)


def test_save_refuses_existing_dir(trained, tmp_path):
    target = tmp_path / "exists"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        trained.model.save(target)
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]  # no temporary directory left behind
    trained.model.save(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors", "varst.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_load_errors(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="varst.json"):
        VARST.load(tmp_path / "nothing")
    path = tmp_path / "m"
    trained.model.save(path)
    with pytest.raises(ValueError, match="adata="):
        VARST.load(path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated|readable"):
        VARST.load(path, adata=trained.adata)


def test_save_with_anndata(trained, tmp_path):
    path = tmp_path / "with_adata"
    trained.model.save(path, save_anndata=True)
    loaded = VARST.load(path)
    assert loaded.adata.n_obs == trained.adata.n_obs
    assert np.array_equal(loaded.get_tokens(), trained.model.get_tokens(trained.adata))


# --- determinism ---
def test_same_seed_gives_identical_stage1_history():
    def run(seed: int) -> pd.DataFrame:
        a = _small(n_spots=96, seed=4)
        VARST.setup_anndata(a, **SETUP)
        m = VARST(a, preset="cpu", vqvae_config=VQ, var_config=VAR, seed=seed)
        return m.train(stage=1, max_epochs=2, **FAST)

    first, second, other = run(0), run(0), run(1)
    pd.testing.assert_frame_equal(first, second, check_exact=True)
    assert not np.allclose(first["train_loss"], other["train_loss"])


class _ModeProbe:
    """A Lightning callback that records the training flags of the module's parts at every training batch."""

    def __new__(cls):
        import lightning.pytorch as lpl

        class Probe(lpl.Callback):
            def __init__(self) -> None:
                self.seen: set[tuple[int, bool, bool, bool]] = set()

            def on_train_batch_start(self, trainer, plan, batch, batch_idx) -> None:
                m = plan.module
                self.seen.add((m.current_stage, m.vqvae.training, m.var.training, m.condition.training))

        return Probe()


def test_training_runs_in_training_mode(data):
    """Dropout, the null condition and coordinate dropout act only in training mode: both stages must train in it
    (also a second stage-1 call after the module was put in eval mode), with the frozen tokenizer in eval mode."""
    adata = data.train.copy()
    VARST.setup_anndata(adata, **SETUP)
    model = VARST(adata, preset="cpu", vqvae_config=VQ, var_config=VAR, seed=0)
    probe = _ModeProbe()
    model.train(stage=1, max_epochs=1, callbacks=[probe], **FAST)
    model.train(stage=1, max_epochs=1, callbacks=[probe], **FAST)  # the module is in eval mode between the calls
    assert {s[:2] for s in probe.seen} == {(1, True)}
    probe = _ModeProbe()
    model.train(stage=2, max_epochs=2, callbacks=[probe], **FAST)
    assert probe.seen == {(2, False, True, True)}
    assert not model.module.training  # and back in eval mode for prediction


def test_average_last_epochs_keeps_the_mean_of_epoch_end_weights(data, monkeypatch):
    """Stage 2 with ``average_last_epochs=2`` ends on the mean of the weights at the ends of its last two epochs;
    the frozen tokenizer is untouched and the option refuses to combine with ``restore_best``."""
    import lightning.pytorch as lpl

    class Snapshots(lpl.Callback):
        def __init__(self) -> None:
            self.states: list[dict[str, torch.Tensor]] = []

        def on_train_epoch_end(self, trainer, plan) -> None:
            self.states.append({k: v.detach().clone() for k, v in plan.module.state_dict().items()})

    adata = data.train.copy()
    VARST.setup_anndata(adata, **SETUP)
    model = VARST(adata, preset="cpu", vqvae_config=VQ, var_config=VAR, seed=0)
    model.train(stage=1, max_epochs=1, **FAST)
    tokenizer = {k: v.clone() for k, v in model.module.vqvae.state_dict().items()}
    snaps = Snapshots()
    model.train(stage=2, max_epochs=3, train_size=1.0, average_last_epochs=2, callbacks=[snaps], **FAST)
    final = model.module.state_dict()
    name = next(k for k, v in final.items() if k.startswith("var.") and v.is_floating_point() and v.numel() > 10)
    expected = (snaps.states[1][name] + snaps.states[2][name]) / 2
    torch.testing.assert_close(final[name], expected)
    assert not torch.allclose(final[name], snaps.states[2][name])  # not simply the last epoch
    for k, v in model.module.vqvae.state_dict().items():
        assert torch.equal(v, tokenizer[k])
    with pytest.raises(ValueError, match="either restore_best"):
        model.train(stage=2, max_epochs=1, restore_best=True, average_last_epochs=2, **FAST)
    # the default: stage 2 averages the last quarter of its epochs, stage 1 and restore_best=True average nothing
    import varst_scverse.model._varst as varst_mod

    made = []

    class Recording(varst_mod.EpochWeightAverage):
        def __init__(self, n_epochs: int) -> None:
            made.append(n_epochs)
            super().__init__(n_epochs)

    monkeypatch.setattr(varst_mod, "EpochWeightAverage", Recording)
    model.train(stage=2, max_epochs=8, **FAST)
    model.train(stage=2, max_epochs=2, restore_best=True, **FAST)
    model.train(stage=1, max_epochs=1, **FAST)
    assert made == [2]
    with pytest.raises(ValueError, match="average_last_epochs must be"):
        model.train(stage=2, max_epochs=1, average_last_epochs=-1, **FAST)


def test_cosine_lr_schedule(data):
    from varst_scverse.model._training import lr_factor

    assert lr_factor(0, 4, None) == pytest.approx(0.25)
    assert lr_factor(10, 4, None) == 1.0
    assert lr_factor(4, 4, 104) == pytest.approx(1.0)
    assert lr_factor(54, 4, 104) == pytest.approx(0.525)
    assert lr_factor(104, 4, 104) == pytest.approx(0.05)
    adata = data.train.copy()
    VARST.setup_anndata(adata, **SETUP)
    model = VARST(adata, preset="cpu", vqvae_config=VQ, var_config=VAR, seed=0)
    import lightning.pytorch as lpl

    class LR(lpl.Callback):
        def __init__(self) -> None:
            self.lrs: list[float] = []

        def on_train_batch_start(self, trainer, plan, batch, batch_idx) -> None:
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    cb = LR()
    model.train(stage=1, max_epochs=3, callbacks=[cb], lr_schedule="cosine", **FAST)
    assert cb.lrs[0] == pytest.approx(FAST["lr"])
    assert all(b < a for a, b in zip(cb.lrs, cb.lrs[1:], strict=False))
    assert cb.lrs[-1] < 0.2 * FAST["lr"]
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        model.train(stage=1, max_epochs=1, lr_schedule="linear", **FAST)


def test_noise_calibration_is_capped(data, monkeypatch):
    """The noise calibration after stage 2 generates for a bounded random subset, not for every training spot."""
    import varst_scverse.model._varst as mv

    adata = data.train.copy()
    VARST.setup_anndata(adata, **SETUP)
    model = VARST(adata, preset="cpu", vqvae_config=VQ, var_config=VAR, seed=0)
    model.train(stage=1, max_epochs=1, **FAST)
    monkeypatch.setattr(mv, "_CALIBRATION_MAX_SPOTS", 50)
    seen: list[int] = []
    generate = model.module.generate

    def counting(hist, *args, **kw):
        seen.append(hist.shape[0])
        return generate(hist, *args, **kw)

    monkeypatch.setattr(model.module, "generate", counting)
    model.train(stage=2, max_epochs=1, train_size=1.0, **FAST)
    assert seen and max(seen) <= 50 and sum(seen) == 2 * 50  # one expected-value and one sampling pass
    noise = model.module.noise_std
    assert torch.isfinite(noise).all() and (noise >= 0).all()
    assert (noise > 0).float().mean() > 0.5  # calibrated (a gene whose draws already cover its residuals gets 0)


# --- the ridge probe blended into predictions (var_config["ridge_blend"]) ---
def test_ridge_probe_is_fitted_after_stage2_and_blended(trained, query):
    m, a = trained.model, trained.adata
    info = m.get_model_info()["ridge_probe"]
    assert info["fitted"] and info["alpha"] > 0 and info["blend"] == 0.5  # the cpu preset's default
    kw = {"n_samples": 0, "add_to_adata": False}
    default = m.predict_expression(query, **kw)
    alone = m.predict_expression(query, ridge_blend=0.0, **kw)
    probe = m.predict_expression(query, ridge_blend=1.0, **kw)
    np.testing.assert_allclose(default, 0.5 * alone + 0.5 * probe, rtol=1e-5, atol=1e-5)
    assert np.abs(alone - probe).max() > 1e-3  # two different predictors
    # the probe is ridge with a leave-one-section-out alpha on every training spot with histology
    X = np.asarray(a.obsm["X_histology"], dtype=np.float64)
    ridge = varst.tl.RidgeCV().fit(X, m._target(a), groups=a.obs["section"].to_numpy())
    assert info["alpha"] == pytest.approx(ridge.alpha_)
    ref = ridge.predict(np.asarray(query.obsm["X_histology"], dtype=np.float64))
    np.testing.assert_allclose(probe, ref, rtol=1e-4, atol=1e-4)
    # the draws carry the blend too: their mean is near the blended point prediction
    draws = m.predict_samples(query, n_samples=16, add_noise=False)
    assert np.abs(draws.mean(0) - default).mean() < np.abs(draws.mean(0) - alone).mean()
    with pytest.raises(ValueError, match="ridge_blend must lie in"):
        m.predict_expression(query, ridge_blend=1.5, **kw)


def test_ridge_blend_off_and_bad_values():
    a = _small(seed=3)
    VARST.setup_anndata(a, **SETUP)
    with pytest.raises(ValueError, match="ridge_blend"):
        VARST(a, preset="cpu", vqvae_config=VQ, var_config={**VAR, "ridge_blend": -0.1})
    m = VARST(a, preset="cpu", vqvae_config=VQ, var_config={**VAR, "ridge_blend": 0.0}, seed=0)
    m.train(stage=1, max_epochs=2, **FAST)
    m.train(stage=2, max_epochs=2, **FAST)
    assert not m.module.has_probe and m.get_model_info()["ridge_probe"]["fitted"] is False
    kw = {"n_samples": 0, "add_to_adata": False}
    np.testing.assert_array_equal(m.predict_expression(a, **kw), m.predict_expression(a, ridge_blend=1.0, **kw))
    # the seed preset keeps the seed model: no probe unless asked for
    from varst_scverse.module import resolve_configs

    assert resolve_configs("seed", None, None)[1]["ridge_blend"] == 0.0


def test_checkpoint_without_probe_buffers_loads_as_transformer_alone(trained, query, tmp_path):
    from varst_scverse.module import TwoStageVARST, load_checkpoint, save_checkpoint

    m = trained.model
    m.save(tmp_path / "m")
    tensors, meta = load_checkpoint(tmp_path / "m" / "model.safetensors")
    old = {k: v for k, v in tensors.items() if not k.startswith("probe_")}
    meta = {k: v for k, v in meta.items() if k not in ("format", "version", "sha256")}
    meta["var_config"] = {k: v for k, v in meta["var_config"].items() if k != "ridge_blend"}
    save_checkpoint(tmp_path / "old.safetensors", old, meta)  # as written before the probe existed
    module = TwoStageVARST.load_complete_model(tmp_path / "old.safetensors").eval()
    assert not module.has_probe and module.var_config["ridge_blend"] == 0.0
    sp = m._spatial_inputs(query)
    b = m._batch_tensors(sp, np.arange(query.n_obs))
    with torch.inference_mode():
        got = module.generate(b["histology"], b["coords"], b.get("neighbours"))["expression"][0].numpy()
    np.testing.assert_allclose(got, m.predict_expression(query, n_samples=0, ridge_blend=0.0, add_to_adata=False))


def test_generation_batches_shrink_for_wide_gene_panels(trained, query, monkeypatch):
    from varst_scverse.model import _memory
    from varst_scverse.model._varst import _spots_per_batch

    # 512 sequences of 10,000 genes would need ~13 GB of feature maps: capped under the 2 GB budget
    fit = _memory.generation_sequences_that_fit(10_000, 64)
    assert 0 < fit < 512 and fit * 10_000 * 64 * 4 * _memory._MAPS_GENERATION <= _memory.GENERATION_BUDGET_BYTES
    assert _memory.generation_sequences_that_fit(250, 64) > 512  # small panels keep the asked batch
    model = trained.model
    assert _spots_per_batch(512, 8, model.module) == 64
    expected = model.predict_expression(query, n_samples=0, add_to_adata=False)
    # a budget of 3 sequences: 3 spots per batch without sampling, 1 with 4 draws; the same predictions
    per_seq = model.module.num_genes * model.module.vqvae_config["embed_dim"] * 4 * _memory._MAPS_GENERATION
    monkeypatch.setattr(_memory, "GENERATION_BUDGET_BYTES", 3 * per_seq)
    assert _spots_per_batch(512, 1, model.module) == 3 and _spots_per_batch(512, 4, model.module) == 1
    np.testing.assert_allclose(
        model.predict_expression(query, n_samples=0, add_to_adata=False), expected, rtol=1e-5, atol=1e-6
    )
    assert model.predict_samples(query, n_samples=4).shape == (4, query.n_obs, model.module.num_genes)
