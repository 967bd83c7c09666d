"""Choosing the yield model on the future: rolling-origin folds, candidates, pooled out-of-time intervals.

Every candidate is trained on each fold's earlier parts only and scored on the fold's later parts
(trainer.evaluation.forward_folds). Signals are screened on the training part of each fold: mostly missing, constant
and duplicated signals carry nothing a later part can use. The candidate with the best mean forward ROC AUC is
refit on every part and shipped; its interval comes from a bootstrap over the pooled out-of-time predictions of the
folds, so it says how much the failing parts behind it can tell.

Screened signals are kept in the pipeline's input (the package's features are shared with the outlier model and
PAT) but replaced by a constant while fitting: no tree splits on a constant and a logistic regression's
coefficient on it stays exactly zero, so what the agent sends in those columns changes nothing.

Above ``FOLD_ROW_CAP`` parts the folds run on an evenly spread sample of the passing parts with every failing
part, in time order; the shipped model is still refit on every part.

The random forest's trees draw at most ``FOLD_FOREST_ROWS_PER_TREE`` bootstrap rows each in the folds and
``FOREST_ROWS_PER_TREE`` in the shipped refit (as many trees in both): it was most of the fit's time, and the cap
costs it little forward AUC where fewer trees cost it much (measured figures at the constants).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

MOSTLY_MISSING = 0.5           # a signal missing on more than this share of the training parts is screened out
FOLD_ROW_CAP = 200_000         # parts the forward folds train and score on at most (every failing part kept)
# Bootstrap rows per tree of the random forest candidate, at most: in the forward folds, and shipped (its refit).
# Measured on synthetic 200-test parts, first fold of 100,000 (40,000 earlier -> 12,000 later), 2 cores, 100 trees:
# every row per tree 0.793 forward AUC in ~40 s; 25,000 rows 0.792 in 20 s; 15,000 rows 0.790 in 14 s; while 40
# trees on every row fell to 0.781 (enough to hand a near tie to another candidate), so the tree count is kept.
# Uncapped, the folds' forest took 319 of a 522 s fit at 100,000 parts (the Isolation Forest: 5.7 s); capped at
# 25,000, 221 of a 694 s fit at 1,000,000 parts (folds on 216,233 of them; the Isolation Forest: 62 s).
FOLD_FOREST_ROWS_PER_TREE = 25_000
# The shipped forest's trees keep the depth limit (12) and so their size; a tree's cost grows with its rows, so
# 150,000 per tree bound a refit on 1,000,000 parts to roughly a sixth of drawing all 1,000,000 (an estimate: the
# bench's synthetic parts ship gradient boosting, so this refit was not timed at that size).
FOREST_ROWS_PER_TREE = 150_000
BOOTSTRAP_DRAWS = 1000
CONFIDENCE = 0.95

# candidate name -> (manifest kind, what it is in words)
CANDIDATES = {
    "logistic_l2": ("logistic", "L2 logistic regression (C 0.05, scaled, class-weighted)"),
    "logistic_l1": ("logistic", "L1 logistic regression (C 0.05, scaled, class-weighted)"),
    "hist_gradient_boosting": ("hist_gradient_boosting",
                               "histogram gradient boosting (150 rounds, 15 leaves; imbalance left to the threshold)"),
    "random_forest": ("random_forest", f"random forest (--yield-trees trees, class-weighted; at most "
                                       f"{FOLD_FOREST_ROWS_PER_TREE:,} rows per tree in the forward folds, "
                                       f"{FOREST_ROWS_PER_TREE:,} shipped)"),
    "mlp": ("mlp", "multilayer perceptron (64, 32; scaled)"),
}
AUTO_CANDIDATES = ("logistic_l2", "logistic_l1", "hist_gradient_boosting", "random_forest")


def candidate_pipeline(name: str, seed: int, trees: int = 100, max_depth: int | None = 12,
                       rows_per_tree: int | None = None) -> Pipeline:
    """A fresh, unfitted pipeline of candidate ``name``: median imputer first, as the exporter expects.

    ``rows_per_tree``: the random forest's bootstrap rows per tree (None: as many as it is fit on)."""
    impute = SimpleImputer(strategy="median", keep_empty_features=True)
    if name in ("logistic_l2", "logistic_l1"):
        model = LogisticRegression(C=0.05, l1_ratio=1.0 if name == "logistic_l1" else 0.0, solver="liblinear",
                                   class_weight="balanced", max_iter=500, random_state=seed)
        return Pipeline([("impute", impute), ("scale", StandardScaler()), ("model", model)])
    if name == "hist_gradient_boosting":
        model = HistGradientBoostingClassifier(max_iter=150, learning_rate=0.05, max_leaf_nodes=15,
                                               min_samples_leaf=20, l2_regularization=1.0, early_stopping=False,
                                               random_state=seed)
        # No class weights: with them scikit-learn 1.9's fit took 25x longer (34 s against 1.4 s on 8,800 x 200
        # here), and neither the ranking (AUC) nor the threshold, chosen on the forward folds, needs them.
    elif name == "random_forest":
        model = RandomForestClassifier(n_estimators=trees, max_depth=max_depth, min_samples_leaf=5,
                                       max_features="sqrt", class_weight="balanced_subsample", n_jobs=-1,
                                       max_samples=rows_per_tree, random_state=seed)
    elif name == "mlp":
        model = MLPClassifier(hidden_layer_sizes=(64, 32), early_stopping=True, max_iter=200, random_state=seed)
        return Pipeline([("impute", impute), ("scale", StandardScaler()), ("model", model)])
    else:
        raise ValueError(f"unknown yield candidate {name!r}: expected one of {', '.join(CANDIDATES)}")
    return Pipeline([("impute", impute), ("model", model)])


