"""Fitting: the Isolation Forest outlier model and the yield model, with held-out evaluation.

Both models are scikit-learn Pipelines whose first step is a median imputer, so missing readings
are handled by one set of statistics that the ONNX export copies into the graphs.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
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
from edge_agent.package.manifest import NAME_PATTERN, PAT_ON_EXCESS, YIELD_KINDS
from edge_agent.checked import Checked, Interval, OneOf, Satisfies

from .evaluation import SPLITS, THRESHOLD_OBJECTIVES, Gate, Split, Threshold, chance_gate, choose_threshold, split_rows
from .labels import Label, label_column, read_label
from .outcomes import OUTCOME_COLUMN, OutcomeJoin
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
        "label_pass_value": [None, Satisfies(str, bool, "a label value")],
        "holdout_fraction": [FRACTION],
        "split": [OneOf(*SPLITS)],
        "threshold_objective": [OneOf(*THRESHOLD_OBJECTIVES)],
        "target_precision": [FRACTION],
        "min_auc": [Interval(float, 0, 1)],
        "pat_k_sigma": [Interval(float, 0, None, closed="neither")],
        "pat_max_flag_rate": [Interval(float, 0, 0.5)],
        "pat_on_excess": [OneOf(*PAT_ON_EXCESS)],
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
    yield_threshold: float = 0.5               # threshold_objective "fixed" (and the fallback): fail when p < this
    yield_label: str | None = None             # default: final_pass if present, else passed
    label_pass_value: str | None = None        # the label value that means pass, for codings other than 0/1, bool
    holdout_fraction: float = 0.2
    split: str = "auto"                        # held-out parts: latest lot(s), latest time slice, random
    threshold_objective: str = "fail_f1"       # what the yield threshold is chosen for on held-out parts
    target_precision: float = 0.5              # threshold_objective "fail_precision": the fail precision to reach
    min_auc: float = 0.6                       # below this held-out AUC the package cannot be promoted unforced
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
    label: Label | None = None
    split: Split | None = None
    threshold: Threshold | None = None
    gate: Gate | None = None
    outcomes: OutcomeJoin | None = None


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def fit(table: ParametricTable, config: TrainConfig, progress: Callable[[str], None] = _progress,
        outcomes: OutcomeJoin | None = None) -> TrainedModels:
    """Fit both models and evaluate them on parts they did not see.

    The yield model trains on the earlier parts and is graded on the latest (trainer.evaluation: lot, time or
    random split). The outlier model keeps a seeded random held-out share: it learns no label that could leak, its
    threshold is a calibration over its training parts' scores, and a lot held out of it would leave the deployed
    forest blind to that lot's variation (and fold every synthetic latent outlier of the first lot into its training
    parts, where a cluster of them masks itself).

    The yield label is ``config.yield_label`` (default: ``final_pass`` if present, else ``passed``), or the
    downstream outcome joined by trainer.outcomes when ``outcomes`` (its report) is given. The label column and the
    join keys are never features, whatever the readers took them for.
    """
    config.check()
    if outcomes is not None:
        label = read_label(table, OUTCOME_COLUMN, None, source="outcomes", meaning=_outcome_meaning(outcomes))
        label = replace(label, pass_value=config.label_pass_value)
    else:
        label = read_label(table, label_column(table, config.yield_label), config.label_pass_value)
    columns = [c for c in table.test_columns if c != label.column and c not in (outcomes.join_on if outcomes else ())]
    if not columns:
        raise DataError("no test columns are left once the label is set aside", column=label.column,
                        expected="readings besides the label", got="only the label")
    X = table.readings(columns)
    passed = table.frame["passed"].to_numpy(bool) if "passed" in table.frame.columns else np.ones(len(X), bool)
    outlier_split = split_rows(table.frame, config.holdout_fraction, "random", config.seed)
    train, holdout = outlier_split.train, np.sort(outlier_split.holdout)
    split = split_rows(table.frame, config.holdout_fraction, config.split, config.seed)
    y = label.values
    yield_train = split.train[label.known[split.train]]
    classes = np.unique(y[yield_train])
    if len(classes) < 2:
        raise DataError(f"the yield label {label.column!r} has one class only in the {len(yield_train):,} training "
                        "parts that have one", column=label.column, expected="both passing and failing parts",
                        got="only " + ("none" if not len(classes) else ("pass" if classes[0] == 1 else "fail")))

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
    yield_model = _fit_yield_model(X[yield_train], y[yield_train].astype(int), config, progress)
    timings["yield_fit"] = time.perf_counter() - start

    labelled = split.holdout[label.known[split.holdout]]        # earliest first: tune on the first half
    tuning, evaluation = labelled[:len(labelled) // 2], labelled[len(labelled) // 2:]
    threshold = choose_threshold(yield_model.predict_proba(X[tuning])[:, 1], y[tuning].astype(int),
                                 config.threshold_objective, target_precision=config.target_precision,
                                 fixed=config.yield_threshold)
    yield_metrics = _yield_metrics(yield_model, X, y, labelled, evaluation, threshold.value, label.column)
    gate = chance_gate(yield_metrics["roc_auc"], config.min_auc, len(labelled))
    metrics = {"outlier": _outlier_metrics(table, outlier, outlier_threshold, X, holdout, passed),
               "yield": {**yield_metrics, "tuning_parts": int(len(tuning))}}
    return TrainedModels(config, columns, outlier, outlier_threshold, yield_model, threshold.value, label.column,
                         train, holdout, metrics, timings, label=label, split=split, threshold=threshold, gate=gate,
                         outcomes=outcomes)


def _outcome_meaning(outcomes: OutcomeJoin) -> str:
    files = ", ".join(Path(f).name for f in outcomes.files)
    return (f"the downstream result from {files}, joined to these parts by {', '.join(outcomes.join_on)} "
            f"({outcomes.matched:,} of {outcomes.training_parts:,} parts matched): the model predicts whether a "
            "part measured here passes that later step; parts without an outcome are not in its training or "
            "evaluation.")


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
        "holdout_split": "random",
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


def _yield_metrics(model, X: np.ndarray, y: np.ndarray, holdout: np.ndarray, evaluation: np.ndarray,
                   threshold: float, label: str) -> dict:
    """Threshold-free measures on every labelled held-out part; the threshold's on the evaluation half only."""
    prob = model.predict_proba(X[holdout])[:, 1]
    truth = y[holdout].astype(int)
    both_classes = len(np.unique(truth)) == 2
    edges = np.linspace(0, 1, 11)
    which = np.clip(np.digitize(prob, edges[1:-1]), 0, 9)
    calibration = [{"bin": f"{edges[b]:.1f}-{edges[b + 1]:.1f}", "parts": int(np.sum(which == b)),
                    "mean_predicted": float(prob[which == b].mean()) if np.any(which == b) else None,
                    "observed_pass_rate": float(truth[which == b].mean()) if np.any(which == b) else None}
                   for b in range(10)]
    evaluated = y[evaluation].astype(int)
    predicted_pass = model.predict_proba(X[evaluation])[:, 1] >= threshold
    fail, predicted_fail = evaluated == 0, ~predicted_pass
    both_evaluated = len(np.unique(evaluated)) == 2
    return {
        "label": label,
        "holdout_parts": int(len(holdout)),
        "holdout_pass_rate": float(truth.mean()) if len(truth) else None,
        "roc_auc": float(roc_auc_score(truth, prob)) if both_classes else None,
        "brier": float(brier_score_loss(truth, prob)) if len(truth) else None,
        "calibration": calibration,
        "threshold": threshold,
        "evaluation_parts": int(len(evaluation)),
        "evaluation_fail_parts": int(fail.sum()),
        "f1_fail_class": float(f1_score(fail, predicted_fail)) if both_evaluated else None,
        "f1_pass_class": float(f1_score(~fail, predicted_pass)) if both_evaluated else None,
        "fail_precision": _rate(fail[predicted_fail]),
        "fail_recall": _rate(predicted_fail[fail]),
        "accuracy": _rate(predicted_pass == ~fail),
        "measured_on": "roc_auc, brier, calibration: every held-out part with a label; threshold, f1, precision, "
                       "recall, accuracy: the evaluation parts, the second half of the held-out parts with a label "
                       "(the later half where parts are ordered in time); the threshold was chosen on the first half",
    }


def _rate(mask: np.ndarray) -> float | None:
    return float(mask.mean()) if mask.size else None
