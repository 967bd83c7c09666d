"""Which tests drove a flagged part: the readings furthest from the training population, in robust sigmas.

An Isolation Forest gives one score and no reasons, and its score saturates: a part 14,000 robust sigmas out on
one test scores about like a part 3 sigmas out on several (a tree isolates either in a few splits). The robust z
of each reading does not saturate, so the tests it ranks first, with their distance, say what the score cannot:

    z = (reading - median) / sigma of its side, sigma = (median - typical_low) / 3 below, (typical_high - median) / 3
    above; typical_low .. typical_high is the manifest's typical range (the test's PAT rule at k = 3, so a
    log-normal or skewed test is measured on its own shape)

It is computed only for a part whose ML outlier or PAT flag fired (bench key ``explain.us_per_explained_part``: a
few microseconds for 200 tests); for a PAT break it says how far out the reading is, which the limits alone do not.
Packages written before typical ranges existed use median +/- 3 robust sigma.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..package.manifest import PatLimit
from ..package.rules import TYPICAL_SIGMA

DRIVERS = 3   # tests named per explained part


class Driver(NamedTuple):
    """One test behind a flag: its reading, how many robust sigmas from the median, and the typical range."""

    test: str
    value: float
    z: float
    typical_low: float
    typical_high: float

    def to_wire(self) -> dict:
        return {"test": self.test, "value": self.value, "z": self.z, "typical_low": self.typical_low,
                "typical_high": self.typical_high}   # a third of NamedTuple._asdict's cost

    def describe(self) -> str:
        return (f"{self.test}={self.value:.5g} ({self.z:+.3g} robust sigma; typical {self.typical_low:.5g} to "
                f"{self.typical_high:.5g})")


class Explainer:
    """The manifest's per-test medians and typical ranges as arrays in feature order; ``drivers`` ranks a row."""

    def __init__(self, columns: list[str], limits: list[PatLimit], count: int = DRIVERS):
        self.columns = columns
        self.count = min(count, len(columns))
        n = len(columns)
        median = np.full(n, np.nan)
        typical_low, typical_high = np.full(n, np.nan), np.full(n, np.nan)
        index = {column: i for i, column in enumerate(columns)}
        for limit in limits:
            i = index.get(limit.column)
            if i is None or limit.median is None:
                continue
            spread = TYPICAL_SIGMA * (limit.robust_sigma or np.nan)
            median[i] = limit.median
            typical_low[i] = limit.median - spread if limit.typical_low is None else limit.typical_low
            typical_high[i] = limit.median + spread if limit.typical_high is None else limit.typical_high
        with np.errstate(divide="ignore", invalid="ignore"):
            below = np.where(median > typical_low, TYPICAL_SIGMA / (median - typical_low), np.nan)
            above = np.where(typical_high > median, TYPICAL_SIGMA / (typical_high - median), np.nan)
        self.median = median.astype(np.float32)
        # 1/sigma per side (NaN where unknown or zero): -|z| = min(d * -above, d * below) for d = reading - median
        self._below, self._minus_above = below.astype(np.float32), (-above).astype(np.float32)
        self._sides = (below.tolist(), above.tolist())
        self._typical = list(zip(typical_low.tolist(), typical_high.tolist()))

    def drivers(self, row: np.ndarray) -> list[Driver]:
        """The ``count`` tests of ``row`` furthest from their median in robust sigmas, furthest first; tests not
        run or without statistics are skipped."""
        deviation = row - self.median
        # -|z| per test; NaN (not run, no statistics) becomes 0, which ranks last. Three argmin passes cost a
        # third of one argpartition on 200 tests.
        distance = np.fmin(np.minimum(deviation * self._minus_above, deviation * self._below), 0.0)
        below, above = self._sides
        drivers = []
        for _ in range(self.count):
            i = int(distance.argmin())
            if distance[i] >= 0:
                break
            distance[i] = 0.0
            d = deviation.item(i)
            drivers.append(Driver(self.columns[i], row.item(i), d * (below[i] if d < 0 else above[i]),
                                  *self._typical[i]))
        return drivers
