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
    for name in ("her2st.json", "her2st.md"):
        assert (out / name).is_file()
    # --no_speed: no speed table written (an existing one would be kept, see test_report_only_keeps_speed_md)
    assert not (out / "speed.md").exists()
    md = (out / "her2st.md").read_text()
    assert "varst benchmark --quick" in md
    assert "cross_B4_top50_log1p" in md and "optimistic" in md


def test_json_shape(quick_run):
    _, doc, _ = quick_run
    assert {"machine", "command", "splits", "ablations"} <= set(doc)
    assert doc["command"].startswith("varst benchmark --quick")
    assert set(doc["splits"]) == {"cross_B4_top50_log1p", "cross_B4_top50_cp10k"}
    for block in doc["splits"].values():
        for method in ("varst", "ridge", "ridge_cv", "mlp", "knn", "mean", "depth_oracle", "varst_transformer"):
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


def test_fold_filter_and_accelerator_reach_the_settings():
    from varst_scverse.benchmark import BenchConfig

    cfg = BenchConfig(tests=("C3", "B4"), accelerator="gpu")
    assert [f.test for f in cfg.folds("within_C")] == ["C3"]
    assert [f.test for f in cfg.folds("cross_B4")] == ["B4"]
    assert BenchConfig(tests=("C3",)).folds("cross_B4") == []
    assert len(BenchConfig().folds("within_C")) == 5
    assert cfg.settings().accelerator == "gpu"


def test_ensemble_size_reaches_the_settings_and_the_fingerprint():
    from varst_scverse._benchmark._run import _fingerprint
    from varst_scverse.benchmark import BenchConfig, main

    assert BenchConfig(ensemble_size=3).settings().var_config == {"ensemble_size": 3}
    assert BenchConfig().settings().var_config == {}
    # one transformer: the fingerprint of a store written before the option existed, so such stores still resume
    assert "ensemble_size" not in _fingerprint(BenchConfig())
    assert _fingerprint(BenchConfig(ensemble_size=3))["ensemble_size"] == 3
    with pytest.raises(SystemExit, match="--ensemble_size must be a positive integer"):
        main(["--ensemble_size", "0"])


def test_gene_positions_reach_the_settings_and_the_fingerprint():
    from varst_scverse._benchmark._run import _fingerprint
    from varst_scverse.benchmark import BenchConfig, build_parser, main

    assert BenchConfig().settings().vqvae_config == {"gene_positions": 256}
    assert BenchConfig(gene_positions=None).settings().vqvae_config == {"gene_positions": None}
    # the default pools nothing on the top-50/top-250 panels: stores written before the option still resume
    assert "gene_positions" not in _fingerprint(BenchConfig())
    assert _fingerprint(BenchConfig(gene_positions=None))["gene_positions"] is None
    assert build_parser().parse_args([]).gene_positions == 256
    with pytest.raises(SystemExit, match="--gene_positions must be 0"):
        main(["--gene_positions", "-1"])


def test_gene_sets_are_cached_beside_the_embedded_data(quick_run):
    from varst_scverse._benchmark import _data as D

    _, _, cache = quick_run
    stored = json.loads((cache / D.GENESETS_FILE).read_text())
    (fold,) = D.folds("cross_B4", quick=True)
    # read back without the data: a copy of the cache on another machine needs no gene ranking there
    sets = D.gene_sets(None, fold, quick=True, cache_dir=cache)
    assert len(sets["top50"]) == 50 and sets["top50"] == next(iter(stored.values()))["top50"]


def test_report_only_merges_ablations_of_other_runs(quick_run, tmp_path):
    import shutil

    from varst_scverse.benchmark import report_only

    out, doc, cache = quick_run
    assert doc["ablations"] == {}
    units = json.loads((cache / "partial_quick.json").read_text())["units"]
    m = units["cross_B4_top50_log1p|B4"]["methods"]
    other = tmp_path / "other.json"
    unit = {"default": m["varst_transformer"], "decode_greedy": m["ridge"]}
    other.write_text(json.dumps({"units": {"cross_B4_top50_log1p|B4|ablation|0": unit, "x|B4": {}}}))
    out2 = tmp_path / "out"
    shutil.copytree(out, out2)
    merged = report_only(out2, cache, notes=["ablations: elsewhere"], merge_ablations=[other])
    block = merged["ablations"]["cross_B4_top50_log1p"]
    assert block["decode_greedy"]["mean_pearson"] == pytest.approx(m["ridge"]["mean_pearson"])
    assert block["decode_greedy"]["delta_vs_default"] == pytest.approx(
        m["ridge"]["mean_pearson"] - m["varst_transformer"]["mean_pearson"]
    )
    assert "ablations: elsewhere" in (out2 / "her2st.md").read_text()
    # the run's own store is not changed by the merge
    assert json.loads((cache / "partial_quick.json").read_text())["units"] == units


