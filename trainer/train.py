"""Fitting: the Isolation Forest outlier model, and the yield model chosen and judged on forward folds.

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
from sklearn.ensemble import IsolationForest
from sklearn.impute import SimpleImputer
from sklearn.metrics import brier_score_loss
from sklearn.pipeline import Pipeline

from edge_agent.errors import DataError, EdgeError
from edge_agent.package.manifest import NAME_PATTERN, PAT_ON_EXCESS, YIELD_KINDS
from edge_agent.checked import Checked, Interval, OneOf, Satisfies

from .evaluation import (THRESHOLD_OBJECTIVES, Folds, Gate, Threshold, chance_gate, choose_threshold,
                         forward_folds, split_rows)
from .forward import (AUTO_CANDIDATES, CANDIDATES, ForwardEvaluation, evaluate_forward, fit_screened,
                      sample_for_folds, screen_signals)
from .labels import LABEL_KINDS, Label, label_column, read_label
from .outcomes import OUTCOME_COLUMN, OutcomeJoin
from .table import ParametricTable

TREES_PER_PROGRESS_STEP = 20
FRACTION = Interval(float, 0, 1, closed="neither")
MAX_SEED = 2 ** 32 - 1          # scikit-learn's random_state
FIDELITY_ROWS = 2000            # training rows a candidate's ONNX graph is compared with scikit-learn on ...
MAX_EXPORT_DIFFERENCE = 1e-4    # ... and the largest pass-probability difference that ships


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
        "yield_model": [OneOf("auto", *YIELD_KINDS)],
        "yield_trees": [Interval(int, 1, None)],
        "yield_max_depth": [None, Interval(int, 1, None)],
        "yield_threshold": [FRACTION],
        "yield_label": [None, Satisfies(str, bool, "a column name")],
        "label_pass_value": [None, Satisfies(str, bool, "a label value")],
        "label_kind": [None, OneOf(*LABEL_KINDS)],
        "holdout_fraction": [FRACTION],
        "forward_folds": [Interval(int, 2, None)],
        "min_train_share": [FRACTION],
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
    yield_model: str = "auto"                  # "auto": the forward folds choose among AUTO_CANDIDATES
    yield_trees: int = 100
    yield_max_depth: int | None = 12
    yield_threshold: float = 0.5               # threshold_objective "fixed" (and the fallback): fail when p < this
    yield_label: str | None = None             # default: final_pass if present, else passed
    label_pass_value: str | None = None        # the label value that means pass, for codings other than 0/1, bool
    label_kind: str | None = None              # "outcome" (a later step's result) or "test-flag" (this step's)
    holdout_fraction: float = 0.2              # the outlier model's random held-out share
    forward_folds: int = 5                     # the yield model's rolling-origin folds
    min_train_share: float = 0.4               # the share of the parts (earliest) the first fold trains on
    threshold_objective: str = "fail_f1"       # what the yield threshold is chosen for on the pooled forward folds
    target_precision: float = 0.5              # threshold_objective "fail_precision": the fail precision to reach
    min_auc: float = 0.55                      # the forward AUC interval's lower bound must reach this
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
    folds: Folds | None = None
    forward: ForwardEvaluation | None = None
    yield_kind: str = ""
    threshold: Threshold | None = None
    gate: Gate | None = None
    outcomes: OutcomeJoin | None = None


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def fit(table: ParametricTable, config: TrainConfig, progress: Callable[[str], None] = _progress,
        outcomes: OutcomeJoin | None = None) -> TrainedModels:
    """Fit both models; choose and judge the yield model on forward folds.

    The yield model: every candidate (``config.yield_model`` alone when one is named) is trained on each forward
    fold's earlier parts and scored on its later ones (trainer.forward); the best mean forward ROC AUC is refit on
    every labelled part and shipped, its threshold chosen on the pooled forward predictions, its gate judged on their
    bootstrap interval. The outlier model keeps a seeded random held-out share: it learns no label that could leak,
    its threshold is a calibration over its training parts' scores, and a lot held out of it would leave the deployed
    forest blind to that lot's variation.

    The yield label is ``config.yield_label`` (default: ``final_pass`` if present, else ``passed``), or the
    downstream outcome joined by trainer.outcomes when ``outcomes`` (its report) is given. The label column and the
    join keys are never features, whatever the readers took them for.
    """
    config.check()
    if outcomes is not None:
        label = read_label(table, OUTCOME_COLUMN, None, source="outcomes", meaning=_outcome_meaning(outcomes))
        label = replace(label, pass_value=config.label_pass_value)
    else:
        label = read_label(table, label_column(table, config.yield_label), config.label_pass_value,
                           kind=config.label_kind)
    columns = [c for c in table.test_columns if c != label.column and c not in (outcomes.join_on if outcomes else ())]
    if not columns:
        raise DataError("no test columns are left once the label is set aside", column=label.column,
                        expected="readings besides the label", got="only the label")
    X = table.readings(columns)
    passed = table.frame["passed"].to_numpy(bool) if "passed" in table.frame.columns else np.ones(len(X), bool)
    outlier_split = split_rows(table.frame, config.holdout_fraction, "random", config.seed)
    train, holdout = outlier_split.train, np.sort(outlier_split.holdout)
    y = label.values
    labelled = np.flatnonzero(label.known)
    classes = np.unique(y[labelled])
    if len(classes) < 2:
        raise DataError(f"the yield label {label.column!r} has one class only in the {len(labelled):,} parts that "
                        "have one", column=label.column, expected="both passing and failing parts",
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
    folds = forward_folds(table.frame.iloc[labelled], config.forward_folds, config.min_train_share)
    order, sampled = sample_for_folds(y, labelled[folds.order])
    names = AUTO_CANDIDATES if config.yield_model == "auto" else (_candidate_of(config.yield_model),)
    forward = evaluate_forward(X, y, folds.pairs(order), config.seed, progress, names, _options(config))
    forward.sampled = sampled
    timings["forward_folds"] = time.perf_counter() - start

    start = time.perf_counter()
    yield_model, chosen, forward.choice = _refit_exportable(X[labelled], y[labelled].astype(int), forward, config,
                                                            progress)
    timings["yield_fit"] = time.perf_counter() - start
    truth = y[forward.rows].astype(int)
    threshold = choose_threshold(chosen.prob, truth, config.threshold_objective,
                                 target_precision=config.target_precision, fixed=config.yield_threshold)
    pooled = chosen.pooled
    gate = chance_gate(pooled.point, pooled.low, pooled.high, config.min_auc, pooled.fails, pooled.parts)
    metrics = {"outlier": _outlier_metrics(table, outlier, outlier_threshold, X, holdout, passed),
               "yield": _yield_metrics(chosen, truth, threshold.value, label.column, forward, folds)}
    return TrainedModels(config, columns, outlier, outlier_threshold, yield_model, threshold.value, label.column,
                         train, holdout, metrics, timings, label=label, folds=folds, forward=forward,
                         yield_kind=CANDIDATES[chosen.name][0], threshold=threshold, gate=gate, outcomes=outcomes)


def _candidate_of(kind: str) -> str:
    """The candidate a named ``--yield-model`` kind trains (the logistic kind is the L2 one)."""
    return {"logistic": "logistic_l2"}.get(kind, kind)


def _options(config: TrainConfig) -> dict:
    return {"trees": config.yield_trees, "max_depth": config.yield_max_depth}


def _refit_exportable(X: np.ndarray, y: np.ndarray, forward: ForwardEvaluation, config: TrainConfig, progress):
    """The best candidate whose ONNX graph reproduces it, refit on every labelled part; why any better one was
    passed over (the package's own fidelity gate judges the shipped one again at its threshold)."""
    from .export.fidelity import check_fidelity
    from .export.yield_model import yield_model_to_onnx
    keep, _ = screen_signals(X)
    # The agent receives float32 readings: scikit-learn is judged on the same rows the graph gets (a float64
    # reading between a split threshold and its float32 neighbour is not one the agent can ever be sent).
    sample32 = X[np.linspace(0, len(X) - 1, min(len(X), FIDELITY_ROWS)).astype(int)].astype(np.float32)
    passed_over = []
    for candidate in forward.candidates:
        progress(f"refitting yield {candidate.name} on {len(X):,} parts")
        pipeline = fit_screened(candidate.name, X, y, keep, config.seed, **_options(config))
        try:
            graph = yield_model_to_onnx(pipeline).SerializeToString()
            check = check_fidelity(graph, pipeline.predict_proba(sample32.astype(np.float64))[:, 1], sample32,
                                   output="pass_probability", threshold=0.5, outlier_below=False, file="yield.onnx",
                                   refuse=False)
        except EdgeError as error:
            passed_over.append(f"{candidate.name} not shipped: it does not export ({error})")
            continue
        if not check.max_abs_diff <= MAX_EXPORT_DIFFERENCE:
            passed_over.append(f"{candidate.name} not shipped: its ONNX graph differs from scikit-learn by up to "
                               f"{check.max_abs_diff:.3g} (at most {MAX_EXPORT_DIFFERENCE:g} is shipped)")
            continue
        note = (f"{candidate.name}: the best mean forward ROC AUC of {len(forward.candidates)} candidate(s)"
                if not passed_over else f"{candidate.name}, the best that exports: " + "; ".join(passed_over))
        return pipeline, candidate, note
    raise EdgeError("no yield candidate exports to ONNX: " + "; ".join(passed_over))


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


def _yield_metrics(chosen, truth: np.ndarray, threshold: float, label: str, forward: ForwardEvaluation,
                   folds: Folds) -> dict:
    """Every measure on the pooled out-of-time predictions of the forward folds (no part scored by a model that
    saw it); the threshold was chosen on the same predictions, so its counts are optimistic by that choice."""
    prob, pooled = chosen.prob, chosen.pooled
    edges = np.linspace(0, 1, 11)
    which = np.clip(np.digitize(prob, edges[1:-1]), 0, 9)
    calibration = [{"bin": f"{edges[b]:.1f}-{edges[b + 1]:.1f}", "parts": int(np.sum(which == b)),
                    "mean_predicted": float(prob[which == b].mean()) if np.any(which == b) else None,
                    "observed_pass_rate": float(truth[which == b].mean()) if np.any(which == b) else None}
                   for b in range(10)]
    fail, predicted_fail = truth == 0, prob < threshold
    caught, flagged = int((fail & predicted_fail).sum()), int(predicted_fail.sum())
    return {
        "label": label,
        "split": f"forward folds ({folds.kind})",
        "evaluated_parts": pooled.parts,
        "fail_parts": pooled.fails,
        "pass_rate": float(truth.mean()) if len(truth) else None,
        "roc_auc": pooled.point,
        "roc_auc_low": pooled.low,
        "roc_auc_high": pooled.high,
        "brier": float(brier_score_loss(truth, prob)) if len(truth) else None,
        "calibration": calibration,
        "threshold": threshold,
        "flagged_parts": flagged,
        "caught_fails": caught,
        "fail_precision": caught / flagged if flagged else None,
        "fail_recall": caught / pooled.fails if pooled.fails else None,
        "tuning_parts": pooled.parts,
        "evaluation_parts": pooled.parts,
        "forward": forward.to_dict(),
        "measured_on": "every measure: the pooled out-of-time predictions of the forward folds, each part scored by a "
                       "model trained only on earlier parts; interval: 95% bootstrap over those parts; the "
                       "threshold was chosen on the same predictions (its precision and recall are optimistic by "
                       "that choice)",
    }


def _rate(mask: np.ndarray) -> float | None:
    return float(mask.mean()) if mask.size else None
