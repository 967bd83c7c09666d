"""Fitting: the Isolation Forest outlier model and the yield model, with held-out evaluation.

Both models are scikit-learn Pipelines whose first step is a median imputer, so missing readings
are handled by one set of statistics that the ONNX export copies into the graphs.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
from sklearn.ensemble import IsolationForest, RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, f1_score, roc_auc_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from edge_agent.errors import DataError, EdgeError
from edge_agent.package.manifest import NAME_PATTERN, YIELD_KINDS
from edge_agent.package.rules import ON_EXCESS
from edge_agent.settings import Checked, Interval, OneOf, Satisfies

from .table import ParametricTable

TREES_PER_PROGRESS_STEP = 20
FRACTION = Interval(float, 0, 1, closed="neither")
MAX_SEED = 2 ** 32 - 1          # scikit-learn's random_state


class TrainConfigError(EdgeError, ValueError):
    """Training options that cannot be used (a ValueError, as scikit-learn's own parameter errors are)."""


@dataclass
class TrainConfig(Checked):
    """What to fit. Checked (``problems()``) before any data is read, so no option fails deep inside scikit-learn."""

    ERROR = TrainConfigError
    CONSTRAINTS = {
        "name": [Satisfies(str, NAME_PATTERN.fullmatch, "a model name: letters, digits, '.', '_' or '-', first a "
                                                              "letter or digit, at most 128 characters")],
        "n_trees": [Interval(int, 1, None)],
        "max_samples": [OneOf("auto"), Interval(int, 1, None), Interval(float, 0, 1, closed="right")],
        "max_features": [Interval(int, 1, None), Interval(float, 0, 1, closed="right")],
        "contamination": [OneOf("auto"), Interval(float, 0, 0.5, closed="right")],
        "target_outlier_rate": [Interval(float, 0, 0.5, closed="neither")],
        "train_outlier_on": [OneOf("passing", "all")],
        "yield_model": [OneOf(*YIELD_KINDS)],
        "yield_trees": [Interval(int, 1, None)],
        "yield_max_depth": [None, Interval(int, 1, None)],
        "yield_threshold": [FRACTION],
        "yield_label": [None, Satisfies(str, bool, "a column name")],
        "holdout_fraction": [FRACTION],
        "pat_k_sigma": [Interval(float, 0, None, closed="neither")],
        "pat_max_flag_rate": [Interval(float, 0, 0.5)],
        "pat_on_excess": [OneOf(*ON_EXCESS)],
        "drift_bins": [Interval(int, 2, None)],
        "seed": [Interval(int, 0, MAX_SEED)],
    }

    name: str = "demo"
    n_trees: int = 200
    max_samples: int | float | str = "auto"
    max_features: float = 1.0
    contamination: str | float = "auto"
    target_outlier_rate: float = 0.01
    train_outlier_on: str = "passing"          # "passing" parts only, or "all"
    yield_model: str = "random_forest"
    yield_trees: int = 100
    yield_max_depth: int | None = 12
    yield_threshold: float = 0.5               # predicted fail when pass probability < threshold
    yield_label: str | None = None             # default: final_pass if present, else passed
    holdout_fraction: float = 0.2
    pat_k_sigma: float = 6.0
    pat_max_flag_rate: float = 0.001           # static PAT self-check: a test flagging more passing parts is ...
    pat_on_excess: str = "widen"               # ... widened to that rate, or "disable"d
    drift_bins: int = 10
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainedModels:
    config: TrainConfig
    columns: list[str]
    outlier: Pipeline
    outlier_threshold: float
    yield_model: Pipeline
    yield_threshold: float
    yield_label: str
    train_index: np.ndarray
    holdout_index: np.ndarray
    metrics: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def fit(table: ParametricTable, config: TrainConfig,
        progress: Callable[[str], None] = _progress) -> TrainedModels:
    """Fit both models on a random split of ``table`` and evaluate them on the held-out part."""
    config.check()
    label_name = config.yield_label or ("final_pass" if "final_pass" in table.frame.columns else "passed")
    if label_name not in table.frame.columns:
        raise DataError("the yield label column is missing", column=label_name,
                        expected="a 0/1 or boolean column", got="no such column")
    X = table.readings()
    labels = table.frame[label_name].to_numpy()
    if labels.dtype == object or np.any(~np.isin(labels.astype(float), (0.0, 1.0))):
        raise DataError("the yield label must be 0/1 or boolean", column=label_name,
                        expected="0/1", got=f"values {np.unique(labels.astype(str))[:5].tolist()}")
    y = labels.astype(int)
    passed = table.frame["passed"].to_numpy(bool) if "passed" in table.frame.columns else np.ones(len(X), bool)

    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(X))
    n_holdout = max(1, int(round(len(X) * config.holdout_fraction)))
    holdout, train = np.sort(order[:n_holdout]), np.sort(order[n_holdout:])
    if len(np.unique(y[train])) < 2:
        raise DataError(f"the yield label {label_name!r} has one class only in the training rows",
                        column=label_name, expected="both passing and failing parts",
                        got=f"only {int(y[train][0])}")

    timings = {}
    start = time.perf_counter()
    outlier_rows = train[passed[train]] if config.train_outlier_on == "passing" else train
    if len(outlier_rows) < 50:
        raise DataError("too few passing parts to train the outlier model", expected=">= 50",
                        got=str(len(outlier_rows)))
    outlier = _fit_isolation_forest(X[outlier_rows], config, progress)
    train_scores = outlier.decision_function(X[outlier_rows])
    outlier_threshold = float(np.quantile(train_scores, config.target_outlier_rate))
    timings["outlier_fit"] = time.perf_counter() - start

    start = time.perf_counter()
    yield_model = _fit_yield_model(X[train], y[train], config, progress)
    yield_threshold = config.yield_threshold
    timings["yield_fit"] = time.perf_counter() - start

    metrics = {
        "outlier": _outlier_metrics(table, outlier, outlier_threshold, X, holdout, passed),
        "yield": _yield_metrics(yield_model, X[holdout], y[holdout], yield_threshold, label_name),
    }
    return TrainedModels(config, table.test_columns, outlier, outlier_threshold, yield_model,
                         yield_threshold, label_name, train, holdout, metrics, timings)


