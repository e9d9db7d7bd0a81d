"""Plotting: spatial maps, per-gene Pearson, training curves, codebook use and token maps (no training needed)."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import varst_scverse as varst
from varst_scverse._constants import ADATA_KEYS
from varst_scverse._targets import expression_target

SCALES = (1, 8, 32, 20)
LIB_IMG = "S0"  # section with an H&E image
LIB_PLAIN = "S1"  # section without one


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def adata():
    ad = varst.datasets.synthetic(n_spots=200, n_genes=20)
    rng = np.random.default_rng(1)
    y = expression_target(ad.layers[ADATA_KEYS.COUNTS_LAYER])
    ad.layers[ADATA_KEYS.PREDICTED] = (y + rng.normal(0, 0.3, y.shape) + 0.5).astype(np.float32)
    ad.layers[ADATA_KEYS.UNCERTAINTY] = rng.uniform(0.05, 0.5, y.shape).astype(np.float32)
    ad.obsm[ADATA_KEYS.TOKENS] = rng.integers(0, 64, size=(ad.n_obs, sum(SCALES)))
    xy = ad.obsm[ADATA_KEYS.SPATIAL]
    side = int(xy.max() + 100)
    scalef = 0.25
    img = np.full((int(side * scalef), int(side * scalef), 3), (230, 180, 200), dtype=np.uint8)
    ad.uns[ADATA_KEYS.UNS_SPATIAL] = {
        LIB_IMG: {
            "images": {"hires": img},
            "scalefactors": {"tissue_hires_scalef": scalef, "spot_diameter_fullres": 80.0},
        }
    }
    return ad


def _panels(fig):
    """The map/plot axes of a figure, without colourbars."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def _mappable(ax):
    """The colour-mapped collection of a panel (squidpy's patches or a plain scatter)."""
    found = [c for c in ax.collections if c.get_array() is not None]
    assert found, f"no colour-mapped collection in panel {ax.get_title()!r}"
    return found[-1]


# ------------------------------------------------------------------------------------------- spatial_prediction
def test_public_api():
    assert set(varst.pl.__all__) == {
        "spatial_prediction",
        "gene_pearson",
        "training_history",
        "codebook_usage",
        "token_map",
    }
    for name in varst.pl.__all__:
        assert callable(getattr(varst.pl, name))


def test_spatial_prediction_on_image(adata):
    genes = ["gene0", "gene3"]
    fig = varst.pl.spatial_prediction(adata, genes, library_id=LIB_IMG, return_fig=True)
    panels = _panels(fig)
    assert len(panels) == 3 * len(genes)
    n_lib = int((adata.obs[ADATA_KEYS.SECTION] == LIB_IMG).sum())
    for row, gene in enumerate(genes):
        obs_ax, pred_ax, unc_ax = panels[3 * row : 3 * row + 3]
        assert gene in obs_ax.get_title() and "observed" in obs_ax.get_title()
        assert gene in pred_ax.get_title() and "predicted" in pred_ax.get_title()
        assert gene in unc_ax.get_title() and "uncertainty (sd)" in unc_ax.get_title()
        for ax in (obs_ax, pred_ax, unc_ax):
            assert len(ax.images) == 1  # the H&E under the spots
            assert len(_mappable(ax).get_array()) == n_lib  # only this section's spots
        # observed and predicted share one colour scale, spanning both
        obs_lim, pred_lim = _mappable(obs_ax).get_clim(), _mappable(pred_ax).get_clim()
        assert obs_lim == pytest.approx(pred_lim)
        both = np.concatenate([_mappable(obs_ax).get_array(), _mappable(pred_ax).get_array()])
        assert obs_lim == pytest.approx((both.min(), both.max()))
        assert _mappable(unc_ax).get_clim()[0] == 0.0


def test_spatial_prediction_plain_values_and_pearson(adata):
    gene = "gene5"
    fig = varst.pl.spatial_prediction(adata, gene, library_id=LIB_PLAIN, return_fig=True)
    obs_ax, pred_ax, unc_ax = _panels(fig)
    assert all(len(ax.images) == 0 for ax in (obs_ax, pred_ax, unc_ax))  # no image for this section
    rows = (adata.obs[ADATA_KEYS.SECTION] == LIB_PLAIN).to_numpy()
    g = adata.var_names.get_loc(gene)
    expected_obs = expression_target(adata.layers[ADATA_KEYS.COUNTS_LAYER][rows])[:, g]
    expected_pred = adata.layers[ADATA_KEYS.PREDICTED][rows, g]
    np.testing.assert_allclose(_mappable(obs_ax).get_array(), expected_obs, rtol=1e-6)
    np.testing.assert_allclose(_mappable(pred_ax).get_array(), expected_pred, rtol=1e-6)
    np.testing.assert_allclose(_mappable(unc_ax).get_array(), adata.layers[ADATA_KEYS.UNCERTAINTY][rows, g], rtol=1e-6)
    r = np.corrcoef(expected_obs, expected_pred)[0, 1]
    assert f"r = {r:.2f}" in pred_ax.get_title()
    assert _mappable(obs_ax).get_clim() == pytest.approx(_mappable(pred_ax).get_clim())
    # img=False on the imaged section also gives plain scatters
    fig = varst.pl.spatial_prediction(adata, gene, library_id=LIB_IMG, img=False, pearson=False, return_fig=True)
    assert all(len(ax.images) == 0 for ax in _panels(fig))
    assert "r =" not in _panels(fig)[1].get_title()


