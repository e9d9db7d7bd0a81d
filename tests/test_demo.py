"""`make demo` at reduced size on the real HER2ST data: every promised output exists and makes sense."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from varst_scverse._constants import ADATA_KEYS
from varst_scverse._demo import run_demo


@pytest.mark.realdata
def test_quick_demo_writes_predictions_metrics_and_figures(data_dir, tmp_path):
    out = tmp_path / "demo"
    metrics = run_demo(output=out, data_dir=data_dir, quick=True)

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["varst"]["log1p"]["mean_pearson"] == pytest.approx(metrics["varst"]["log1p"]["mean_pearson"])
    for method in ("varst", "varst_transformer", "ridge_cv", "ridge", "depth_oracle"):
        for kind in ("log1p", "cp10k"):
            r = saved[method][kind]["mean_pearson"]
            assert -1.0 <= r <= 1.0, (method, kind, r)
    # the model learned something about B4 from histology alone (its counts were never seen)
    assert saved["varst"]["log1p"]["mean_pearson"] > 0.1
    assert 0.0 <= saved["varst"]["log1p"]["coverage_90"] <= 1.0
    assert len(saved["varst"]["log1p"]["prefix_mean_pearson"]) >= 1

    pred = ad.read_h5ad(out / "B4_predicted.h5ad")
    assert pred.n_obs == saved["run"]["query_spots"]
    assert np.isfinite(pred.layers[ADATA_KEYS.PREDICTED]).all()
    assert (pred.layers[ADATA_KEYS.UNCERTAINTY] >= 0).all()
    assert "B4" in pred.uns["spatial"]
    for png in ("B4_observed_predicted.png", "gene_pearson.png", "training_history.png"):
        assert (out / png).stat().st_size > 10_000, png
    assert (out / "model" / "model.safetensors").is_file()