def _fit_isolation_forest(X: np.ndarray, config: TrainConfig, progress) -> Pipeline:
    forest = IsolationForest(n_estimators=0, max_samples=config.max_samples, max_features=config.max_features,
                             contamination=config.contamination, random_state=config.seed, warm_start=True)
    pipeline = Pipeline([("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
                         ("forest", forest)])
    imputed = pipeline.named_steps["impute"].fit_transform(X)
    _grow_in_steps(forest, imputed, None, config.n_trees, "isolation forest", progress)
    return pipeline


def _fit_yield_model(X: np.ndarray, y: np.ndarray, config: TrainConfig, progress) -> Pipeline:
    impute = SimpleImputer(strategy="median", keep_empty_features=True)
    if config.yield_model == "random_forest":
        model = RandomForestClassifier(n_estimators=0, max_depth=config.yield_max_depth, min_samples_leaf=5,
                                       n_jobs=-1, random_state=config.seed, warm_start=True)
        pipeline = Pipeline([("impute", impute), ("model", model)])
        _grow_in_steps(model, impute.fit_transform(X), y, config.yield_trees, "yield random forest", progress)
        return pipeline
    if config.yield_model == "logistic":
        model = LogisticRegression(max_iter=2000, C=1.0)
    else:
        model = MLPClassifier(hidden_layer_sizes=(64, 32), early_stopping=True, max_iter=200,
                              random_state=config.seed)
    progress(f"fitting yield {config.yield_model} on {len(X):,} parts")
    pipeline = Pipeline([("impute", impute), ("scale", StandardScaler()), ("model", model)])
    return pipeline.fit(X, y)


def _grow_in_steps(forest, X: np.ndarray, y: np.ndarray | None, n_trees: int, what: str, progress) -> None:
    """Grow a warm-startable forest a few trees at a time so long fits show progress."""
    start = time.perf_counter()
    grown = 0
    while grown < n_trees:
        grown = min(n_trees, grown + TREES_PER_PROGRESS_STEP)
        forest.set_params(n_estimators=grown)
        forest.fit(X) if y is None else forest.fit(X, y)
        progress(f"{what}: {grown}/{n_trees} trees on {len(X):,} parts ({time.perf_counter() - start:.1f} s)")


def _outlier_metrics(table, outlier, threshold, X, holdout, passed) -> dict:
    scores = outlier.decision_function(X[holdout])
    flagged = scores < threshold
    metrics = {
        "threshold": threshold,
        "holdout_parts": int(len(holdout)),
        "holdout_outlier_rate_passing": _rate(flagged[passed[holdout]]),
        "holdout_outlier_rate_failing": _rate(flagged[~passed[holdout]]),
    }
    if "truth_excursion" in table.frame.columns:
        truth = table.frame["truth_excursion"].to_numpy(dtype=str)[holdout]
        latent = truth == "latent_outliers"
        if latent.any():
            metrics["latent_outlier_recall"] = _rate(flagged[latent])
            metrics["latent_outlier_parts"] = int(latent.sum())
            metrics["precision_vs_latent_truth_among_passing"] = _rate(latent[flagged & passed[holdout]])
    return metrics


def _yield_metrics(model, X, y, threshold, label) -> dict:
    prob = model.predict_proba(X)[:, 1]
    predicted = prob >= threshold
    both_classes = len(np.unique(y)) == 2
    edges = np.linspace(0, 1, 11)
    which = np.clip(np.digitize(prob, edges[1:-1]), 0, 9)
    calibration = [{"bin": f"{edges[b]:.1f}-{edges[b + 1]:.1f}", "parts": int(np.sum(which == b)),
                    "mean_predicted": float(prob[which == b].mean()) if np.any(which == b) else None,
                    "observed_pass_rate": float(y[which == b].mean()) if np.any(which == b) else None}
                   for b in range(10)]
    return {
        "label": label,
        "holdout_parts": int(len(y)),
        "holdout_pass_rate": float(y.mean()),
        "roc_auc": float(roc_auc_score(y, prob)) if both_classes else None,
        "f1_fail_class": float(f1_score(1 - y, ~predicted)) if both_classes else None,
        "f1_pass_class": float(f1_score(y, predicted)) if both_classes else None,
        "accuracy": float(np.mean(predicted == y)),
        "brier": float(brier_score_loss(y, prob)),
        "threshold": threshold,
        "calibration": calibration,
    }


def _rate(mask: np.ndarray) -> float | None:
    return float(mask.mean()) if mask.size else None