def test_spatial_prediction_cp10k_uses_all_genes_depth(adata):
    gene = "gene2"
    fig = varst.pl.spatial_prediction(adata, [gene], library_id=LIB_PLAIN, target="cp10k", return_fig=True)
    rows = (adata.obs[ADATA_KEYS.SECTION] == LIB_PLAIN).to_numpy()
    counts = adata.layers[ADATA_KEYS.COUNTS_LAYER][rows]
    expected = expression_target(counts, kind="cp10k")[:, adata.var_names.get_loc(gene)]
    obs_ax = _panels(fig)[0]
    assert "cp10k" in obs_ax.get_title()
    np.testing.assert_allclose(_mappable(obs_ax).get_array(), expected, rtol=1e-5)


def test_spatial_prediction_without_counts_draws_two_columns(adata):
    del adata.layers[ADATA_KEYS.COUNTS_LAYER]  # H&E-only query
    fig = varst.pl.spatial_prediction(adata, ["gene0", "gene1"], library_id=LIB_IMG, return_fig=True)
    titles = [ax.get_title() for ax in _panels(fig)]
    assert len(titles) == 4
    assert not any("observed" in t for t in titles)
    assert ["predicted" in t for t in titles] == [True, False, True, False]


def test_spatial_prediction_reads_obsm_tables(adata):
    """When the AnnData's genes differ from the model's, predict_expression writes gene-named obsm tables."""
    genes = ["gene4", "gene7"]
    for key in (ADATA_KEYS.PREDICTED, ADATA_KEYS.UNCERTAINTY):
        adata.obsm[key] = pd.DataFrame(adata.layers.pop(key)[:, [4, 7]], index=adata.obs_names, columns=genes)
    fig = varst.pl.spatial_prediction(adata, genes, library_id=LIB_PLAIN, return_fig=True)
    assert len(_panels(fig)) == 6
    with pytest.raises(ValueError, match="Unknown genes"):
        varst.pl.spatial_prediction(adata, ["gene0"], library_id=LIB_PLAIN)


def test_spatial_prediction_saves_png_and_closes(adata, tmp_path):
    path = tmp_path / "maps" / "pred.png"
    out = varst.pl.spatial_prediction(adata, ["gene0"], library_id=LIB_IMG, save=path)
    assert out is None
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.get_fignums() == []


def test_spatial_prediction_errors(adata):
    with pytest.raises(ValueError, match=r"Unknown genes \['NOPE'\]"):
        varst.pl.spatial_prediction(adata, ["gene0", "NOPE"], library_id=LIB_IMG)
    with pytest.raises(ValueError, match="Unknown library_id 'S9'"):
        varst.pl.spatial_prediction(adata, ["gene0"], library_id="S9")
    with pytest.raises(ValueError, match="2 sections.*pass library_id"):
        varst.pl.spatial_prediction(adata, ["gene0"])
    del adata.layers[ADATA_KEYS.PREDICTED]
    with pytest.raises(KeyError, match=r"varst_predicted.*model\.predict_expression"):
        varst.pl.spatial_prediction(adata, ["gene0"], library_id=LIB_IMG)


def test_spatial_prediction_single_section_needs_no_library_id(adata):
    sub = adata[adata.obs[ADATA_KEYS.SECTION] == LIB_IMG].copy()
    fig = varst.pl.spatial_prediction(sub, ["gene0"], return_fig=True)
    panels = _panels(fig)
    assert len(panels) == 3 and all(len(ax.images) == 1 for ax in panels)


def test_spatial_prediction_incomplete_scalefactors(adata):
    sf = adata.uns[ADATA_KEYS.UNS_SPATIAL][LIB_IMG]["scalefactors"]
    del sf["spot_diameter_fullres"]  # estimated from the spot spacing, the AnnData untouched
    fig = varst.pl.spatial_prediction(adata, ["gene0"], library_id=LIB_IMG, return_fig=True)
    assert all(len(ax.images) == 1 for ax in _panels(fig))
    assert "spot_diameter_fullres" not in sf
    del sf["tissue_hires_scalef"]  # the image cannot be placed: plain scatter, with a warning
    with pytest.warns(UserWarning, match="tissue_hires_scalef"):
        fig = varst.pl.spatial_prediction(adata, ["gene0"], library_id=LIB_IMG, return_fig=True)
    assert all(len(ax.images) == 0 for ax in _panels(fig))