def screen_signals(X: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """The signals worth learning from in ``X`` (a boolean mask) and how many each screen removed."""
    missing = np.isnan(X).mean(axis=0) > MOSTLY_MISSING
    filled = np.where(np.isnan(X), np.nanmedian(np.where(missing, 0.0, X), axis=0), X) if X.size else X
    constant = ~missing & (np.nanmax(filled, axis=0) == np.nanmin(filled, axis=0))
    keep = ~missing & ~constant
    duplicated = np.zeros(X.shape[1], bool)
    kept = np.flatnonzero(keep)
    if kept.size:
        # Duplicates compare the raw columns (NaN where missing) by their bytes: equal columns, one kept.
        _, first = np.unique(np.ascontiguousarray(np.nan_to_num(X[:, kept], nan=np.inf).T).view(
            np.dtype((np.void, X.dtype.itemsize * X.shape[0]))), return_index=True)
        duplicated[kept] = True
        duplicated[kept[first]] = False
    keep &= ~duplicated
    return keep, {"mostly_missing": int(missing.sum()), "constant": int(constant.sum()),
                  "duplicated": int(duplicated.sum())}


def fit_screened(name: str, X: np.ndarray, y: np.ndarray, keep: np.ndarray, seed: int, in_folds: bool = False,
                 **options) -> Pipeline:
    """Candidate ``name`` fit on ``X`` with the screened-out signals held constant (module docstring); a random
    forest's rows per tree are capped, ``in_folds`` more tightly."""
    held = X.copy() if not keep.all() else X
    held[:, ~keep] = 0.0
    if name == "random_forest":
        options = dict(options)
        cap = FOLD_FOREST_ROWS_PER_TREE if in_folds else FOREST_ROWS_PER_TREE
        # An integer max_samples draws that many rows even from fewer parts: below the cap, the usual bootstrap.
        options["rows_per_tree"] = cap if len(held) > cap else None
    return candidate_pipeline(name, seed, **options).fit(held, y)


@dataclass(frozen=True)
class Interval:
    point: float | None
    low: float | None
    high: float | None
    fails: int
    parts: int


@dataclass
class CandidateResult:
    name: str
    fold_auc: list[float | None]
    pooled: Interval
    prob: np.ndarray = field(repr=False)        # pooled forward pass probabilities, in fold order

    @property
    def mean_auc(self) -> float | None:
        known = [a for a in self.fold_auc if a is not None]
        return float(np.mean(known)) if known else None


@dataclass
class ForwardEvaluation:
    folds: list[dict]                      # per fold: train/test parts and fails, test period
    candidates: list[CandidateResult]      # best mean forward AUC first
    rows: np.ndarray                       # the pooled rows the candidates' ``prob`` are in the order of
    sampled: str | None                    # how the folds were sampled above the row cap, else None
    screened: list[dict]                   # per fold: what the screens removed
    choice: str = ""                       # which candidate was shipped and why

    def to_dict(self) -> dict:
        """What the manifest keeps: the comparison table, the intervals, the choice (no per-part predictions)."""
        return {"folds": self.folds, "screened": self.screened, "sampled": self.sampled, "choice": self.choice,
                "candidates": [{"name": c.name, "kind": CANDIDATES[c.name][0], "what": CANDIDATES[c.name][1],
                                "fold_auc": c.fold_auc, "mean_auc": c.mean_auc, "pooled_auc": c.pooled.point,
                                "pooled_low": c.pooled.low, "pooled_high": c.pooled.high}
                               for c in self.candidates]}


def evaluate_forward(X: np.ndarray, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]], seed: int,
                     progress: Callable[[str], None], names=AUTO_CANDIDATES, options: dict | None = None
                     ) -> ForwardEvaluation:
    """Every candidate on every fold (train rows before test rows); ``y`` 1 pass, 0 fail."""
    results = {name: ([], []) for name in names}
    fold_rows, screened = [], []
    for number, (train, test) in enumerate(folds, 1):
        keep, removed = screen_signals(X[train])
        screened.append(removed)
        fold_rows.append(test)
        for name in names:
            if len(np.unique(y[train])) < 2:
                prob = np.full(len(test), float(y[train][0]))
            else:
                prob = fit_screened(name, X[train], y[train], keep, seed, in_folds=True,
                                    **(options or {})).predict_proba(X[test])[:, 1]
            results[name][0].append(_auc(y[test], prob))
            results[name][1].append(prob)
        progress(f"forward fold {number}/{len(folds)}: {len(train):,} earlier parts -> {len(test):,} later "
                 f"({int((y[test] == 0).sum())} failing); " + ", ".join(
                     f"{name} {_text(results[name][0][-1])}" for name in names))
    rows = np.concatenate(fold_rows)
    candidates = [CandidateResult(name, aucs, bootstrap_auc(y[rows], np.concatenate(probs), seed),
                                  np.concatenate(probs)) for name, (aucs, probs) in results.items()]
    candidates.sort(key=lambda c: -1.0 if c.mean_auc is None else -c.mean_auc)
    folds_shown = [{"train_parts": int(len(train)), "train_fails": int((y[train] == 0).sum()),
                    "test_parts": int(len(test)), "test_fails": int((y[test] == 0).sum())} for train, test in folds]
    return ForwardEvaluation(folds_shown, candidates, rows, None, screened)


