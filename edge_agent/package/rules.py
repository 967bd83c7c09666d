"""The rules a package's reference statistics follow: the trainer applies them to write the static PAT limits and
the drift reference, the agent's dynamic PAT applies ``pat_limits`` to its rolling windows.

The agent's drift counting does not call ``bin_index``: it follows the same convention (a reading on an inner
edge goes to the bin on its right) with one comparison against every test's edges per part
(``edge_agent.drift``), and tests/test_drift.py checks its counts against numpy's histogram.

numpy only.
"""
from __future__ import annotations

import numpy as np

ROBUST_SIGMA_PER_IQR = 1.35   # IQR of a normal distribution is 1.349 sigma (AEC-Q001)
SKEW_FOR_LOG_SCALE = 0.1   # Bowley (quartile) skewness; a normal test's sampling noise stays well below


def log_scale_tests(q1: np.ndarray, median: np.ndarray, q3: np.ndarray, minimum: np.ndarray) -> np.ndarray:
    """Tests whose PAT limits are set on log(reading): positive, right-skewed readings such as leakage.

    median +/- k robust sigma assumes a symmetric distribution; on a log-normal one the upper limit cuts into
    the ordinary tail (measured on the synthetic floor: 27 leakage tests put 5.5 % of passing parts outside
    static PAT; on the log scale 0.05 %). A test qualifies when every reading is positive, its quartiles are
    skewed (Bowley skewness above ``SKEW_FOR_LOG_SCALE``) and taking logs makes them less so.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        skew = (q3 + q1 - 2 * median) / (q3 - q1)
        log_q1, log_median, log_q3 = np.log(q1), np.log(median), np.log(q3)
        log_skew = (log_q3 + log_q1 - 2 * log_median) / (log_q3 - log_q1)
    return (minimum > 0) & (skew > SKEW_FOR_LOG_SCALE) & (np.abs(log_skew) < np.abs(skew))


def pat_limits(q1: np.ndarray, median: np.ndarray, q3: np.ndarray, log_scale: np.ndarray,
               k_sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """median +/- k * IQR/1.35, on log(reading) where ``log_scale``: the static and dynamic PAT rule."""
    linear = (q3 - q1) / ROBUST_SIGMA_PER_IQR
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        spread = np.exp(k_sigma * np.log(q3 / q1) / ROBUST_SIGMA_PER_IQR)
        low = np.where(log_scale, median / spread, median - k_sigma * linear)
        high = np.where(log_scale, median * spread, median + k_sigma * linear)
    return low, high


def bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each value: the number of inner edges <= value (0 .. len(edges))."""
    return np.searchsorted(edges, values, side="right")
