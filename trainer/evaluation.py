"""Honest evaluation: which parts are held out, how the yield threshold is chosen, and the gate against chance.

A model is used on the parts that come after its training data, so that is what it is graded on:

- ``lot`` (the default when the data has more than one lot): the latest lot(s) are held out, as many of the latest
  as it takes to reach ``holdout_fraction`` of the parts (at least one lot, never all). Lots are ordered by their
  last timestamp where the data has one, else by their first appearance in the input (the order of ``--data``).
- ``time`` (the default for one lot with timestamps): the latest ``holdout_fraction`` of the parts by timestamp.
- ``random`` (the default only without lots or times): a seeded random share. On tester data it flatters a model
  (parts of one wafer sit on both sides), so the manifest says when it was used and why.

The yield model's decision threshold (predicted fail when the pass probability is below it) is chosen for a stated
objective on held-out parts, never fixed at 0.5: with a few percent of failing parts a 0.5 threshold almost never
predicts a fail. So that no measure grades the rows it was tuned on, the held-out parts are cut in two: the
threshold is chosen on the first (earlier) half, and every measure that depends on it (F1, precision, recall,
accuracy) is taken on the second. Measures that need no threshold (ROC AUC, Brier score, calibration) use every
held-out part.

A yield model whose held-out ROC AUC is below ``min_auc`` (0.6 by default) is no better than chance for a decision:
its package is published as a candidate with a warning, and the registry refuses to promote it to staging or
production without force and a reason, which the history records (edge_agent.package.registry).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve

from edge_agent.errors import DataError
from edge_agent.package.manifest import THRESHOLD_OBJECTIVES

SPLITS = ("auto", "lot", "time", "random")


@dataclass(frozen=True)
class Split:
    """Training and held-out rows; ``holdout`` in time order where the data has one (the tuning half first)."""

    kind: str                    # "lot", "time" or "random"
    reason: str
    train: np.ndarray            # row indexes, ascending
    holdout: np.ndarray          # row indexes, earliest first (random order for a random split)
    held_out_lots: list[str]
    training_lots: list[str]
    time_from: float | None      # split "time": the first held-out timestamp (unix seconds)


def split_rows(frame: pd.DataFrame, fraction: float, how: str = "auto", seed: int = 0) -> Split:
    """Hold out the latest lot(s), else the latest time slice, else a random share (module docstring)."""
    if how not in SPLITS:
        raise DataError("unknown held-out split", expected=" | ".join(SPLITS), got=repr(how))
    n = len(frame)
    lots = _lots(frame)
    times = _times(frame)
    distinct_lots = list(dict.fromkeys(lots)) if lots is not None else []
    if how == "lot" or (how == "auto" and len(distinct_lots) > 1):
        if len(distinct_lots) < 2:
            raise DataError("--split lot needs at least two lots in the training data", column="lot",
                            expected="two or more lots", got=f"{len(distinct_lots)}: {', '.join(distinct_lots)}")
        return _by_lot(lots, distinct_lots, times, fraction)
    if how == "time" or (how == "auto" and times is not None):
        if times is None:
            raise DataError("--split time needs a timestamp on every part", column="timestamp",
                            expected="a finite timestamp per part", got=_times_problem(frame))
        return _by_time(times, fraction, distinct_lots)
    reason = ("asked for (--split random)" if how == "random" else
              f"the data has {len(distinct_lots) or 'no'} lot{'s' if len(distinct_lots) != 1 else ''} and "
              f"{_times_problem(frame)}: nothing orders the parts in time")
    order = np.random.default_rng(seed).permutation(n)
    n_holdout = max(1, int(round(n * fraction)))
    return Split("random", reason, np.sort(order[n_holdout:]), order[:n_holdout], [], distinct_lots, None)


def _lots(frame: pd.DataFrame) -> np.ndarray | None:
    if "lot" not in frame.columns:
        return None
    return frame["lot"].astype(object).where(frame["lot"].notna(), "").astype(str).to_numpy()


def _times(frame: pd.DataFrame) -> np.ndarray | None:
    """Timestamps when every part has one and they are not all equal, else None."""
    if "timestamp" not in frame.columns:
        return None
    times = pd.to_numeric(frame["timestamp"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    if not np.isfinite(times).all() or len(np.unique(times)) < 2:
        return None
    return times


def _times_problem(frame: pd.DataFrame) -> str:
    if "timestamp" not in frame.columns:
        return "no timestamp column"
    times = pd.to_numeric(frame["timestamp"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    missing = int((~np.isfinite(times)).sum())
    return f"{missing:,} of {len(times):,} parts without a timestamp" if missing else "one timestamp for all parts"


def _by_lot(lots: np.ndarray, distinct: list[str], times: np.ndarray | None, fraction: float) -> Split:
    if times is not None:
        last = {lot: times[lots == lot].max() for lot in distinct}
        ordered = sorted(distinct, key=lambda lot: last[lot])      # stable: ties keep input order
        how = "ordered by their last timestamp"
    else:
        ordered, how = distinct, "ordered as the input gives them (no timestamps)"
    sizes = {lot: int((lots == lot).sum()) for lot in distinct}
    held: list[str] = []
    for lot in reversed(ordered[1:]):      # never the first lot: something must be left to train on
        held.insert(0, lot)
        if sum(sizes[h] for h in held) >= fraction * len(lots):
            break
    is_held = np.isin(lots, held)
    holdout = np.flatnonzero(is_held)
    if times is not None:
        holdout = holdout[np.argsort(times[holdout], kind="stable")]
    training = [lot for lot in ordered if lot not in held]
    reason = (f"{len(distinct)} lots, {how}: the latest {len(held)} held out "
              f"({is_held.sum():,} parts, {is_held.mean():.0%}), the models trained on the earlier ones")
    return Split("lot", reason, np.flatnonzero(~is_held), holdout, held, training, None)


def _by_time(times: np.ndarray, fraction: float, lots: list[str]) -> Split:
    order = np.argsort(times, kind="stable")
    n_holdout = max(1, int(round(len(times) * fraction)))
    holdout = order[len(order) - n_holdout:]
    start = float(times[holdout[0]])
    reason = (f"{'one lot' if len(lots) == 1 else 'no lot column'} with timestamps: the latest {fraction:.0%} of "
              f"the parts by time held out (from {pd.Timestamp(start, unit='s').isoformat()} UTC)")
    return Split("time", reason, np.sort(order[:len(order) - n_holdout]), holdout, [], lots, start)


# ---- forward folds ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Folds:
    """Rolling-origin folds: each trains on every part before its test block (rows in ``order``)."""

    kind: str                    # "lot", "time" or "input" (what orders the parts)
    reason: str
    order: np.ndarray            # every row, earliest first
    cuts: list[int]              # positions in ``order`` where test blocks start; the last ends at len(order)

    def pairs(self, order: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """(train rows, test rows) per fold; ``order`` a thinned copy of ``self.order`` (same relative order)."""
        rows = self.order if order is None else order
        share = [cut / len(self.order) for cut in self.cuts] + [1.0]
        ends = [int(round(s * len(rows))) for s in share]
        return [(rows[:ends[i]], rows[ends[i]:ends[i + 1]]) for i in range(len(self.cuts))]


def forward_folds(frame: pd.DataFrame, k: int = 5, min_train_share: float = 0.4) -> Folds:
    """``k`` forward folds over the parts in time order (lots in order, whole lots per block where there are
    more lots than folds; else the input order), the first training on the earliest ``min_train_share``."""
    n = len(frame)
    lots, times = _lots(frame), _times(frame)
    distinct = list(dict.fromkeys(lots)) if lots is not None else []
    if len(distinct) > 1:
        last = {lot: times[lots == lot].max() for lot in distinct} if times is not None else {}
        ranked = sorted(distinct, key=lambda lot: last.get(lot, 0.0))
        rank = {lot: i for i, lot in enumerate(ranked)}
        within = times if times is not None else np.arange(n, dtype=float)
        order = np.lexsort((within, np.array([rank[lot] for lot in lots])))
        kind, how = "lot", (f"{len(distinct)} lots ordered by their last timestamp" if times is not None
                            else f"{len(distinct)} lots in the order the input gives them")
    elif times is not None:
        order, kind = np.argsort(times, kind="stable"), "time"
        how = (f"ordered by timestamp, {pd.Timestamp(times.min(), unit='s').isoformat()} to "
               f"{pd.Timestamp(times.max(), unit='s').isoformat()} UTC")
    else:
        order, kind = np.arange(n), "input"
        how = f"no lots or timestamps ({_times_problem(frame)}): in the order of the input"
    start = int(round(n * min_train_share))
    cuts = [start + int(round(i * (n - start) / k)) for i in range(k)]
    if kind == "lot" and len(distinct) > k:
        boundaries = np.flatnonzero(np.r_[True, lots[order][1:] != lots[order][:-1]])
        cuts = sorted({int(boundaries[np.argmin(np.abs(boundaries - c))]) for c in cuts} - {0})
    reason = (f"{len(cuts)} forward folds, parts {how}: each fold trains on every part before its block "
              f"(the first on the earliest {cuts[0] / n:.0%}) and is scored on the block")
    return Folds(kind, reason, order, cuts)


# ---- the yield threshold ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Threshold:
    value: float
    objective: str
    note: str


def choose_threshold(prob: np.ndarray, y: np.ndarray, objective: str, *, target_precision: float,
                     fixed: float) -> Threshold:
    """The pass-probability threshold below which a part is predicted to fail, chosen on (prob, y) for
    ``objective``; ``fixed`` when the objective is "fixed" or the rows cannot choose (one class only)."""
    if objective not in THRESHOLD_OBJECTIVES:
        raise DataError("unknown threshold objective", expected=" | ".join(THRESHOLD_OBJECTIVES), got=repr(objective))
    if objective == "fixed":
        return Threshold(fixed, objective, f"fixed at {fixed:g} (--yield-threshold), not chosen on data")
    fails = int((y == 0).sum())
    if fails == 0 or fails == len(y):
        return Threshold(fixed, "fixed", f"the {len(y):,} parts of the pooled forward predictions are all of one class, so no threshold can "
                                         f"be chosen on them; fixed at {fixed:g}")
    # The fail class is the positive one, scored by -p (negation is exact, so each cut is minus a probability seen):
    # predicted fail when -p >= cut, i.e. p <= -cut.
    precision, recall, cuts = precision_recall_curve(1 - y, -prob)
    precision, recall = precision[:-1], recall[:-1]        # the last point has no cut
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    best = int(np.argmax(f1))
    if objective == "fail_precision":
        reaching = np.flatnonzero(precision >= target_precision)
        if reaching.size:
            most = reaching[recall[reaching] == recall[reaching].max()]
            best = int(most[-1])       # of the cuts catching the most fails, the one flagging the fewest parts
            note = (f"catches {recall[best]:.0%} of the pooled forward predictions' fails at precision {precision[best]:.0%} "
                    f"(target {target_precision:.0%})")
            return Threshold(_pass_threshold(cuts[best], prob), objective, note)
        note = (f"no threshold reaches fail precision {target_precision:.0%} on the pooled forward predictions (best "
                f"{precision.max():.0%}); fell back to the best F1 of the fail class ({f1[best]:.3f})")
        return Threshold(_pass_threshold(cuts[best], prob), "fail_f1", note)
    note = f"best F1 of the fail class on the pooled forward predictions: {f1[best]:.3f}"
    return Threshold(_pass_threshold(cuts[best], prob), objective, note)


def _pass_threshold(fail_cut: float, prob: np.ndarray) -> float:
    """The fail-score cut as a pass-probability threshold. The cut marks fail when p <= -cut; the agent predicts
    fail when p < threshold, so the threshold goes halfway to the next higher probability seen: a float32 graph
    that moves a score by a rounding step must not flip the parts on the cut (a forest gives many parts the very
    same probability)."""
    at = -fail_cut
    higher = prob[prob > at]
    return float(min(1.0, (at + higher.min()) / 2 if higher.size else at + 1e-6))


# ---- the gate against chance -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gate:
    min_auc: float
    roc_auc: float | None
    passed: bool
    reason: str
    auc_low: float | None = None
    auc_high: float | None = None
    fails: int = 0


HOW_TO_HELP = ("more failing parts, a downstream outcome as the label (--outcomes), or other signals would help; "
               "--advisory publishes it marked as advisory")


def chance_gate(auc: float | None, low: float | None, high: float | None, min_auc: float, fails: int,
                parts: int) -> Gate:
    """Passed when the LOWER bound of the forward AUC interval reaches ``min_auc``: a point estimate on a handful
    of failing parts says nothing; an AUC that cannot be measured does not pass."""
    if auc is None:
        return Gate(min_auc, None, False, f"the forward ROC AUC cannot be measured: the {parts:,} out-of-time parts "
                                          f"are all of one class; {HOW_TO_HELP}", None, None, fails)
    interval = f"forward ROC AUC {auc:.3f} (95% interval {low:.3f}-{high:.3f}, {fails:,} failing of {parts:,} parts)"
    if low < min_auc:
        return Gate(min_auc, auc, False, f"the yield model cannot be told from chance: {interval}; the interval's "
                                         f"lower bound is below {min_auc:g} (--min-auc); {HOW_TO_HELP}",
                    low, high, fails)
    return Gate(min_auc, auc, True, f"{interval}: lower bound reaches {min_auc:g}", low, high, fails)