def bootstrap_auc(y: np.ndarray, prob: np.ndarray, seed: int, draws: int = BOOTSTRAP_DRAWS) -> Interval:
    """ROC AUC of ``prob`` for ``y`` with a percentile bootstrap interval over the parts (CONFIDENCE)."""
    fails, parts = int((y == 0).sum()), int(len(y))
    point = _auc(y, prob)
    if point is None:
        return Interval(None, None, None, fails, parts)
    # One sort, then every draw is a weighted Mann-Whitney count: a draw's weights are how often it took each part.
    order = np.argsort(prob, kind="stable")
    sorted_prob, positive = prob[order], y[order] == 1
    group = np.concatenate([[0], np.cumsum(sorted_prob[1:] != sorted_prob[:-1])])
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(draws):
        weight = np.bincount(rng.integers(parts, size=parts), minlength=parts)[order].astype(float)
        pos, neg = np.where(positive, weight, 0.0), np.where(positive, 0.0, weight)
        neg_in_group = np.bincount(group, neg)
        below = np.cumsum(neg_in_group) - neg_in_group          # negatives strictly below each tie group
        total_pos, total_neg = pos.sum(), neg.sum()
        if total_pos == 0 or total_neg == 0:
            continue
        wins = np.sum(pos * (below[group] + 0.5 * neg_in_group[group]))
        estimates.append(wins / (total_pos * total_neg))
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return Interval(point, float(low), float(high), fails, parts)


def sample_for_folds(y: np.ndarray, order: np.ndarray, cap: int = FOLD_ROW_CAP) -> tuple[np.ndarray, str | None]:
    """``order`` (rows in time order) thinned to ``cap`` rows: every failing part, passing parts evenly spread."""
    if len(order) <= cap:
        return order, None
    failing = order[y[order] == 0]
    passing = order[y[order] == 1]
    room = max(cap - len(failing), min(cap, len(passing)) // 2)
    chosen = np.zeros(len(y), bool)
    chosen[failing] = True
    chosen[passing[np.linspace(0, len(passing) - 1, min(room, len(passing))).astype(int)]] = True
    kept = order[chosen[order]]
    return kept, (f"the forward folds ran on {len(kept):,} of {len(order):,} parts (all {len(failing):,} failing "
                  f"parts, passing parts evenly spread in time; cap {cap:,}); the shipped model is refit on all")


def _auc(y: np.ndarray, prob: np.ndarray) -> float | None:
    return float(roc_auc_score(y, prob)) if len(np.unique(y)) == 2 else None


def _text(auc: float | None) -> str:
    return "n/a" if auc is None else f"{auc:.3f}"