def test_ablation_differences_are_paired_over_folds_and_seeds():
    from varst_scverse._benchmark._report import _ablation_block

    def r(x: float) -> dict:
        return {"mean_pearson": x}

    variants = {
        "default": {"0": {"C2": r(0.30), "C3": r(0.40)}, "1": {"C2": r(0.20), "C3": r(0.50)}},
        # the second seed of the variant ran on C2 only: compared with the default's C2 of that seed
        "v": {"0": {"C2": r(0.35), "C3": r(0.40)}, "1": {"C2": r(0.30)}},
    }
    block = _ablation_block(variants, "0")
    assert block["v"]["delta_vs_default"] == pytest.approx(0.025)
    assert block["v"]["seeds"] == {"0": pytest.approx(0.375), "1": pytest.approx(0.30)}
    assert block["v"]["seed_folds"] == {"0": ["C2", "C3"], "1": ["C2"]}
    assert block["v"]["delta_vs_default_over_seeds"] == pytest.approx((0.05 + 0.0 + 0.10) / 3)


def test_report_only_merges_varst_rows_of_other_runs(quick_run, tmp_path):
    import shutil

    from varst_scverse.benchmark import report_only

    out, doc, cache = quick_run
    store = json.loads((cache / "partial_quick.json").read_text())
    key = "cross_B4_top50_cp10k|B4"
    full = store["units"][key]
    # this run without VARST on one unit; the other run (the quick run's own store) has it
    mine = tmp_path / "cache"
    mine.mkdir()
    full_methods = dict(full["methods"])
    store["units"][key]["methods"] = {m: r for m, r in full_methods.items() if not m.startswith("varst")}
    (mine / "partial_quick.json").write_text(json.dumps(store))
    out2 = tmp_path / "out"
    shutil.copytree(out, out2)
    before = report_only(out2, mine)
    assert "varst" not in before["splits"]["cross_B4_top50_cp10k"]
    merged = report_only(out2, mine, merge_varst=[cache / "partial_quick.json"])
    row = merged["splits"]["cross_B4_top50_cp10k"]["varst"]
    assert row["mean_pearson"] == pytest.approx(full_methods["varst"]["mean_pearson"])
    assert merged["splits"]["cross_B4_top50_cp10k"]["ridge_cv"] == before["splits"]["cross_B4_top50_cp10k"]["ridge_cv"]
    # other genes: refused
    other = json.loads((cache / "partial_quick.json").read_text())
    other["units"][key]["genes"] = other["units"][key]["genes"][::-1]
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="other genes"):
        report_only(out2, mine, merge_varst=[tmp_path / "other.json"])


