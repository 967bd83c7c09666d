"""Reference statistics a package carries, computed from training data: static PAT limits and drift reference bins.

The rules they follow (the PAT rule of each test's shape, the resolution floor, the self-check, the binning
convention) are the package contract's (``edge_agent.package.rules``), so training and serving apply the same ones.
"""
from __future__ import annotations

import numpy as np

from edge_agent.package.manifest import FeatureBins, PatLimit, ReferenceBins, ScoreBins, ScoreQuantiles
from edge_agent.package.rules import (LOT_SPREAD_RATIO, SHAPES, TYPICAL_SIGMA, Groups, bin_index, lot_allowance,
                                      self_check, static_rule, widest_lot)

PAT_MIN_PARTS = 30
MAX_FLAG_RATE = 0.001     # the self-check's default: at most 0.1 % of passing training parts outside a test's limits


def static_pat_limits(values: np.ndarray, columns: list[str], k_sigma: float = 6.0, *,
                      max_flag_rate: float = MAX_FLAG_RATE, on_excess: str = "widen",
                      lots: np.ndarray | None = None, wafers: np.ndarray | None = None,
                      sites: np.ndarray | None = None,
                      limit_ranges: list[float | None] | None = None) -> list[PatLimit]:
    """AEC-Q001 static PAT limits per test from the passing training parts ``values``, by the rule of each test's
    shape (``edge_agent.package.rules``), then checked against those same parts (``rules.self_check``).

    ``scale`` "log" marks a log-normal test whose limits are median(log x) +/- k robust sigma of log x;
    ``median`` and ``robust_sigma`` are always in the test's own units. With ``lots`` (each row's lot), a test
    whose robust sigma differs between training lots by more than ``LOT_SPREAD_RATIO`` takes its widest lot's.
    Every sigma is at least the test's sigma floor (its resolution, read per site with ``sites``, and a share of
    ``limit_ranges``, each test's high - low), and the limits leave room for the next lot (``rules.lot_allowance``:
    the spread between ``lots``, or between ``wafers`` of one lot, or the stated one-lot allowance). A test with fewer than ``PAT_MIN_PARTS`` readings gets no limits (``low``/``high`` None): the standard asks
    for at least 30 parts, and a limit from fewer would be noise.
    """
    ranges = limit_ranges or [None] * len(columns)
    lots, wafers, sites = Groups.of(lots), Groups.of(wafers), Groups.of(sites)
    return [_test_limits(values[:, i], column, k_sigma, max_flag_rate, on_excess, lots, wafers, sites, ranges[i])
            for i, column in enumerate(columns)]


def _test_limits(values: np.ndarray, column: str, k_sigma: float, max_flag_rate: float, on_excess: str,
                 lots: Groups | None, wafers: Groups | None, sites: Groups | None,
                 limit_range: float | None) -> PatLimit:
    present = values[np.isfinite(values)]
    n = len(present)
    rule = static_rule(values, sites, limit_range) if n else None
    if rule is None:
        median = float(present[0]) if n else None
        return PatLimit(column=column, median=median, robust_sigma=0.0 if n else None, low=None, high=None, n=n,
                        shape="constant" if n else None,
                        reason="one value among the passing parts: no limits" if n else "no readings: no limits")
    notes = []
    if lots is not None:
        rule, ratio = widest_lot(rule, values, lots)
        if ratio is not None and ratio > LOT_SPREAD_RATIO:
            notes.append(f"robust sigma differs {ratio:.2f}x between training lots: the widest lot's sigma is used")
    typical_low, typical_high = rule.limits(TYPICAL_SIGMA)   # the training parts' own range, before the allowance
    rule = lot_allowance(rule, values, lots, wafers)
    entry = dict(column=column, median=rule.median, robust_sigma=rule.robust_sigma,
                 scale="log" if rule.log_scale else "linear", n=n, shape=SHAPES[rule.shape],
                 resolution=rule.resolution, typical_low=_num(typical_low), typical_high=_num(typical_high),
                 sigma_floor=rule.sigma_floor, lot_allowance=round(rule.allowance, 3),
                 allowance_rule=rule.allowance_rule)
    if n < PAT_MIN_PARTS:
        too_few = f"{n} readings, fewer than the {PAT_MIN_PARTS} PAT needs: no limits"
        return PatLimit(**entry, low=None, high=None, reason="; ".join(notes + [too_few]))
    check = self_check(rule, present, k_sigma, max_flag_rate, on_excess)
    low, high = (None, None) if check.k_sigma is None else (_num(v) for v in rule.limits(check.k_sigma))
    return PatLimit(**entry, low=low, high=high, k_sigma=check.k_sigma, self_check=check.action,
                    flag_rate=check.rate_after, flag_rate_before=check.rate_before,
                    reason="; ".join(notes + [check.reason]))


def quantile_edges(values: np.ndarray, bins: int) -> np.ndarray:
    """Inner bin edges at reference quantiles, duplicates removed (a near-constant test gets fewer bins)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.empty(0)
    return np.unique(np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1]))


def bin_proportions(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    counts = np.bincount(bin_index(finite, edges), minlength=len(edges) + 1).astype(np.float64)
    return counts / counts.sum() if counts.sum() else counts


def drift_reference(values: np.ndarray, columns: list[str], scores: np.ndarray, threshold: float,
                    bins: int = 10) -> ReferenceBins:
    """Per-test quantile bins with reference proportions, and the reference outlier-score distribution."""
    tests = []
    for i, column in enumerate(columns):
        edges = quantile_edges(values[:, i], bins)
        tests.append(FeatureBins(column=column, edges=edges.tolist(),
                                 proportions=bin_proportions(values[:, i], edges).tolist(),
                                 missing_rate=float(np.mean(np.isnan(values[:, i]))) if len(values) else 0.0))
    score_edges = quantile_edges(scores, 20)
    p01, p05, p50, p95, p99 = (float(q) for q in np.quantile(scores, [0.01, 0.05, 0.50, 0.95, 0.99]))
    return ReferenceBins(
        bins=bins, binning="bin = number of inner edges <= value; missing readings are counted apart",
        rows=int(len(values)), tests=tests,
        outlier_score=ScoreBins(edges=score_edges.tolist(), proportions=bin_proportions(scores, score_edges).tolist(),
                                quantiles=ScoreQuantiles(p01=p01, p05=p05, p50=p50, p95=p95, p99=p99),
                                outlier_rate=float(np.mean(scores < threshold))))


def _num(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None
