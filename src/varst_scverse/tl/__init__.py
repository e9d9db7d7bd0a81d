"""Tools: evaluation metrics and the baselines the benchmark compares against."""

from ._baselines import BASELINES, DepthOracle, KNNRetrieval, MeanPredictor, MLPBaseline, baseline_predict
from ._metrics import evaluate, interval_coverage, pearson_per_gene
from ._ridge import BaseBaseline, RidgeCV, RidgeProbe

__all__ = [
    "evaluate",
    "pearson_per_gene",
    "interval_coverage",
    "baseline_predict",
    "BASELINES",
    "BaseBaseline",
    "MeanPredictor",
    "RidgeProbe",
    "RidgeCV",
    "MLPBaseline",
    "KNNRetrieval",
    "DepthOracle",
]