def test_report_only_merges_other_seeds(quick_run, tmp_path):
    import shutil

    from varst_scverse._benchmark._report import is_baseline
    from varst_scverse.benchmark import report_only

    out, doc, cache = quick_run
    store = json.loads((cache / "partial_quick.json").read_text())
    seed = store["fingerprint"]["seed"]
    key, split = "cross_B4_top50_log1p|B4", "cross_B4_top50_log1p"
    methods = store["units"][key]["methods"]
    other = json.loads(json.dumps(store))
    other["fingerprint"]["seed"] = seed + 1
    other["units"][key]["methods"]["varst"]["mean_pearson"] = methods["varst"]["mean_pearson"] + 0.05
    path = tmp_path / "seed1.json"
    path.write_text(json.dumps(other))
    out2 = tmp_path / "out"
    shutil.copytree(out, out2)
    merged = report_only(out2, cache, merge_seeds=[path])
    block = merged["splits"][split]["_seeds"]
    r0 = methods["varst"]["mean_pearson"]
    assert block["seeds"][str(seed)]["mean_pearson"] == pytest.approx(r0)
    assert block["seeds"][str(seed + 1)]["mean_pearson"] == pytest.approx(r0 + 0.05)
    assert block["mean_pearson_over_seeds"] == pytest.approx(r0 + 0.025)
    assert block["largest_seed_difference_per_fold"] == pytest.approx(0.05)
    best = max(
        (r["mean_pearson"], m)
        for m, r in methods.items()
        if is_baseline(m) and r.get("mean_pearson") is not None and np.isfinite(r["mean_pearson"])
    )
    assert block["best_baseline"] == best[1]
    assert block["delta_over_seeds"] == pytest.approx(r0 + 0.025 - best[0])
    # the report's own VARST row stays its seed's; the seed table is in the markdown
    assert merged["splits"][split]["varst"]["mean_pearson"] == pytest.approx(r0)
    assert "## VARST over seeds" in (out2 / "her2st.md").read_text()
    # the run's own store is not changed by the merge
    assert json.loads((cache / "partial_quick.json").read_text()) == store
    # the same seed, or other training settings: refused
    other["fingerprint"]["seed"] = seed
    path.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="same seed|--merge_varst"):
        report_only(out2, cache, merge_seeds=[path])
    other["fingerprint"].update(seed=seed + 1, stage2_epochs=store["fingerprint"]["stage2_epochs"] + 1)
    path.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="stage2_epochs"):
        report_only(out2, cache, merge_seeds=[path])


def test_report_only_merges_ensemble_runs(quick_run, tmp_path):
    import shutil

    from varst_scverse._benchmark._report import ensemble_table
    from varst_scverse.benchmark import report_only

    out, doc, cache = quick_run
    store = json.loads((cache / "partial_quick.json").read_text())
    key, split = "cross_B4_top50_cp10k|B4", "cross_B4_top50_cp10k"
    methods = store["units"][key]["methods"]
    other = json.loads(json.dumps(store))
    other["fingerprint"]["ensemble_size"] = 3
    theirs = other["units"][key]["methods"]
    theirs["varst"]["mean_pearson"] = methods["varst"]["mean_pearson"] + 0.02
    theirs["varst_transformer"]["mean_pearson"] = methods["varst_transformer"]["mean_pearson"] + 0.04
    path = tmp_path / "ens3.json"
    path.write_text(json.dumps(other))
    out2 = tmp_path / "out"
    shutil.copytree(out, out2)
    merged = report_only(out2, cache, merge_ensembles=[path])
    block = merged["splits"][split]
    assert block["varst_ens3"]["mean_pearson"] == pytest.approx(methods["varst"]["mean_pearson"] + 0.02)
    assert block["varst_ens3_transformer"]["mean_pearson"] == pytest.approx(
        methods["varst_transformer"]["mean_pearson"] + 0.04
    )
    assert block["varst"]["mean_pearson"] == pytest.approx(methods["varst"]["mean_pearson"])  # this run's own
    (line,) = [x for x in ensemble_table(merged) if x.startswith(f"| {split} ")]
    assert f"3 members: {block['varst_ens3']['mean_pearson']:.3f}" in line
    assert "## VARST with a stage-2 ensemble" in (out2 / "her2st.md").read_text()
    assert json.loads((cache / "partial_quick.json").read_text()) == store
    # a one-transformer run, or another seed: refused
    other["fingerprint"]["ensemble_size"] = 1
    path.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="ensemble_size > 1"):
        report_only(out2, cache, merge_ensembles=[path])
    other["fingerprint"].update(ensemble_size=3, seed=store["fingerprint"]["seed"] + 1)
    path.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="seed"):
        report_only(out2, cache, merge_ensembles=[path])


