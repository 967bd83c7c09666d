"""Reference statistics a package carries, computed from training data: static PAT limits and drift reference bins.

The rules they follow (the PAT limit formula, the log-scale choice, the binning convention) are the package
contract's (``edge_agent.package.rules``), so training and serving apply the same ones.
"""
from __future__ import annotations

import warnings

import numpy as np

from edge_agent.package.manifest import FeatureBins, PatLimit, ReferenceBins, ScoreBins, ScoreQuantiles
from edge_agent.package.rules import ROBUST_SIGMA_PER_IQR, bin_index, log_scale_tests, pat_limits

PAT_MIN_PARTS = 30


def static_pat_limits(values: np.ndarray, columns: list[str], k_sigma: float = 6.0) -> list[PatLimit]:
    """AEC-Q001 static PAT limits per test: median +/- k robust sigma from passing parts.

    ``scale`` "log" marks a skewed positive test whose limits are median(log x) +/- k robust sigma of log x
    (``log_scale_tests``); ``median`` and ``robust_sigma`` are always in the test's own units. A test with
    fewer than ``PAT_MIN_PARTS`` readings gets no limits (``low``/``high`` None): the standard asks for at
    least 30 parts, and a limit from fewer would be noise.
    """
    counts = np.sum(~np.isnan(values), axis=0)
    with warnings.catch_warnings():
        # An all-missing test is reported by validation; numpy's RuntimeWarning here is noise.
        warnings.simplefilter("ignore", RuntimeWarning)
        q1, median, q3 = np.nanpercentile(values, [25, 50, 75], axis=0)
        minimum = np.nanmin(values, axis=0) if len(values) else np.full(len(columns), np.nan)
    log_scale = log_scale_tests(q1, median, q3, minimum)
    low, high = pat_limits(q1, median, q3, log_scale, k_sigma)
    sigma = (q3 - q1) / ROBUST_SIGMA_PER_IQR
    enough = counts >= PAT_MIN_PARTS
    return [PatLimit(column=column, median=_num(median[i]), robust_sigma=_num(sigma[i]),
                     scale="log" if log_scale[i] else "linear", low=_num(low[i]) if enough[i] else None,
                     high=_num(high[i]) if enough[i] else None, n=int(counts[i]))
            for i, column in enumerate(columns)]


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
