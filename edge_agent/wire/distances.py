"""Distances between a window's bin counts and reference proportions, as a stats window carries them.

Defined once for both ends: the agent computes them per closed window, the collector again over counts it
sums across windows. Vectorized over tests: the last axis is the bins. numpy only.
"""
from __future__ import annotations

import numpy as np

# Empty bins: PSI takes a log of proportions, so each proportion is floored here (Evidently's choice).
PSI_EPSILON = 1e-4


def psi(counts: np.ndarray, reference: np.ndarray, epsilon: float = PSI_EPSILON) -> np.ndarray:
    """Population stability index sum((a - e) * ln(a / e)) of current counts against reference proportions;
    both proportions floored at ``epsilon``. NaN where there are no counts."""
    current, total = _proportions(counts)
    a, e = np.maximum(current, epsilon), np.maximum(reference, epsilon)
    return _undefined_where_empty(np.sum((a - e) * np.log(a / e), axis=-1), total)


def js_distance(counts: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Jensen-Shannon distance (square root of the divergence, log base 2: 0 = same, 1 = disjoint)."""
    current, total = _proportions(counts)
    middle = (current + reference) / 2
    divergence = (_kl_bits(current, middle) + _kl_bits(reference, middle)) / 2
    return _undefined_where_empty(np.sqrt(np.maximum(divergence, 0.0)), total)


def ks_statistic(counts: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Largest gap between the two cumulative distributions at the bin edges (a lower bound of the KS
    statistic of the raw readings: the binned data cannot show gaps inside a bin)."""
    current, total = _proportions(counts)
    gap = np.abs(np.cumsum(current, axis=-1) - np.cumsum(reference, axis=-1))
    return _undefined_where_empty(np.max(gap, axis=-1), total)


def _proportions(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, counts / np.where(total > 0, total, 1.0), 0.0), total[..., 0]


def _kl_bits(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0) / np.where(q > 0, q, 1.0)), 0.0)
    return terms.sum(axis=-1)


def _undefined_where_empty(values: np.ndarray, total: np.ndarray) -> np.ndarray:
    return np.where(total > 0, values, np.nan)