# ------------------------------------------------------------------------------------------------- gene_pearson
def test_gene_pearson_histogram():
    r = pd.Series(np.linspace(-0.1, 0.8, 30), index=[f"g{i}" for i in range(30)])
    r.iloc[0] = np.nan
    fig = varst.pl.gene_pearson(r, top_n=5, return_fig=True)
    hist_ax, top_ax = fig.axes
    assert sum(p.get_height() for p in hist_ax.patches) == 29  # NaN left out
    legend = [t.get_text() for t in hist_ax.get_legend().get_texts()]
    assert legend == [f"mean r = {r.mean():.3f}"]
    assert "1 undefined" in hist_ax.get_title()
    assert [t.get_text() for t in top_ax.get_yticklabels()] == [f"g{i}" for i in range(29, 24, -1)]  # best first
    assert len(varst.pl.gene_pearson(r.to_numpy(), top_n=0, return_fig=True).axes) == 1


def test_gene_pearson_comparison_aligns_by_gene(tmp_path):
    genes = [f"g{i}" for i in range(12)]
    a = pd.Series(np.linspace(0.1, 0.9, 12), index=genes)
    b = (a - 0.1).iloc[::-1]  # same genes, other order: must be matched by name
    fig = varst.pl.gene_pearson(a, other=b, labels=("VARST", "ridge"), top_n=3, return_fig=True)
    (ax,) = fig.axes
    pts = ax.collections[0].get_offsets()
    np.testing.assert_allclose(pts[:, 1] - pts[:, 0], 0.1)  # y = VARST, x = ridge, gene by gene
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"mean VARST r = {a.mean():.3f}" in legend
    assert f"mean ridge r = {b.mean():.3f}" in legend
    assert any(line.get_xdata()[0] == line.get_ydata()[0] for line in ax.lines)  # the diagonal
    assert "better on 12/12" in ax.get_title()
    assert len(ax.texts) == 3
    path = tmp_path / "gp.png"
    varst.pl.gene_pearson(a.to_numpy(), other=b.to_numpy(), save=path)
    assert path.stat().st_size > 0


def test_gene_pearson_errors():
    a = pd.Series([0.1, 0.2], index=["x", "y"])
    with pytest.raises(ValueError, match="same genes"):
        varst.pl.gene_pearson(a, other=pd.Series([0.1, 0.2], index=["x", "z"]))
    with pytest.raises(ValueError, match="2 genes but other has 3"):
        varst.pl.gene_pearson(a, other=np.zeros(3))
    with pytest.raises(ValueError, match="1-D"):
        varst.pl.gene_pearson(np.zeros((2, 2)))


# ---------------------------------------------------------------------------------- training_history / codebook
@pytest.fixture
def fake_model():
    n1, n2 = 6, 4
    stage1 = pd.DataFrame(
        {
            "epoch": np.arange(n1),
            "train_loss": np.linspace(2.0, 1.0, n1),
            "train_recon_loss": np.linspace(1.5, 0.8, n1),
            "train_vq_loss": np.linspace(0.2, 0.1, n1),
            "train_hierarchical_loss": np.linspace(0.3, 0.1, n1),
            "validation_loss": np.linspace(2.2, 1.1, n1),
            "codebook_utilisation": np.linspace(0.1, 0.6, n1),
            "codebook_perplexity": np.linspace(5.0, 40.0, n1),
        }
    )
    stage2 = pd.DataFrame(
        {
            "epoch": np.arange(n2),
            "train_ce_loss": np.linspace(4.0, 3.0, n2),
            "train_aux_decode_loss": np.linspace(1.0, 0.5, n2),
            "validation_ce_loss": np.linspace(4.2, 3.3, n2),
            **{f"train_token_accuracy_scale{k}": np.linspace(0.1, 0.4, n2) / (k + 1) for k in range(4)},
        }
    )
    usage = np.array([5, 0, 3, 0, 1, 1, 0, 10])
    return SimpleNamespace(
        history_={"stage1": stage1, "stage2": stage2},
        codebook_usage=lambda adata=None: usage,
        module=SimpleNamespace(scales=SCALES),
        gene_names_=[f"gene{i}" for i in range(20)],
    )


