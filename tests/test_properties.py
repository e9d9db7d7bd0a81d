"""Property tests: random shapes, dtypes and sparsity either give a correct result or one of our clear errors."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import sparse

import varst_scverse as varst
from varst_scverse import VARST
from varst_scverse._constants import ADATA_KEYS

VQ = {"vocab_size": 32, "embed_dim": 8, "hidden_dim": 16, "gene_mixing_dim": 8, "scales": (1, 2, 4, None)}
VAR = {"embed_dim": 16, "num_heads": 2, "num_layers": 1, "feedforward_dim": 32, "condition_embed_dim": 16}
N_GENES, HIST = 12, 6
OUR_ERRORS = (ValueError, KeyError, TypeError)
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def model():
    adata = varst.datasets.synthetic(n_spots=80, n_genes=N_GENES, n_sections=2, histology_dim=HIST, seed=3)
    VARST.setup_anndata(adata, layer="counts", batch_key="section")
    m = VARST(adata, preset="cpu", vqvae_config=VQ, var_config=VAR)
    m.train(stage=1, max_epochs=2, batch_size=32, enable_progress_bar=False)
    m.train(stage=2, max_epochs=2, batch_size=32, enable_progress_bar=False)
    return m


def _adata(n_spots, n_genes, dtype, density, hist_dtype, hist_dim, seed, as_sparse):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(2.0, size=(n_spots, n_genes)) * (rng.random((n_spots, n_genes)) < density)
    counts = counts.astype(dtype)
    x = sparse.csr_matrix(counts) if as_sparse and dtype != np.float16 else counts  # scipy has no float16
    a = ad.AnnData(X=x.copy())
    a.layers["counts"] = x
    a.var_names = [f"gene{i}" for i in range(n_genes)]
    a.obs["section"] = rng.choice(["S0", "S1"], size=n_spots)
    a.obsm[ADATA_KEYS.HISTOLOGY] = rng.normal(size=(n_spots, hist_dim)).astype(hist_dtype)
    a.obsm[ADATA_KEYS.SPATIAL] = rng.uniform(0, 1000, size=(n_spots, 2))
    return a


inputs = st.fixed_dictionaries(
    {
        "n_spots": st.integers(1, 40),
        "n_genes": st.sampled_from([0, 3, N_GENES]),
        "dtype": st.sampled_from([np.int32, np.int64, np.float16, np.float32, np.float64]),
        "density": st.floats(0.0, 1.0),
        "hist_dtype": st.sampled_from([np.float16, np.float32, np.float64]),
        "hist_dim": st.sampled_from([HIST, HIST + 1]),
        "seed": st.integers(0, 1000),
        "as_sparse": st.booleans(),
    }
)


@SETTINGS
@given(p=inputs)
def test_setup_anndata_accepts_or_refuses_clearly(p):
    a = _adata(**p)
    x_before = a.layers["counts"].copy()
    try:
        VARST.setup_anndata(a, layer="counts", batch_key="section")
    except OUR_ERRORS as err:
        assert str(err)  # a message, not an internals error
        return
    # registration never changes the user's data
    same = (x_before != a.layers["counts"]).nnz == 0 if sparse.issparse(x_before) else (x_before == a.layers["counts"])
    assert np.all(same)


@SETTINGS
@given(p=inputs)
def test_get_tokens_and_predict_accept_or_refuse_clearly(model, p):
    a = _adata(**p)
    try:
        tokens = model.get_tokens(a)
    except OUR_ERRORS as err:
        assert str(err)
        assert p["n_genes"] != N_GENES or p["n_spots"] == 0
    else:
        assert tokens.shape == (a.n_obs, model.module.n_tokens)
        assert tokens.min() >= 0 and tokens.max() < VQ["vocab_size"]
    try:
        pred = model.predict_expression(a, n_samples=2)
    except OUR_ERRORS as err:
        assert str(err)
        assert p["hist_dim"] != HIST
    else:
        assert p["hist_dim"] == HIST
        assert pred.shape == (a.n_obs, N_GENES) and np.isfinite(pred).all()
        assert (a.layers[ADATA_KEYS.UNCERTAINTY][:, :N_GENES] >= 0).all() if p["n_genes"] == N_GENES else True
