"""Tests of varst_scverse.tl: metrics and baselines."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse, stats
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from varst_scverse._constants import ADATA_KEYS
from varst_scverse._targets import expression_target
from varst_scverse.tl import (
    BASELINES,
    DepthOracle,
    KNNRetrieval,
    MeanPredictor,
    MLPBaseline,
    RidgeCV,
    RidgeProbe,
    baseline_predict,
    evaluate,
    interval_coverage,
    pearson_per_gene,
)


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Small problems: one BLAS thread is as fast and immune to oversubscribed CI cores."""
    with threadpool_limits(limits=1):
        yield


def _pair(n=60, g=25, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(n, g))
    pred = 0.6 * truth + rng.normal(size=(n, g))
    return truth, pred


def _latent_data(noise, p, n=600, g=20, n_sections=4, seed=0):
    """Features and genes driven by a 5-d latent; ``noise`` is the feature noise."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 5))
    X = z @ rng.normal(size=(5, p)) + noise * rng.normal(size=(n, p))
    Y = z @ rng.normal(size=(5, g)) + 0.5 * rng.normal(size=(n, g))
    groups = np.repeat(np.arange(n_sections), n // n_sections)
    return X, Y, groups


# --------------------------------------------------------------------------------------------------- metrics


def test_pearson_matches_scipy():
    truth, pred = _pair()
    expected = np.array([stats.pearsonr(truth[:, j], pred[:, j])[0] for j in range(truth.shape[1])])
    np.testing.assert_allclose(pearson_per_gene(truth, pred), expected, atol=1e-12)
    res = evaluate(truth, pred)
    np.testing.assert_allclose(res["per_gene_pearson"], expected, atol=1e-12)
    assert res["mean_pearson"] == pytest.approx(expected.mean())
    assert res["median_pearson"] == pytest.approx(np.median(expected))
    assert res["frac_genes_r_gt_0.3"] == pytest.approx(np.mean(expected > 0.3))
    assert res["mse"] == pytest.approx(np.mean((pred - truth) ** 2))
    assert res["mae"] == pytest.approx(np.mean(np.abs(pred - truth)))
    assert res["n_genes_evaluated"] == truth.shape[1] and res["n_genes_constant"] == 0
    top = np.sort(expected)[::-1]
    assert res["pcc_10"] == pytest.approx(top[:10].mean())
    assert res["pcc_50"] == pytest.approx(top.mean())  # fewer than 50 genes: all of them
    assert "optimistic" in res["pcc_note"]
    assert res["pcc_10"] >= res["mean_pearson"]


def test_pearson_float32_and_sparse_inputs():
    truth, pred = _pair(seed=1)
    ref = pearson_per_gene(truth, pred)
    np.testing.assert_allclose(pearson_per_gene(truth.astype(np.float32), pred.astype(np.float32)), ref, atol=1e-6)
    t = np.abs(truth)
    np.testing.assert_allclose(pearson_per_gene(sparse.csr_matrix(t), pred), pearson_per_gene(t, pred), atol=1e-12)


def test_constant_genes_excluded_and_counted():
    truth, pred = _pair(g=10, seed=2)
    truth[:, 0] = 3.0  # constant in truth
    pred[:, 1] = 0.7  # constant in prediction
    truth[:, 2] = 0.0
    pred[:, 2] = 0.0  # constant in both
    with np.errstate(all="raise"):  # no division warnings on the way
        res = evaluate(truth, pred)
    r = res["per_gene_pearson"]
    assert np.isnan(r[:3]).all() and np.isfinite(r[3:]).all()
    assert res["n_genes_constant"] == 3
    assert res["n_genes_evaluated"] == 7
    assert res["n_genes_constant_truth"] == 2 and res["n_genes_constant_pred"] == 2
    assert res["mean_pearson"] == pytest.approx(np.nanmean(r))
    # scoring prediction-constant genes as r = 0 instead
    res0 = evaluate(truth, pred, constant_pred="zero")
    assert res0["n_genes_evaluated"] == 8
    assert res0["mean_pearson"] == pytest.approx(np.nansum(r) / 8)


def test_all_constant_prediction_gives_nan_with_warning():
    truth, _ = _pair(g=5, seed=3)
    pred = MeanPredictor().fit(truth, truth).predict(truth)
    with pytest.warns(RuntimeWarning, match="No gene varies"):
        res = evaluate(truth, pred)
    assert np.isnan(res["mean_pearson"]) and res["n_genes_constant"] == 5
    assert res["mse"] == pytest.approx(np.mean(truth.var(axis=0)))


def test_per_gene_frame_uses_gene_names():
    truth, pred = _pair(g=4)
    names = ["A", "B", "C", "D"]
    res = evaluate(truth, pred, gene_names=names)
    df = res["per_gene"]
    assert isinstance(df, pd.DataFrame) and list(df.index) == names
    np.testing.assert_allclose(df["pearson"].to_numpy(), res["per_gene_pearson"])
    assert set(df.columns) >= {"pearson", "mse", "mae", "constant_truth", "constant_pred"}


def test_coverage_of_samples_from_true_distribution():
    rng = np.random.default_rng(4)
    n, g, s = 400, 25, 200
    mu = rng.normal(size=(n, g))
    sd = rng.uniform(0.5, 1.5, size=(n, g))
    truth = mu + sd * rng.normal(size=(n, g))
    samples = mu + sd * rng.normal(size=(s, n, g))
    res = evaluate(truth, mu, samples=samples)
    assert res["coverage_90"] == pytest.approx(0.9, abs=0.015)
    assert res["interval_width"] == pytest.approx(2 * 1.6449 * sd.mean(), rel=0.05)
    cov50, _ = interval_coverage(truth, samples, interval=0.5)
    assert cov50 == pytest.approx(0.5, abs=0.02)
    assert "coverage_50" in evaluate(truth, mu, samples=samples, interval=0.5)
    over_confident = mu + 0.3 * sd * rng.normal(size=(s, n, g))
    assert interval_coverage(truth, over_confident)[0] < 0.5
    # few draws: still about nominal (numpy's default interpolation would give about 0.85 with 32 and 0.81 with 16)
    assert interval_coverage(truth, samples[:32])[0] == pytest.approx(0.9, abs=0.02)
    assert interval_coverage(truth, samples[:16])[0] == pytest.approx(15 / 17, abs=0.02)  # the draws' range


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"truth": np.zeros((5, 3)), "pred": np.zeros((5, 4))}, "must match"),
        ({"truth": np.zeros((5, 3)), "pred": np.full((5, 3), np.nan)}, "NaN"),
        ({"truth": np.zeros(5), "pred": np.zeros(5)}, "2-D"),
        ({"truth": np.zeros((1, 3)), "pred": np.zeros((1, 3))}, "at least 2 spots"),
        ({"truth": np.eye(3), "pred": np.eye(3), "gene_names": ["a"]}, "gene_names"),
        ({"truth": np.eye(3), "pred": np.eye(3), "samples": np.zeros((4, 3, 2))}, "samples must have shape"),
        ({"truth": np.eye(3), "pred": np.eye(3), "samples": np.zeros((1, 3, 3))}, "at least 2 draws"),
        ({"truth": np.eye(3), "pred": np.eye(3), "samples": np.zeros((4, 3, 3)), "interval": 1.5}, "interval"),
        ({"truth": np.eye(3), "pred": np.eye(3), "pcc_k": (0,)}, "pcc_k"),
        ({"truth": np.eye(3), "pred": np.eye(3), "constant_pred": "drop"}, "constant_pred"),
    ],
)
def test_evaluate_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate(**kwargs)


# --------------------------------------------------------------------------------------------------- ridge


def test_ridge_probe_matches_hest_pipeline():
    X, Y, _ = _latent_data(1.0, p=40, n=120, g=6)
    probe = RidgeProbe(n_components=256).fit(X, Y)
    assert probe.n_components_ == 40  # capped at min(n_samples, n_features)
    assert probe.alpha_ == pytest.approx(100 / (40 * 6))
    ref = make_pipeline(StandardScaler(), PCA(40, random_state=0), Ridge(alpha=probe.alpha_)).fit(X, Y)
    np.testing.assert_allclose(probe.predict(X[:20]), ref.predict(X[:20]), atol=1e-8)
    # fewer spots than components: capped at n_samples
    assert RidgeProbe().fit(X[:30], Y[:30]).n_components_ == 30


def test_ridge_cv_matches_sklearn_ridge_at_chosen_alpha():
    X, Y, g = _latent_data(2.0, p=30, n=200, g=5)
    cv = RidgeCV().fit(X, Y, groups=g)
    assert cv.cv_strategy_ == "leave-one-group-out" and cv.cv_scores_.shape == (13, 4)
    ref = make_pipeline(StandardScaler(), Ridge(alpha=cv.alpha_)).fit(X, Y)
    np.testing.assert_allclose(cv.predict(X[:15]), ref.predict(X[:15]), atol=1e-8)
    # more features than spots: the kernel path
    Xw, Yw, gw = _latent_data(2.0, p=150, n=80, g=5)
    cvw = RidgeCV().fit(Xw, Yw, groups=gw)
    refw = make_pipeline(StandardScaler(), Ridge(alpha=cvw.alpha_)).fit(Xw, Yw)
    np.testing.assert_allclose(cvw.predict(Xw[:15]), refw.predict(Xw[:15]), atol=1e-8)
    # single section or no groups: K-fold over spots
    assert RidgeCV(n_splits=3).fit(X, Y, groups=np.zeros(len(X))).cv_strategy_ == "kfold"
    assert RidgeCV(n_splits=3).fit(X, Y).cv_scores_.shape == (13, 3)


def test_ridge_cv_regularises_noisy_wide_features_and_beats_probe():
    Xc, Yc, gc = _latent_data(0.1, p=20)
    Xn, Yn, gn = _latent_data(5.0, p=300)
    tr, te = slice(0, 400), slice(400, None)  # sections 0-1 vs 2-3 (held out)
    clean = RidgeCV().fit(Xc[tr], Yc[tr], groups=gc[tr])
    noisy = RidgeCV().fit(Xn[tr], Yn[tr], groups=gn[tr])
    assert noisy.alpha_ > clean.alpha_
    probe = RidgeProbe().fit(Xn[tr], Yn[tr])
    r_cv = evaluate(Yn[te], noisy.predict(Xn[te]))["mean_pearson"]
    r_probe = evaluate(Yn[te], probe.predict(Xn[te]))["mean_pearson"]
    assert r_cv > r_probe + 0.03


def test_ridge_cv_mse_scoring_and_bad_args():
    X, Y, g = _latent_data(1.0, p=10, n=80, g=3)
    assert RidgeCV(scoring="mse").fit(X, Y, groups=g).alpha_ > 0
    with pytest.raises(ValueError, match="scoring"):
        RidgeCV(scoring="r2").fit(X, Y)
    with pytest.raises(ValueError, match="alphas"):
        RidgeCV(alphas=[-1.0]).fit(X, Y)


# --------------------------------------------------------------------------------------------------- other baselines


def test_knn_recovers_neighbours_mean():
    rng = np.random.default_rng(5)
    n, p, g, k = 200, 8, 4, 10
    X = rng.normal(size=(n, p))
    Y = rng.normal(size=(n, g))
    Xq = rng.normal(size=(7, p))
    knn = KNNRetrieval(k=k).fit(X, Y)
    sc = StandardScaler().fit(X)
    a = sc.transform(X)
    b = sc.transform(Xq)
    sim = (b / np.linalg.norm(b, axis=1, keepdims=True)) @ (a / np.linalg.norm(a, axis=1, keepdims=True)).T
    nn = np.argsort(-sim, axis=1)[:, :k]
    np.testing.assert_allclose(knn.predict(Xq), Y[nn].mean(axis=1), atol=1e-12)
    assert set(knn.kneighbors(Xq)[0]) == set(nn[0])
    # k larger than the training set: the global mean
    np.testing.assert_allclose(KNNRetrieval(k=500).fit(X, Y).predict(Xq), np.tile(Y.mean(0), (7, 1)), atol=1e-12)
    # small chunks give the same answer
    np.testing.assert_allclose(KNNRetrieval(k=k, chunk_size=2).fit(X, Y).predict(Xq), knn.predict(Xq))


def test_depth_oracle_fits_depth_driven_synthetic():
    rng = np.random.default_rng(6)
    total = rng.lognormal(7, 0.8, size=300)
    x = np.log1p(total)
    a, b = rng.normal(size=5), rng.uniform(0.2, 1.0, size=5)
    Y = a + b * x[:, None] + 0.05 * rng.normal(size=(300, 5))
    oracle = DepthOracle().fit(x, Y)
    np.testing.assert_allclose(oracle.slope_, b, atol=0.02)
    np.testing.assert_allclose(oracle.intercept_, a, atol=0.2)
    assert evaluate(Y, oracle.predict(x[:, None]))["mean_pearson"] > 0.95
    with pytest.raises(ValueError, match="one feature"):
        DepthOracle().fit(np.c_[x, x], Y)


def test_mlp_learns_and_is_seeded():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(400, 6))
    Y = np.c_[X[:, 0] ** 2, np.abs(X[:, 1]), X[:, 2] * X[:, 3]] + 0.1 * rng.normal(size=(400, 3))
    state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    kw = {"hidden_dims": (64,), "max_epochs": 60, "lr": 3e-3, "random_state": 0}
    m1 = MLPBaseline(**kw).fit(X[:300], Y[:300])
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert torch.get_num_threads() == threads
    p1 = m1.predict(X[300:])
    assert evaluate(Y[300:], p1)["mean_pearson"] > 0.8  # a linear model scores ~0 on these genes
    assert evaluate(Y[300:], RidgeCV().fit(X[:300], Y[:300]).predict(X[300:]))["mean_pearson"] < 0.3
    p2 = MLPBaseline(**kw).fit(X[:300], Y[:300]).predict(X[300:])
    np.testing.assert_allclose(p1, p2, atol=1e-6)
    assert 1 <= m1.n_epochs_ <= 60


def test_estimator_input_errors():
    X, Y, _ = _latent_data(1.0, p=5, n=40, g=2)
    with pytest.raises(RuntimeError, match="not fitted"):
        RidgeProbe().predict(X)
    fitted = RidgeProbe().fit(X, Y)
    with pytest.raises(ValueError, match="features"):
        fitted.predict(X[:, :3])
    Xbad = X.copy()
    Xbad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        RidgeCV().fit(Xbad, Y)
    with pytest.raises(ValueError, match="rows"):
        MeanPredictor().fit(X, Y[:10])
    with pytest.raises(ValueError, match="groups"):
        RidgeCV().fit(X, Y, groups=np.zeros(3))


# --------------------------------------------------------------------------------------------------- AnnData


def _adatas(seed=8, n_train=120, n_query=40, p=12, g=6):
    rng = np.random.default_rng(seed)
    n = n_train + n_query
    z = rng.normal(size=(n, 3))
    H = z @ rng.normal(size=(3, p)) + 0.3 * rng.normal(size=(n, p))
    rate = np.exp(1.5 + z @ rng.normal(scale=0.5, size=(3, g + 2)))
    counts = rng.poisson(rate).astype(np.float32)
    genes = [f"g{i}" for i in range(g + 2)]

    def make(sl, sections):
        a = ad.AnnData(
            X=np.zeros((sl.stop - sl.start, g + 2), dtype=np.float32),
            var=pd.DataFrame(index=genes),
            obs=pd.DataFrame({ADATA_KEYS.SECTION: sections}, index=[f"s{i}" for i in range(sl.start, sl.stop)]),
        )
        a.layers[ADATA_KEYS.COUNTS_LAYER] = sparse.csr_matrix(counts[sl])
        a.obsm[ADATA_KEYS.HISTOLOGY] = H[sl]
        return a

    train = make(slice(0, n_train), np.repeat(["A", "B", "C"], n_train // 3))
    query = make(slice(n_train, n), ["Q"] * n_query)
    return train, query, counts[n_train:]


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_baseline_predict_every_method(method):
    train, query, _ = _adatas()
    kwargs = {"max_epochs": 5, "hidden_dims": (16,)} if method == "mlp" else {}
    out = baseline_predict(method, train, query, genes=["g3", "g0", "g1"], **kwargs)
    assert out.shape == (query.n_obs, 3) and out.dtype == np.float32 and np.isfinite(out).all()


def test_baseline_predict_matches_array_api_and_gene_order():
    train, query, query_counts = _adatas()
    genes = ["g4", "g1", "g2"]
    out = baseline_predict("ridge_cv", train, query, genes=genes)
    idx = [4, 1, 2]
    cnt = train.layers[ADATA_KEYS.COUNTS_LAYER].toarray()
    Y = expression_target(cnt[:, idx])
    ref = RidgeCV(random_state=0).fit(
        train.obsm[ADATA_KEYS.HISTOLOGY], Y, groups=train.obs[ADATA_KEYS.SECTION].to_numpy()
    )
    np.testing.assert_allclose(out, ref.predict(query.obsm[ADATA_KEYS.HISTOLOGY]), rtol=1e-5, atol=1e-5)
    assert ref.cv_strategy_ == "leave-one-group-out"
    # cp10k target uses totals over all genes
    out_cp = baseline_predict("mean", train, query, genes=genes, target="cp10k")
    Ycp = expression_target(cnt[:, idx], kind="cp10k", total_counts=cnt.sum(1))
    np.testing.assert_allclose(out_cp[0], Ycp.mean(0), rtol=1e-5)
    # default genes: all of train, in train order
    assert baseline_predict("mean", train, query).shape == (query.n_obs, train.n_vars)
    # depth oracle: the query's own totals drive the prediction, no histology needed in the query
    del query.obsm[ADATA_KEYS.HISTOLOGY]
    dep = baseline_predict("depth_oracle", train, query, genes=genes)
    q_total = np.log1p(query_counts.sum(1))
    assert np.all(np.abs([stats.pearsonr(q_total, dep[:, j])[0] for j in range(3)]) > 0.999)


def test_baseline_predict_drops_nonfinite_training_spots():
    train, query, _ = _adatas()
    train.obsm[ADATA_KEYS.HISTOLOGY][:5] = np.nan
    with pytest.warns(UserWarning, match="Leaving out 5"):
        out = baseline_predict("ridge", train, query, genes=["g0"])
    assert np.isfinite(out).all()


def test_baseline_predict_errors():
    train, query, _ = _adatas()
    with pytest.raises(ValueError, match="Unknown baseline"):
        baseline_predict("forest", train, query)
    with pytest.raises(ValueError, match="Unknown target"):
        baseline_predict("mean", train, query, target="tpm")
    with pytest.raises(KeyError, match="layers"):
        baseline_predict("mean", train, query, layer="raw")
    with pytest.raises(KeyError, match="obsm"):
        baseline_predict("ridge", train, query, histology_key="X_uni")
    with pytest.raises(ValueError, match="not in train.var_names"):
        baseline_predict("ridge", train, query, genes=["g0", "nope"])
    with pytest.raises(ValueError, match="duplicates"):
        baseline_predict("ridge", train, query, genes=["g0", "g0"])
    q = query.copy()
    q.obsm[ADATA_KEYS.HISTOLOGY] = q.obsm[ADATA_KEYS.HISTOLOGY][:, :5]
    with pytest.raises(ValueError, match="features but train has"):
        baseline_predict("knn", train, q)
    q = query.copy()
    q.obsm[ADATA_KEYS.HISTOLOGY][2, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        baseline_predict("knn", train, q)
    q = query.copy()
    del q.layers[ADATA_KEYS.COUNTS_LAYER]
    with pytest.raises(KeyError, match="query.layers"):
        baseline_predict("depth_oracle", train, q)
    t = train.copy()
    t.obsm[ADATA_KEYS.HISTOLOGY][:] = np.nan
    with pytest.raises(ValueError, match="No training spot"):
        baseline_predict("ridge", t, query)


def test_ridge_cv_linear_map_and_out_of_fold_predictions():
    X, Y, g = _latent_data(2.0, p=30, n=200, g=5)
    cv = RidgeCV().fit(X, Y, groups=g)
    weight, bias = cv.linear_map()
    assert weight.shape == (30, Y.shape[1]) and bias.shape == (Y.shape[1],)
    np.testing.assert_allclose(X[:25] @ weight + bias, cv.predict(X[:25]), atol=1e-8)
    oof = cv.out_of_fold_predict(X, Y, groups=g)
    assert oof.shape == Y.shape
    for section in np.unique(g):
        held = g == section
        ref = make_pipeline(StandardScaler(), Ridge(alpha=cv.alpha_)).fit(X[~held], Y[~held])
        np.testing.assert_allclose(oof[held], ref.predict(X[held]), atol=1e-8)
    # out of fold is worse than in sample on the same spots: the fitted model has seen them
    assert np.mean((oof - Y) ** 2) > np.mean((cv.predict(X) - Y) ** 2)
    with pytest.raises(RuntimeError, match="not fitted"):
        RidgeCV().linear_map()
    with pytest.raises(RuntimeError, match="not fitted"):
        RidgeCV().out_of_fold_predict(X, Y)