def test_training_history_panels(fake_model):
    fig = varst.pl.training_history(fake_model, return_fig=True)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["stage1: losses", "stage1: codebook use", "stage2: losses", "stage2: token accuracy"]
    by_title = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    loss_ax = by_title["stage1: losses"]
    assert loss_ax.get_yscale() == "log"
    assert len(loss_ax.lines) == 5  # four training losses + validation
    acc_ax = by_title["stage2: token accuracy"]
    assert len(acc_ax.lines) == 4  # one per scale
    scale0 = fake_model.history_["stage2"]["train_token_accuracy_scale0"]
    np.testing.assert_allclose(acc_ax.lines[0].get_ydata(), scale0)
    # perplexity goes to a right-hand axis sharing x with the codebook panel
    assert any("codebook_perplexity" in ax.get_ylabel() for ax in fig.axes)

    fig = varst.pl.training_history(fake_model, stage=2, keys=["train_ce_loss", "validation_ce_loss"], return_fig=True)
    (ax,) = fig.axes
    assert ax.get_title() == "stage2: losses"
    assert [line.get_linestyle() for line in ax.lines] == ["-", "--"]


def test_training_history_errors(fake_model, tmp_path):
    with pytest.raises(ValueError, match=r"model\.train\(stage=3\)"):
        varst.pl.training_history(fake_model, stage=3)
    with pytest.raises(ValueError, match="Unknown history keys"):
        varst.pl.training_history(fake_model, keys=["nope"])
    with pytest.raises(ValueError, match=r"model\.train\(stage=1\)"):
        varst.pl.training_history(SimpleNamespace(history_={}))
    path = tmp_path / "hist.png"
    assert varst.pl.training_history(fake_model, stage="stage1", save=path) is None
    assert path.stat().st_size > 0 and plt.get_fignums() == []


def test_codebook_usage(fake_model, tmp_path):
    fig = varst.pl.codebook_usage(fake_model, return_fig=True)
    (ax,) = [a for a in fig.axes if a.get_title()]
    usage = fake_model.codebook_usage()
    p = usage[usage > 0] / usage.sum()
    perplexity = np.exp(-(p * np.log(p)).sum())
    assert "5/8 codes used (62.5%)" in ax.get_title()
    assert f"perplexity {perplexity:.1f}" in ax.get_title()
    assert ax.get_yscale() == "log"
    heights = ax.patches[0].get_data().values  # the stairs of used codes, sorted by use
    np.testing.assert_array_equal(heights, [10, 5, 3, 1, 1])
    path = tmp_path / "cb.png"
    varst.pl.codebook_usage(np.array([3, 1, 0]), save=path)
    assert path.stat().st_size > 0
    with pytest.raises(ValueError, match="non-negative"):
        varst.pl.codebook_usage(np.array([1, -1]))


# ---------------------------------------------------------------------------------------------------- token_map
def test_token_map_picks_the_scale_offset(adata):
    tokens = adata.obsm[ADATA_KEYS.TOKENS]
    scale, position = 1, 2
    column = SCALES[0] + position  # offset of scale 1 is the size of scale 0
    tokens[:, column] = np.arange(adata.n_obs) % 3 + 100
    fig = varst.pl.token_map(
        adata, scale=scale, position=position, library_id=LIB_PLAIN, scales=SCALES, return_fig=True
    )
    (ax,) = [a for a in fig.axes if a.get_title()]
    assert "scale 1" in ax.get_title() and "position 2" in ax.get_title() and "3 codes" in ax.get_title()
    colors = np.unique(ax.collections[0].get_facecolors(), axis=0)
    assert len(colors) == 3
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["100", "101", "102"]


def test_token_map_on_image_and_default_scales(adata, tmp_path):
    fig = varst.pl.token_map(adata, scale=3, position=[0, 19], library_id=LIB_IMG, return_fig=True)
    panels = [a for a in fig.axes if a.get_title()]
    assert len(panels) == 2 and all(len(a.images) == 1 for a in panels)
    path = tmp_path / "tok.png"
    varst.pl.token_map(adata, scale=0, library_id=LIB_IMG, save=path)
    assert path.stat().st_size > 0


def test_token_map_errors(adata):
    with pytest.raises(ValueError, match="do not add up"):
        varst.pl.token_map(adata, library_id=LIB_IMG, scales=(1, 8, 16))
    with pytest.raises(ValueError, match="scale 1 has 8 tokens"):
        varst.pl.token_map(adata, scale=1, position=8, library_id=LIB_IMG)
    with pytest.raises(ValueError, match="out of range"):
        varst.pl.token_map(adata, scale=4, library_id=LIB_IMG)
    del adata.obsm[ADATA_KEYS.TOKENS]
    with pytest.raises(KeyError, match="get_tokens"):
        varst.pl.token_map(adata, library_id=LIB_IMG)
