"""The benchmark harness in quick mode on the real HER2ST data: JSON shape, value ranges, same genes everywhere."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def quick_run(data_dir, tmp_path_factory):
    from varst_scverse.benchmark import main

    out = tmp_path_factory.mktemp("bench_out")
    cache = tmp_path_factory.mktemp("bench_cache")
    rc = main(
        [
            "--quick",
            "--no_speed",
            "--workers",
            "2",
            "--out",
            str(out),
            "--cache_dir",
            str(cache),
            "--data_dir",
            str(data_dir),
        ]
    )
    assert rc == 0
    return out, json.loads((out / "her2st.json").read_text()), cache


def test_outputs_written(quick_run):
    out, doc, _ = quick_run
    for name in ("her2st.json", "her2st.md", "speed.md"):
        assert (out / name).is_file()
    md = (out / "her2st.md").read_text()
    assert "varst benchmark --quick" in md
    assert "cross_B4_top50_log1p" in md and "optimistic" in md


def test_json_shape(quick_run):
    _, doc, _ = quick_run
    assert {"machine", "command", "splits", "ablations"} <= set(doc)
    assert doc["command"].startswith("varst benchmark --quick")
    assert set(doc["splits"]) == {"cross_B4_top50_log1p", "cross_B4_top50_cp10k"}
    for block in doc["splits"].values():
        for method in ("varst", "ridge", "ridge_cv", "mlp", "knn", "mean", "depth_oracle", "varst_ridge_avg"):
            assert method in block, method
        for method in ("ridge_rgb", "ridge_cv_rgb", "mlp_rgb", "knn_rgb"):
            assert method in block, method
        for key in ("mean_pearson", "median_pearson", "frac_genes_r_gt_0.3", "mse", "mae", "pcc_10", "pcc_50"):
            assert key in block["ridge_cv"], key
        assert "coverage_90" in block["varst"]


def test_numbers_in_range(quick_run):
    _, doc, _ = quick_run
    for name, block in doc["splits"].items():
        for method, row in block.items():
            if method.startswith("_"):
                continue
            if method == "mean":  # constant predictions: Pearson undefined, only the errors
                assert row["mean_pearson"] is None
            else:
                for key in ("mean_pearson", "median_pearson", "pcc_10", "pcc_50"):
                    assert -1.0 <= row[key] <= 1.0, (name, method, key)
                assert 0.0 <= row["frac_genes_r_gt_0.3"] <= 1.0
                assert row["pcc_10"] >= row["pcc_50"] - 1e-12
            assert row["mse"] >= 0 and row["mae"] >= 0 and math.isfinite(row["mse"])
        assert 0.0 <= block["varst"]["coverage_90"] <= 1.0
        # on HER2ST the image predicts depth: the main baselines and the oracle are far from zero
        assert block["ridge_cv"]["mean_pearson"] > 0.1
        assert block["depth_oracle"]["mean_pearson"] > 0.1


def test_depth_oracle_and_ridge_on_same_genes(quick_run):
    _, doc, cache = quick_run
    units = json.loads((cache / "partial_quick.json").read_text())["units"]
    for key, unit in units.items():
        if key.count("|") != 1:
            continue
        assert len(unit["genes"]) == 50
        m = unit["methods"]
        # every method scored on the same genes: same count of evaluated + constant genes
        totals = {k: r["n_genes_evaluated"] + r["n_genes_constant"] for k, r in m.items()}
        assert set(totals.values()) == {50}, totals
        assert m["depth_oracle"]["n_genes_evaluated"] == m["ridge"]["n_genes_evaluated"]
    for block in doc["splits"].values():
        assert block["_info"]["n_genes_per_fold"] == [50]
        assert block["ridge"]["n_genes_evaluated"] == block["depth_oracle"]["n_genes_evaluated"]
    assert np.isfinite(doc["wall_time_min"])
