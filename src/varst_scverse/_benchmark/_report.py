"""Turn the per-fold results into ``her2st.json``, ``her2st.md`` and ``speed.md``."""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path
from typing import Any

import numpy as np

from . import _data as D

METHOD_ORDER: tuple[str, ...] = (
    "varst",
    "varst_transformer",
    "varst_top250",
    "varst_top250_transformer",
    "ridge_cv",
    "ridge",
    "mlp",
    "knn",
    "ridge_cv_rgb",
    "ridge_rgb",
    "mlp_rgb",
    "knn_rgb",
    "mean",
    "depth_oracle",
)
#: not competitors: the yardstick that sees the test spots' depth, and every VARST row (``varst*``)
NOT_BASELINES = {"depth_oracle"}


def is_baseline(method: str) -> bool:
    """Whether ``method`` is a competitor of VARST (not a VARST row, not the depth oracle, not a private key)."""
    return not method.startswith(("varst", "_")) and method not in NOT_BASELINES


_STD_KEYS = ("mean_pearson", "median_pearson", "frac_genes_r_gt_0.3", "mse", "mae", "coverage_90")


def machine() -> str:
    """CPU, cores, Python and torch versions of this machine."""
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # pragma: no cover
        pass
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cpu}, {n} CPU cores, {platform.system()} {platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def _agg(rows: dict[str, dict]) -> dict[str, Any]:
    """Mean over folds of each numeric metric, the fold std of the main ones, and the per-fold mean Pearson."""
    folds = sorted(rows)
    out: dict[str, Any] = {}
    keys = [k for k in rows[folds[0]] if isinstance(rows[folds[0]][k], int | float)]
    for k in keys:
        vals = np.array([rows[f][k] for f in folds if k in rows[f]], dtype=np.float64)
        out[k] = float(np.mean(vals)) if vals.size and np.isfinite(vals).any() else float("nan")
    pre = [rows[f]["prefix_mean_pearson"] for f in folds if "prefix_mean_pearson" in rows[f]]
    if pre and len({len(p) for p in pre}) == 1:
        out["prefix_mean_pearson"] = [float(x) for x in np.mean(np.array(pre), axis=0)]
    out["n_folds"] = len(folds)
    if len(folds) > 1:
        out["fold_std"] = {
            k: float(np.std([rows[f][k] for f in folds], ddof=1)) for k in _STD_KEYS if all(k in rows[f] for f in folds)
        }
    out["per_fold_mean_pearson"] = {f: rows[f].get("mean_pearson", float("nan")) for f in folds}
    return out


def _paired_delta(pairs: list[tuple[dict, dict]]) -> float:
    """Mean of variant − default mean Pearson over (variant row, default row) pairs of the same fold and seed."""
    d = [
        v["mean_pearson"] - r["mean_pearson"]
        for v, r in pairs
        if v.get("mean_pearson") is not None and r.get("mean_pearson") is not None
    ]
    d = [x for x in d if np.isfinite(x)]
    return float(np.mean(d)) if d else float("nan")


def _ablation_block(variants: dict[str, dict[str, dict[str, dict]]], seed0: str) -> dict[str, Any]:
    """One split's ablation rows: each variant's fold means per seed and its difference from the default.

    Differences are paired: the variant and the default on the same folds with the same seed, so a variant that ran
    on fewer folds (a run cut short, or a second seed decided fold by fold) is compared on those folds only.
    """
    dref = variants["default"]
    block: dict[str, Any] = {}
    for variant, seeds in variants.items():
        rows = {seed: _agg(folds) for seed, folds in sorted(seeds.items())}
        first = seed0 if seed0 in rows else next(iter(rows))
        entry = dict(rows[first])

        def pairs(seed: str, seeds=seeds) -> list[tuple[dict, dict]]:
            return [(row, dref[seed][f]) for f, row in seeds[seed].items() if f in dref.get(seed, {})]

        entry["delta_vs_default"] = _paired_delta(pairs(first))
        if len(rows) > 1:
            entry["seeds"] = {s: r["mean_pearson"] for s, r in rows.items()}
            entry["seed_folds"] = {s: sorted(seeds[s]) for s in rows}
            entry["mean_pearson_over_seeds"] = float(np.mean([r["mean_pearson"] for r in rows.values()]))
            if variant != "default":
                entry["delta_vs_default_over_seeds"] = _paired_delta([p for s in rows for p in pairs(s)])
        block[variant] = entry
    return block


def varst_methods(methods: dict[str, dict]) -> dict[str, dict]:
    """The VARST rows of one unit's methods (``varst`` and its companions such as ``varst_transformer``)."""
    return {m: r for m, r in methods.items() if m.startswith("varst")}


def _best(scores: dict[str, float]) -> str | None:
    """The method with the highest finite score (None when there is none)."""
    finite = {m: v for m, v in scores.items() if np.isfinite(v)}
    return max(finite, key=finite.get) if finite else None


def _fold_mean(rows: dict[str, dict], folds: list[str], key: str = "mean_pearson") -> float:
    vals = [rows[f].get(key) for f in folds]
    vals = [v for v in vals if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _seed_block(seeds: dict[str, dict[str, dict]], methods: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """VARST per seed on the folds every seed ran, their mean, and the best baseline on the same folds.

    ``seeds``: seed → fold → the VARST rows of that fold (``varst``, ``varst_transformer``); ``methods``: method →
    fold → row, the split's per-fold results (the baselines of the report's run).
    """
    folds = sorted(set.intersection(*(set(rows) for rows in seeds.values())))
    per_seed = {}
    for seed, rows in sorted(seeds.items(), key=lambda kv: int(kv[0])):
        varst_rows = {f: rows[f]["varst"] for f in folds}
        alone = {f: rows[f]["varst_transformer"] for f in folds if "varst_transformer" in rows[f]}
        per_seed[seed] = {
            "mean_pearson": _fold_mean(varst_rows, folds),
            "coverage_90": _fold_mean(varst_rows, folds, "coverage_90"),
            "transformer_mean_pearson": _fold_mean(alone, folds) if len(alone) == len(folds) else float("nan"),
            "per_fold_mean_pearson": {f: varst_rows[f].get("mean_pearson") for f in folds},
        }
    baselines = {
        m: _fold_mean(rows, folds) for m, rows in methods.items() if is_baseline(m) and all(f in rows for f in folds)
    }
    best = _best(baselines)
    mean = float(np.mean([r["mean_pearson"] for r in per_seed.values()]))
    spread = [float(np.ptp([r["per_fold_mean_pearson"][f] for r in per_seed.values()])) for f in folds]
    return {
        "folds": folds,
        "seeds": per_seed,
        "mean_pearson_over_seeds": mean,
        "largest_seed_difference_per_fold": float(max(spread)) if spread else float("nan"),
        "best_baseline": best,
        "best_baseline_mean_pearson": baselines.get(best, float("nan")),
        "delta_over_seeds": mean - baselines[best] if best else float("nan"),
    }


def _clean(x: Any) -> Any:
    """JSON-safe: NaN → None."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def build_json(raw: dict[str, Any], command: str, started: str) -> dict[str, Any]:
    """The results document: ``{"machine", "command", "splits": {split: {method: {...}}}, "ablations": {...}, ...}``."""
    cfg = raw["config"]
    per: dict[str, dict[str, dict[str, dict]]] = {}
    abl: dict[str, dict[str, dict[str, dict[str, dict]]]] = {}
    genes_n: dict[str, list[int]] = {}
    seeds: dict[str, dict[str, dict[str, dict]]] = {}  # split → seed → fold → VARST rows
    subsets: dict[str, dict[str, dict[str, dict]]] = {}  # split → varst_<panel> method → fold → row
    for key, unit in raw["units"].items():
        parts = key.split("|")
        name, fold = parts[0], parts[1]
        if len(parts) == 2:
            for method, row in unit["methods"].items():
                per.setdefault(name, {}).setdefault(method, {})[fold] = row
            if "varst" in unit["methods"]:
                seeds.setdefault(name, {}).setdefault(str(cfg["seed"]), {})[fold] = varst_methods(unit["methods"])
            for seed, rows in unit.get("varst_seeds", {}).items():
                seeds.setdefault(name, {}).setdefault(seed, {})[fold] = rows
            for sub, entry in unit.get("subsets", {}).items():
                # a wider panel's VARST read on this gene set: method "varst_<panel>" of the smaller set's split
                sub_name = name.replace(f"_{entry['from']}_", f"_{sub}_", 1)
                for method, row in entry["methods"].items():
                    wide = method.replace("varst", f"varst_{entry['from']}", 1)
                    subsets.setdefault(sub_name, {}).setdefault(wide, {})[fold] = row
            genes = unit["genes"]
            genes_n.setdefault(name, []).append(len(genes) if isinstance(genes, list) else int(genes.split()[0]))
        else:
            seed = parts[3]
            for variant, row in unit.items():
                abl.setdefault(name, {}).setdefault(variant, {}).setdefault(seed, {})[fold] = row
    for name, methods in subsets.items():
        if name in per:  # only where the smaller gene set's own unit (its baselines) exists
            per[name].update(methods)
    splits: dict[str, Any] = {}
    for name in sorted(per, key=_split_sort):
        methods = {m: _agg(per[name][m]) for m in _ordered(per[name])}
        vf = sorted(per[name]["varst"]) if "varst" in per[name] else []
        partial = bool(vf) and len(vf) < len(per[name]["ridge_cv"])
        if partial:  # VARST ran on some folds only: every method also on exactly those folds, for a fair comparison
            for row in methods.values():
                pf = row["per_fold_mean_pearson"]
                vals = [pf[f] for f in vf if pf.get(f) is not None and np.isfinite(pf[f])]
                row["mean_pearson_on_varst_folds"] = float(np.mean(vals)) if vals else float("nan")
        methods["_info"] = {
            "varst_folds": vf,
            "n_genes_per_fold": genes_n[name],
            "test_sections": sorted(per[name]["ridge_cv"]),
            "pcc_note": "pcc_10/pcc_50 are optimistic: the top genes are picked on the test spots (Stem/GenAR style)",
        }
        by_seed = seeds.get(name, {})
        if len(by_seed) > 1 and set.intersection(*(set(rows) for rows in by_seed.values())):
            methods["_seeds"] = _seed_block(by_seed, per[name])
        splits[name] = methods
    ablations = {name: _ablation_block(abl[name], str(cfg["seed"])) for name in sorted(abl, key=_split_sort)}
    doc = {
        "machine": machine(),
        "command": command,
        "date": started,
        "wall_time_min": round(raw["seconds"] / 60, 1),
        "peak_rss_gb": round(raw["peak_rss_gb"], 2),
        "load_average_at_end": raw.get("load_average"),
        "protocol": {
            "splits": {
                "within_C": "leave one section out over C2-C6 (5 folds; test = the held-out section)",
                "cross_B4": "train C2-C6, test B4 (patient B)",
            },
            "genes": "chosen per fold on the training sections only: top50/top250 HVG (seurat_v3, detected in >=10% "
            "of training spots) and detected10 = every gene detected in >=10% of training spots",
            "targets": {"log1p": "log1p(counts)", "cp10k": "log1p(counts / total over all genes * 1e4)"},
            "features": "morphology: built-in weights-free descriptor (pp.embed_histology); rgb: 6-d RGB mean/std "
            "control (suffix _rgb)",
            "varst": {
                "preset": "cpu",
                "stage1_epochs": cfg["stage1_epochs"],
                "stage2_epochs": cfg["stage2_epochs"],
                "stage1_lr": 2e-3,
                "stage2_lr": 1e-3,
                "decode": "expected",
                "n_samples_for_coverage": cfg["n_samples"],
                "tokenizer_sections": "train sections only (quick)"
                if cfg["quick"]
                else "every HER2ST section except the test section and the test patient's sections outside the "
                "training set (cross_B4: all of patient B held out)",
                "stage2_sections": "the fold's training sections",
                "genesets": list(cfg["varst_genesets"]),
            },
            "metric": "per-gene Pearson r over the test spots, mean over genes (HEST); within_C: mean over folds, "
            "fold_std = std over folds (ddof 1)",
        },
        "config": cfg,
        "splits": splits,
        "ablations": ablations,
        "speed": raw.get("speed", {}),
        "skipped_for_time": raw.get("skipped", []),
        "notes": list(raw.get("notes", [])),
    }
    return _clean(doc)


def _split_sort(name: str) -> tuple:
    split = 0 if name.startswith("within_C") else 1
    gs = next((i for i, g in enumerate(D.GENESETS) if f"_{g}_" in name), 9)
    tg = 0 if name.endswith("log1p") else 1
    return (split, gs, tg)


def _ordered(methods) -> list[str]:
    return [m for m in METHOD_ORDER if m in methods] + sorted(m for m in methods if m not in METHOD_ORDER)


def best_baseline(block: dict[str, Any], key: str = "mean_pearson") -> tuple[str, dict]:
    """The baseline with the highest ``key`` (VARST, the VARST+ridge average and the depth oracle excluded)."""
    cands = [(m, r) for m, r in block.items() if is_baseline(m) and r.get(key) is not None and np.isfinite(r[key])]
    return max(cands, key=lambda mr: mr[1][key])


# ---------------------------------------------------------------------------------------------------------- markdown
def _f(x, nd: int = 3) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def _signed(x) -> str:
    return "–" if x is None else f"{x:+.3f}"


def _pm(row: dict) -> str:
    s = _f(row.get("mean_pearson"))
    sd = (row.get("fold_std") or {}).get("mean_pearson")
    return s + (f" ± {sd:.3f}" if sd is not None else "")


def headline(doc: dict) -> list[str]:
    """VARST against the best baseline, per split."""
    lines = [
        "| split | VARST | best baseline | Δ VARST − best | transformer alone | coverage 90% | depth oracle |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, block in doc["splits"].items():
        v = block.get("varst")
        key = "mean_pearson"
        if v is not None and "mean_pearson_on_varst_folds" in v:
            key = "mean_pearson_on_varst_folds"  # VARST ran on some folds only: compare on those
        bname, brow = best_baseline(block, key)
        folds = block.get("_info", {}).get("varst_folds", [])
        label = name
        if key != "mean_pearson":
            label = f"{name} (VARST on {len(folds)} of {block['ridge_cv']['n_folds']} folds: {', '.join(folds)})"

        def cell(row: dict, key: str = key) -> str:
            return _f(row.get(key)) if key != "mean_pearson" else _pm(row)

        if v is None:
            vtxt, dtxt, cov, alone_txt = "not run (see notes)", "–", "–", "–"
        else:
            vtxt = cell(v)
            dtxt = f"{v[key] - brow[key]:+.3f}"
            cov = _f(v.get("coverage_90"))
            alone = block.get("varst_transformer")
            alone_txt = cell(alone) if alone is not None else "–"
        lines.append(
            f"| {label} | {vtxt} | {bname} {cell(brow)} | {dtxt} | {alone_txt} | {cov} | "
            f"{cell(block['depth_oracle'])} |"
        )
    return lines


def _panel_methods(block: dict) -> list[str]:
    """The ``varst_<gene set>`` rows of a split: VARST fitted on a wider gene panel, scored on this split's genes."""
    return [m for m in block if m.startswith("varst_") and m[len("varst_") :] in D.GENESETS]


def _mean_on(row: dict | None, folds: list[str]) -> float:
    """A split row's mean r over ``folds`` (from its per-fold means); NaN when it lacks one of them."""
    pf = (row or {}).get("per_fold_mean_pearson", {})
    if not folds or not all(f in pf and pf[f] is not None for f in folds):
        return float("nan")
    return float(np.mean([pf[f] for f in folds]))


def _ensemble_methods(block: dict) -> list[str]:
    """The ``varst_ens<K>`` rows of a split: VARST with K stage-2 members (``--ensemble_size``)."""
    return [m for m in block if re.fullmatch(r"varst_ens\d+", m)]


def _variant_table(doc: dict, pick, column: str, label) -> list[str]:
    """VARST against a VARST variant and the best baseline, on the folds the variant ran on.

    The variant's rows are ``pick(block)`` of each split; ``column`` heads the variant's column, ``label(method)``
    names it in a cell.
    """
    lines = [
        f"| split | VARST | its transformer alone | {column} | its transformer alone | best baseline | "
        "Δ variant − best | coverage 90% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, block in doc["splits"].items():
        for m in pick(block):
            folds = sorted(block[m]["per_fold_mean_pearson"])
            base = {k: _mean_on(r, folds) for k, r in block.items() if is_baseline(k)}
            bname = _best(base)
            variant = _mean_on(block[m], folds)
            every = len(folds) == len(block["ridge_cv"]["per_fold_mean_pearson"])
            head = name if every else f"{name} ({', '.join(folds)})"
            lines.append(
                f"| {head} | {_f(_mean_on(block.get('varst'), folds))} | "
                f"{_f(_mean_on(block.get('varst_transformer'), folds))} | {label(m)}: {_f(variant)} | "
                f"{_f(_mean_on(block.get(m + '_transformer'), folds))} | {bname} {_f(base[bname])} | "
                f"{_signed(variant - base[bname])} | {_f(block[m].get('coverage_90'))} |"
            )
    return lines if len(lines) > 2 else []


def panel_table(doc: dict) -> list[str]:
    """VARST fitted on the split's genes against VARST fitted on a wider panel and read on the same genes."""
    return _variant_table(doc, _panel_methods, "VARST fitted on a wider panel", lambda m: m[len("varst_") :])


def ensemble_table(doc: dict) -> list[str]:
    """VARST (one stage-2 transformer) against VARST with several (``varst_ens<K>``), on the same folds."""
    return _variant_table(
        doc, _ensemble_methods, "VARST, stage-2 ensemble", lambda m: f"{m[len('varst_ens') :]} members"
    )


def seed_table(doc: dict) -> list[str]:
    """VARST per seed, the mean over seeds and the best baseline on the same folds, for the splits with seeds."""
    blocks = {n: b["_seeds"] for n, b in doc["splits"].items() if "_seeds" in b}
    if not blocks:
        return []
    names = sorted({s for b in blocks.values() for s in b["seeds"]}, key=int)
    lines = [
        f"| split | folds | {' | '.join(f'seed {s}' for s in names)} | mean over seeds | best baseline (same folds) "
        "| Δ mean − best | largest seed difference in a fold | coverage 90% per seed |",
        "|---|---|" + "---|" * len(names) + "---|---|---|---|---|",
    ]
    for name, b in blocks.items():
        cells = [_f(b["seeds"][s]["mean_pearson"]) if s in b["seeds"] else "–" for s in names]
        cov = " / ".join(_f(b["seeds"][s]["coverage_90"], 2) for s in names if s in b["seeds"])
        lines.append(
            f"| {name} | {', '.join(b['folds'])} | {' | '.join(cells)} | {_f(b['mean_pearson_over_seeds'])} | "
            f"{b['best_baseline']} {_f(b['best_baseline_mean_pearson'])} | {_signed(b['delta_over_seeds'])} | "
            f"{_f(b['largest_seed_difference_per_fold'])} | {cov} |"
        )
    return lines


def split_table(block: dict) -> list[str]:
    """All methods of one split."""
    lines = [
        "| method | mean r | median r | frac r>0.3 | MSE | MAE | PCC-10* | PCC-50* | genes | coverage 90% |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in block.items():
        if m.startswith("_"):
            continue
        lines.append(
            f"| {m} | {_pm(r)} | {_f(r.get('median_pearson'))} | {_f(r.get('frac_genes_r_gt_0.3'), 2)} | "
            f"{_f(r.get('mse'))} | {_f(r.get('mae'))} | {_f(r.get('pcc_10'))} | {_f(r.get('pcc_50'))} | "
            f"{_f(r.get('n_genes_evaluated'), 0)} | {_f(r.get('coverage_90'))} |"
        )
    return lines


def ablation_table(block: dict) -> list[str]:
    """Variants of one split against the default (expected-value decoding, seed 0)."""
    lines = [
        "| variant | mean r (seed 0) | Δ vs default | seeds (mean r) | Δ over seeds | coverage 90% "
        "| prefixes (mean r per scale) |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, r in block.items():
        seeds, sfolds = r.get("seeds"), r.get("seed_folds") or {}
        n0 = r.get("n_folds")
        stxt = (
            " / ".join(
                f"{s}: {_f(x)}" + (f" ({', '.join(sfolds[s])})" if s in sfolds and len(sfolds[s]) != n0 else "")
                for s, x in seeds.items()
            )
            if seeds
            else "–"
        )
        pre = r.get("prefix_mean_pearson")
        ptxt = " → ".join(_f(x) for x in pre) if pre else ""
        dtxt = "" if v == "default" or r.get("delta_vs_default") is None else f"{r['delta_vs_default']:+.3f}"
        d2 = r.get("delta_vs_default_over_seeds")
        lines.append(
            f"| {v} | {_pm(r)} | {dtxt} | {stxt} | {'' if d2 is None else f'{d2:+.3f}'} | "
            f"{_f(r.get('coverage_90'))} | {ptxt} |"
        )
    return lines


VARIANT_HELP = {
    "default": "VARST as in the main table: cpu preset (3 coarse scales generated, aux decode loss 1.0, "
    "neighbour_k 6, the ridge probe blended in with weight 0.5), expected-value decoding",
    "ridge_blend_0": "the transformer alone (`ridge_blend=0`; the main table's `varst_transformer`)",
    "ridge_blend_1": "the model's ridge probe alone (`ridge_blend=1`)",
    "decode_greedy": "most likely code at each scale",
    "decode_mean_of_samples_n4": "mean of 4 sampled generations (coverage from the same 4 draws)",
    "decode_mean_of_samples_n16": "mean of 16 sampled generations",
    "decode_mean_of_samples_n32": "mean of 32 sampled generations",
    "cfg_2": "classifier-free guidance scale 2 (expected decode)",
    "prefix_1_scale": "decode after the global scale only",
    "prefix_2_scales": "decode after global + pathway scales",
    "tokenizer_ceiling_generated": "NOT a prediction: the test spots' true expression tokenized and decoded from "
    "the scales VARST generates — the ceiling the tokenizer puts on VARST",
    "tokenizer_ceiling_all": "NOT a prediction: the same through all four scales",
    "neighbour_k_0": "stage 2 retrained without neighbour context (`var_config={'neighbour_k': 0}`), same tokenizer",
    "all_4_scales": "stage 2 retrained generating all four scales (`generate_scales=None`), same tokenizer",
    "aux_decode_0": "stage 2 retrained without the auxiliary decode loss (`aux_decode_weight=0`), same tokenizer",
    "aux_decode_teacher": "stage 2 retrained with the auxiliary decode on teacher-forced probabilities "
    "(`aux_decode_mode='teacher'`) instead of the free roll-out inference takes, same tokenizer",
    "coordinates_off": "stage 2 retrained without coordinates (`coordinate_dropout=1.0`), same tokenizer",
    "tokenizer_train_only": "both stages retrained, tokenizer on the training sections only",
    "nar_control": "non-autoregressive control: MLP from the same inputs to code probabilities at the same 41 "
    "positions, frozen stage-1 decoder, CE + aux decode loss, expected decode (no ridge probe: compare it with "
    "`ridge_blend_0`)",
}


def her2st_md(doc: dict) -> str:
    """The readable report."""
    cfg = doc["config"]
    v = doc["protocol"]["varst"]
    L = [
        "# HER2ST benchmark: VARST beside the field's baselines",
        "",
        f"- command: `{doc['command']}`",
        f"- date: {doc['date']}; wall time {doc['wall_time_min']} min; peak RSS {doc['peak_rss_gb']} GB",
        f"- machine: {doc['machine']} (shared with other jobs; load average at the end "
        f"{doc.get('load_average_at_end')})",
        f"- quick mode: {cfg['quick']}"
        + (
            " (a smoke run: cross_B4 trains on C2–C4 only, top-50 genes, 1 + 2 epochs; not a result)"
            if cfg["quick"]
            else ""
        ),
        "",
        "## Protocol",
        "",
        "- splits: `within_C` = leave one section out over C2–C6 (5 folds, ~180 test spots each; numbers are the mean "
        "over folds ± the std over folds); `cross_B4` = train C2–C6, test B4 (283 spots).",
        "- genes, per fold from the training sections only: `top50`, `top250` (seurat_v3 HVG among genes detected in "
        "≥ 10% of training spots), `detected10` (every gene detected in ≥ 10% of training spots, ~10k).",
        "- targets: `log1p` = log1p(counts) (HEST); `cp10k` = log1p(CP10k) with the library size over all genes.",
        "- features: the built-in weights-free morphology descriptor (`pp.embed_histology`, 156-d); `_rgb` rows use "
        "the 6-d RGB mean/std control.",
        f"- VARST: cpu preset, stage 1 {v['stage1_epochs']} epochs (lr 2e-3), stage 2 {v['stage2_epochs']} epochs "
        f"(lr 1e-3), expected-value decoding, {v['n_samples_for_coverage']} samples for the 90% interval; run on "
        f"gene sets {', '.join(v['genesets'])}. Tokenizer sections: {v['tokenizer_sections']}. Stage 2 and every "
        "baseline learn from the fold's training sections only.",
        "- metric: Pearson r per gene over the test spots, mean over genes (HEST convention); genes constant in the "
        "test section are excluded. PCC-10*/PCC-50* (means of the 10/50 best genes, picked on the test spots) are "
        "**optimistic** (Stem/GenAR style) and not comparable to mean r.",
        "- `depth_oracle` is not a method: each gene predicted from the test spot's own log total counts — how much "
        "of a score sequencing depth alone explains. `mean` predicts a constant, so its r is undefined (–).",
        "- defaults: this harness chooses no setting from any test section. The VARST settings are the package "
        "defaults at the time of the run (cpu preset, the demo's learning rates), fixed before this run by the model's "
        "development on HER2ST; the ablations below are reported, not used to pick anything after the fact.",
        "- within patient C, differences under 0.03 are within the fold spread (noise).",
        "",
        "## Headline: VARST vs the best baseline",
        "",
        "Best baseline = highest mean r among ridge, ridge_cv, mlp, knn (morphology and RGB) and mean.",
        "",
        *headline(doc),
        "",
    ]
    seeds = seed_table(doc)
    if seeds:
        L += [
            "## VARST over seeds",
            "",
            "Each seed retrains both stages (model seed; the baselines are the report run's). Means over the folds "
            "every seed ran on; the best baseline is taken on the same folds.",
            "",
            *seeds,
            "",
        ]
    panel = panel_table(doc)
    if panel:
        L += [
            "## VARST fitted on a wider gene panel",
            "",
            "A model fitted on a wider gene set of the same fold and target (top-250, or every detected gene), its "
            "predictions read on the smaller gene set (top-50 lies inside top-250, both inside detected10), to see "
            "whether fitting more genes helps or hurts the ones a user wants. Means over the folds the wider model ran "
            "on; the best baseline on the same folds.",
            "",
            *panel,
            "",
        ]
    ens = ensemble_table(doc)
    if ens:
        L += [
            "## VARST with a stage-2 ensemble",
            "",
            'The same tokenizer, K transformers trained with seeds seed, seed + 1, … (`var_config["ensemble_size"]`, '
            "`--ensemble_size K`), their decoded predictions averaged and their draws pooled; member 0 is the "
            "one-transformer model of the first columns. Means over the folds the ensemble ran on; the best baseline "
            "on the same folds.",
            "",
            *ens,
            "",
        ]
    notes = list(doc.get("notes") or [])
    skipped = doc.get("skipped_for_time") or []
    if skipped:
        notes.append(f"Not run within the time budget ({cfg.get('time_budget_min')} min): " + "; ".join(skipped) + ".")
    if notes:
        L += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    L += ["## All methods per split", ""]
    for name, block in doc["splits"].items():
        info = block.get("_info", {})
        L += [
            f"### {name}",
            "",
            f"test sections: {', '.join(info.get('test_sections', []))}; genes per fold: "
            f"{info.get('n_genes_per_fold')}",
            "",
            *split_table(block),
            "",
        ]
        pre = (block.get("varst") or {}).get("prefix_mean_pearson")
        if pre:
            L += [f"VARST mean r after each generated scale: {' → '.join(_f(x) for x in pre)}", ""]
    if doc["ablations"]:
        L += ["## Ablations", "", "Variants:", ""]
        L += [f"- `{k}`: {t}" for k, t in VARIANT_HELP.items()]
        L += [
            "",
            f"A second seed (model seed {cfg['seed'] + 1}, retrained from stage 1) is run where a variant is within "
            f"{cfg['seed_threshold']} of the default; differences are paired: the variant and the default on the "
            "same folds and seeds ('Δ over seeds' over every fold and seed both ran on; a seed's folds are listed "
            "when fewer than seed 0's).",
            "",
        ]
        for name, block in doc["ablations"].items():
            L += [f"### {name}", "", *ablation_table(block), ""]
    return "\n".join(L) + "\n"


def speed_md(doc: dict) -> str:
    """The speed table."""
    s = doc.get("speed") or {}
    if not s:
        return "# Speed\n\nNot measured in this run.\n"
    peak = s["matmul_fp32_gflops_2_threads"] * 1e9
    peak1 = s.get("matmul_fp32_gflops_1_thread", float("nan")) * 1e9

    def frac(spots_per_s, flops):
        r = spots_per_s * flops
        return f"{r / 1e9:.2f} GFLOP/s = {100 * r / peak:.1f}% (2-thread peak) / {100 * r / peak1:.1f}% (1-thread)"

    rows = [
        (
            "stage 1 training (Lightning pipeline)",
            s["stage1_pipeline_spots_per_s"],
            s["stage1_flops_per_spot"],
            f"{s['stage1_spots']} spots × {s['stage1_epochs']} epochs, batch 256, incl. validation",
        ),
        (
            "stage 1 training (module only: loss+backward+AdamW)",
            s["stage1_module_spots_per_s"],
            s["stage1_flops_per_spot"],
            "one batch of 256, 10 steps",
        ),
        (
            "stage 2 training (Lightning pipeline)",
            s["stage2_pipeline_spots_per_s"],
            s["stage2_flops_per_spot"],
            f"{s['stage2_spots']} spots × {s['stage2_epochs']} epochs, batch 64, incl. validation",
        ),
        (
            "stage 2 training (module only)",
            s["stage2_module_spots_per_s"],
            s["stage2_flops_per_spot"],
            "one batch of 64, 10 steps",
        ),
        (
            f"predict, KV cache ({s['generated_tokens']} tokens)",
            s["predict_cache_spots_per_s"],
            s["predict_cache_flops_per_spot"],
            "expected value, no sampling",
        ),
        (
            f"predict, recompute ({s['generated_tokens']} tokens)",
            s["predict_recompute_spots_per_s"],
            s["predict_recompute_flops_per_spot"],
            "`use_cache=False`",
        ),
        (
            f"predict, KV cache, all 4 scales ({s['generated_tokens_all_scales']} tokens)",
            s["predict4_cache_spots_per_s"],
            s["predict4_cache_flops_per_spot"],
            "stage 2 trained 1 epoch, for timing only",
        ),
        (
            f"predict, recompute, all 4 scales ({s['generated_tokens_all_scales']} tokens)",
            s["predict4_recompute_spots_per_s"],
            s["predict4_recompute_flops_per_spot"],
            "`use_cache=False`",
        ),
    ]
    L = [
        "# Speed (CPU)",
        "",
        f"- command: `{doc['command']}`; measured on {s.get('unit')} (the cpu preset, "
        f"{s['query_spots']} query spots), {doc['date']}",
        f"- machine: {doc['machine']}; the benchmark ran torch and BLAS on {s.get('threads')} thread(s). "
        "**Shared machine**: load average during the speed "
        f"measurements {s.get('load_average_at_speed')} — other jobs competed for the 2 cores, so rates are lower "
        "bounds and vary between runs.",
        f"- measured fp32 matmul peak (`torch.matmul`, 1024³, 2 threads, best of 10): "
        f"{s['matmul_fp32_gflops_2_threads']:.1f} GFLOP/s; on 1 thread {s.get('matmul_fp32_gflops_1_thread', 0):.1f} "
        "GFLOP/s",
        f"- peak RSS of the whole benchmark process: {doc['peak_rss_gb']} GB",
        "- FLOPs per spot from `torch.utils.flop_counter.FlopCounterMode` (matmuls; training = forward + backward).",
        "",
        "| what | spots/s | FLOPs/spot | achieved FLOP/s (% of matmul peak) | notes |",
        "|---|---|---|---|---|",
    ]
    for what, rate, flops, note in rows:
        L.append(f"| {what} | {rate:,.0f} | {flops / 1e6:,.2f} M | {frac(rate, flops)} | {note} |")
    L.append(
        f"| predict with 16 samples (KV cache) | {s['predict_cache_16_samples_spots_per_s']:,.0f} | | | expected value "
        "+ 16 draws for the uncertainty |"
    )
    L += [
        "",
        "Ridge on the same fold and genes (morphology features):",
        "",
        "| baseline | fit s | predict s | train spots | query spots |",
        "|---|---|---|---|---|",
    ]
    for name in ("ridge", "ridge_cv"):
        L.append(
            f"| {name} | {s[f'{name}_fit_s']:.3f} | {s[f'{name}_predict_s']:.4f} | {s[f'{name}_train_spots']} | "
            f"{s[f'{name}_query_spots']} |"
        )
    return "\n".join(L) + "\n"


def write_all(doc: dict, raw: dict, out: Path) -> list[str]:
    """Write ``her2st.json``, ``her2st.md`` and, when the run measured speed, ``speed.md``; return the names written.

    A run without speed measurements (``--no_speed``) leaves an existing ``speed.md`` as it is.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "her2st.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "her2st.md").write_text(her2st_md(doc))
    written = ["her2st.json", "her2st.md"]
    if doc.get("speed"):
        (out / "speed.md").write_text(speed_md(doc))
        written.append("speed.md")
    return written