def test_parallel_units_respect_the_time_budget():
    import time
    from types import SimpleNamespace

    from varst_scverse._benchmark._run import Budget, _parallel_units

    jobs = {("cross_B4", "B4", "top50", t): {"key": f"cross_B4_top50_{t}|B4"} for t in ("log1p", "cp10k")}
    budget = Budget(0.0, time.time() - 1.0)  # spent before the first unit
    lines: list[str] = []
    cfg = SimpleNamespace(workers=2, quick=True)
    # nothing may start (a started unit would need the store, the data and the settings, all None here)
    _parallel_units(list(jobs), jobs, None, None, None, None, cfg, "train", budget, lines.append)
    assert budget.skipped == ["VARST cross_B4_top50_log1p|B4", "VARST cross_B4_top50_cp10k|B4"]


def test_report_only_keeps_speed_md_without_speed_measurements(quick_run, tmp_path):
    import shutil

    from varst_scverse.benchmark import report_only

    out, _, cache = quick_run
    out2 = tmp_path / "out"
    shutil.copytree(out, out2)
    (out2 / "speed.md").write_text("# Speed\n\nan earlier run's table\n")
    report_only(out2, cache)
    assert (out2 / "speed.md").read_text() == "# Speed\n\nan earlier run's table\n"


def test_wider_panel_is_scored_on_the_gene_sets_inside_it():
    """A VARST fitted on top-250 is also scored on top-50, from the same predictions, and reported in that split."""
    from types import SimpleNamespace

    from varst_scverse._benchmark._report import build_json, is_baseline, panel_table
    from varst_scverse._benchmark._run import _score, _varst_rows, panel_subsets

    gsets = {"top50": ["g2", "g0"], "top250": ["g0", "g1", "g2", "g3"], "other": ["g0", "x"]}
    assert panel_subsets(gsets, "top250") == {"top50": ["g2", "g0"]}
    assert panel_subsets(gsets, "top50") == {}
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(40, 4))
    pred = truth + rng.normal(size=(40, 4))
    prefixes = np.stack([pred * 0.5, pred])
    samples = pred[None] + rng.normal(size=(8, 40, 4))
    fit = {
        "pred": {"pred": pred, "prefixes": prefixes, "samples": samples},
        "model": SimpleNamespace(module=SimpleNamespace(has_probe=False)),
        "secs": {},
        "train": SimpleNamespace(n_obs=40),
    }
    job = {
        "key": "cross_B4_top250_log1p|B4",
        "truth": truth,
        "genes": gsets["top250"],
        "geneset": "top250",
        "subsets": panel_subsets(gsets, "top250"),
    }
    rows = _varst_rows(fit, job, None, None)
    sub = rows["subsets"]["top50"]
    assert sub["from"] == "top250"
    idx = [2, 0]
    expect = _score(truth[:, idx], pred[:, idx], samples[..., idx], ["g2", "g0"])
    assert sub["methods"]["varst"]["mean_pearson"] == pytest.approx(expect["mean_pearson"])
    assert sub["methods"]["varst"]["coverage_90"] == pytest.approx(expect["coverage_90"])
    assert sub["methods"]["varst"]["mean_pearson"] != pytest.approx(rows["methods"]["varst"]["mean_pearson"])
    # the report puts it into the top-50 split as varst_top250, which is not a baseline
    base = {"mean_pearson": 0.1}
    units = {
        "cross_B4_top250_log1p|B4": {"genes": gsets["top250"], "methods": {"ridge_cv": base, **rows["methods"]}},
        "cross_B4_top50_log1p|B4": {"genes": gsets["top50"], "methods": {"ridge_cv": base}},
    }
    units["cross_B4_top250_log1p|B4"]["subsets"] = rows["subsets"]
    cfg = {"seed": 0, "stage1_epochs": 1, "stage2_epochs": 1, "n_samples": 8, "quick": False, "varst_genesets": []}
    raw = {"config": cfg, "units": units, "seconds": 1.0, "peak_rss_gb": 0.1}
    doc = build_json(raw, "cmd", "today")
    block = doc["splits"]["cross_B4_top50_log1p"]
    assert block["varst_top250"]["mean_pearson"] == pytest.approx(expect["mean_pearson"])
    (line,) = [x for x in panel_table(doc) if x.startswith("| cross_B4_top50_log1p")]
    assert f"top250: {expect['mean_pearson']:.3f}" in line and "ridge_cv 0.100" in line
    assert not is_baseline("varst_top250") and is_baseline("ridge_cv") and not is_baseline("depth_oracle")
