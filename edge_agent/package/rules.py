"""The rules a package's reference statistics follow: the trainer applies them to write the static PAT limits and
the drift reference, the agent's dynamic PAT applies ``pat_limits`` to its rolling windows with the shape and
resolution the trainer found for each test.

PAT limits (AEC-Q001: robust centre +/- k robust sigma, robust sigma = IQR/1.35) per test, by the shape of its
passing training readings (``classify``), in the manner of distribution-aware PAT tools:

=============  ==========================================================================================
shape          rule
=============  ==========================================================================================
normal         median +/- k * IQR/1.35
lognormal      on log(reading): median(log) +/- k * IQR(log)/1.35 (positive, right-skewed: leakage, IDDQ)
skewed         each side its own half-IQR sigma: median - k * (median - q1)/0.6745, median + k * (q3 - median)/0.6745
discrete       few distinct values (instrument steps, codes): the normal rule, whose sigma the resolution
               floor keeps from collapsing to one step or zero
bimodal        two populations: below the lower mode's median - k * its sigma, above the upper mode's
               median + k * its sigma (static only: a window of ~100 parts cannot place two modes)
constant       one value among passing parts: no limits
=============  ==========================================================================================

Every sigma, static or in a dynamic window, is at least the test's ``sigma_floor``: ``RESOLUTION_FLOOR`` times its
measurement resolution (``resolution``: the smallest step between its distinct readings, site by site) and
``LIMIT_SHARE_FLOOR`` of its test limits' range. Without the floor a test read in 0.78 uA steps with IQR/1.35 of
one step gets limits a few steps from the median and flags a large share of good parts (22 % in a real production
file). Static limits then leave room for the next lot (``lot_allowance``).

``self_check`` then measures, on the passing training parts, the share each test's limits would flag; a test
above ``max_rate`` is widened (its k raised until at most that share is outside) or disabled.

The agent's drift counting does not call ``bin_index``: it follows the same convention (a reading on an inner
edge goes to the bin on its right) with one comparison against every test's edges per part
(``edge_agent.daemon.drift``), and tests/test_drift.py checks its counts against numpy's histogram.

numpy only (and the manifest's names of shapes).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .manifest import PAT_SHAPES as SHAPES

ROBUST_SIGMA_PER_IQR = 1.35   # IQR of a normal distribution is 1.349 sigma (AEC-Q001)
SIGMA_PER_HALF_IQR = 0.6745   # median to quartile of a normal distribution, in sigma (skewed: one side each)
# A positive test goes to the log scale when its readings are right-skewed beyond this Bowley (quartile) skewness
# and log(reading) makes its quartiles more symmetric: 0.10 for IDDQ-like readings (log sigma 0.3), under 0.01 for
# a normal test, whose sampling noise is 0.02 at 5,000 parts. (Requiring a skewness above 0.1 instead decided such
# IDDQ tests by that noise, and the linear rule on one flagged 0.65 % of the next lot's good parts. Requiring the
# log to remove 0.05 of skewness failed leakage tests read with an additive offset, whose log over-corrects:
# skewness 0.08-0.12 became -0.04; their linear rule flagged 0.5 % of the next lot's good parts.)
LOG_SKEW_GAIN = 0.05
# A skewed test gets a sigma per side above this Bowley skewness. The sampling noise of Bowley skewness is about
# 1.2/sqrt(n) for normal data: 0.07 at the 300 parts of a small wafer lot, so 0.2 is beyond noise there.
SKEW_FOR_ASYMMETRY = 0.2
SKEW_MIN_STEPS = 4            # quartiles fewer resolution steps apart than this say nothing about skewness
# At most this many distinct readings among the passing parts: a discrete test (trim codes, a current read
# in coarse instrument steps). The real a595 file has such tests with 1 to 8 distinct values.
DISCRETE_MAX_LEVELS = 10
# Bimodal: the two halves of the best two-group split (1-D k-means) each hold at least this share of the parts,
# and their medians lie further apart than this many times the sum of their robust sigmas. One normal
# population split in two gives 1.1, a uniform one 1.35; two normals 4 sigma apart give 2.
BIMODAL_MIN_SHARE = 0.05
BIMODAL_SEPARATION = 2.0
RESOLUTION_FLOOR = 1.0        # a robust sigma is never below one measurement step
# ... nor below this share of the test's limit range (high - low). A test far narrower than its limits (a range
# of 100 sigma) gets PAT limits a sliver of its range wide, which a next lot's ordinary move of a fraction of a
# percent of the range breaks; at 1 %, k = 6 keeps PAT limits at least 6 % of the range either side.
LIMIT_SHARE_FLOOR = 0.01
QUANTIZED_SHARE = 0.5         # levels read at least twice hold this share of the readings: a quantized test
# Static limits hold for the next lot only with room for it to sit off the training lots. Several training lots
# (at least MIN_SPREAD_LOTS) measure that room: BETWEEN_LOT_K x the standard deviation of their medians. Fewer lots
# cannot show it: the allowance is ONE_LOT_ALLOWANCE robust sigmas, or the spread between the lot's wafers when that
# is wider. The allowance costs catch: on the synthetic next lot (quantized tests, each lot 0.5 sigma off per test)
# static PAT caught 82-88 % of the latent outliers without it, 45-77 % at 0.5 sigma, 13-47 % at 1 sigma, while the
# good parts it flagged moved little (0.4-1.0 % -> 0.04-0.75 %); dynamic PAT, judged within the lot, keeps the rest.
MIN_SPREAD_LOTS = 3
BETWEEN_LOT_K = 3.0
ONE_LOT_ALLOWANCE = 0.5
# Training lots whose robust sigmas of one test differ by more than this factor: the test's spread changes from
# lot to lot (3-5x in real production lots), and limits from the pooled sigma would not hold for the next lot.
LOT_SPREAD_RATIO = 2.0
MIN_LOT_PARTS = 30            # a lot's sigma counts with at least this many readings (AEC-Q001's minimum)
TYPICAL_SIGMA = 3.0           # the typical range an explanation quotes: the rule's limits at k = 3
MAX_WIDENING = 3.0            # a self-check may raise a test's k to 3x the package's k; beyond, it disables
WIDEN_MARGIN = 1e-3           # widened limits sit this fraction beyond the last reading kept inside (rounding)

NORMAL, LOGNORMAL, SKEWED, DISCRETE, BIMODAL, CONSTANT = range(len(SHAPES))


@dataclass(frozen=True)
class Groups:
    """Rows grouped once (by site, lot or wafer) for the loops over tests: ``of`` sorts the keys once, and each
    test's readings of a group are then one slice of its column in that order (a mask per group and test cost
    240 ms a test at 100,000 rows)."""

    order: np.ndarray      # row indices, group by group
    bounds: np.ndarray     # group g's rows are order[bounds[g]:bounds[g + 1]]

    @classmethod
    def of(cls, keys: np.ndarray | None) -> "Groups | None":
        if keys is None:
            return None
        _, codes = np.unique(np.asarray(keys).astype(str), return_inverse=True)
        return cls(np.argsort(codes, kind="stable"), np.concatenate([[0], np.cumsum(np.bincount(codes))]))

    def finite(self, values: np.ndarray, at_least: int = MIN_LOT_PARTS) -> list[np.ndarray]:
        """Each group's finite ``values`` (a column in row order), the groups with at least ``at_least`` of them."""
        ordered = values[self.order]
        parts = (ordered[a:b] for a, b in zip(self.bounds[:-1], self.bounds[1:]))
        return [own for own in (part[np.isfinite(part)] for part in parts) if len(own) >= at_least]


def resolution(values: np.ndarray, groups: Groups | None = None) -> float | None:
    """The instrument's step of one test: the smallest step between its distinct readings (None with fewer than
    two distinct values).

    Steps below a millionth of the readings' magnitude are float rounding of one instrument value, not steps. On
    continuous readings the smallest step is far below sigma and the floor never binds; on quantized readings it
    is the instrument's step. Where levels read at least twice hold most readings (a quantized test), only their
    steps count, so a stray reading off the grid (another range, a retest) does not make the step look finer.

    ``groups`` (the rows' head/site, ``values`` a column in row order): the median of the sites' own steps, over
    sites with at least ``MIN_LOT_PARTS`` readings. Each site reads through its own instrument channel, calibrated onto a grid shifted
    by a fraction of a step, so the union of the sites' readings has steps far finer than any site reads: with
    the pooled step the floor would not bind, and a site's window, whose readings span a few of its steps, would
    put a reading one step out at several robust sigma.
    """
    if groups is not None:
        steps = [step for own in groups.finite(values) if (step := _smallest_step(own)) is not None]
        if steps:
            return float(np.median(steps))
    return _smallest_step(values[np.isfinite(values)])


def _smallest_step(values: np.ndarray) -> float | None:
    levels, counts = np.unique(values, return_counts=True)
    repeated = counts >= 2
    if repeated.sum() >= 2 and counts[repeated].sum() >= QUANTIZED_SHARE * len(values):
        levels = levels[repeated]
    if len(levels) < 2:
        return None
    steps = np.diff(levels)
    steps = steps[steps > 1e-6 * max(abs(levels[0]), abs(levels[-1]))]
    return float(steps.min()) if steps.size else None


def distinct_levels(values: np.ndarray, groups: Groups | None = None) -> int:
    """Distinct readings of one test (a column in row order); with ``groups``, the median over sites of at least
    ``MIN_LOT_PARTS`` readings of each site's own count (sites read on grids shifted against each other)."""
    if groups is not None:
        counts = [len(np.unique(own)) for own in groups.finite(values)]
        if counts:
            return int(np.median(counts))
    return len(np.unique(values[np.isfinite(values)]))


def sigma_floor(step: float | None, limit_range: float | None) -> float:
    """The smallest robust sigma a test's rule may take, static or in a dynamic window: ``RESOLUTION_FLOOR`` steps
    of its resolution, and ``LIMIT_SHARE_FLOOR`` of its test limits' range (high - low) when it has both."""
    by_limits = LIMIT_SHARE_FLOOR * limit_range if limit_range and math.isfinite(limit_range) else 0.0
    return max(RESOLUTION_FLOOR * (step or 0.0), by_limits)


def classify(values: np.ndarray, step: float | None = None, groups: Groups | None = None) -> int:
    """The shape code (``SHAPES``) of one test's passing readings (finite values, any order); ``step``: their
    resolution (``resolution(values)`` when not given); ``groups``: the rows' sites, ``values`` then a column in
    row order (``distinct_levels``).

    Skewness is read from the quartiles, so it needs quartiles that the instrument resolves: with fewer than
    ``SKEW_MIN_STEPS`` steps between q1 and q3 the quartiles sit on whole steps and their asymmetry is the
    quantization's, not the population's; such a test gets the symmetric rule.
    """
    levels = distinct_levels(values, groups)
    values = np.sort(values[np.isfinite(values)])
    if len(np.unique(values)) < 2:
        return CONSTANT
    if levels <= DISCRETE_MAX_LEVELS:
        return DISCRETE
    if _bimodal_split(values) is not None:
        return BIMODAL
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    step = resolution(values) if step is None else step
    if q3 - q1 < SKEW_MIN_STEPS * (step or 0.0):
        return NORMAL
    if log_scale_tests(q1, median, q3, values[0]):
        return LOGNORMAL
    if q3 > q1 and abs(q3 + q1 - 2 * median) / (q3 - q1) > SKEW_FOR_ASYMMETRY:
        return SKEWED
    return NORMAL


def log_scale_tests(q1: np.ndarray, median: np.ndarray, q3: np.ndarray, minimum: np.ndarray) -> np.ndarray:
    """Tests whose PAT limits are set on log(reading): positive, right-skewed readings such as leakage.

    median +/- k robust sigma assumes a symmetric distribution; on a log-normal one the upper limit cuts into
    the ordinary tail (measured on the synthetic floor: 27 leakage tests put 5.5 % of passing parts outside
    static PAT; on the log scale 0.05 %). A test qualifies when every reading is positive, its Bowley skewness is
    above ``LOG_SKEW_GAIN`` and taking logs makes its quartiles more symmetric.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        skew = (q3 + q1 - 2 * median) / (q3 - q1)
        log_q1, log_median, log_q3 = np.log(q1), np.log(median), np.log(q3)
        log_skew = (log_q3 + log_q1 - 2 * log_median) / (log_q3 - log_q1)
    return (minimum > 0) & (skew > LOG_SKEW_GAIN) & (np.abs(log_skew) < skew)


def rule_sigmas(q1: np.ndarray, median: np.ndarray, q3: np.ndarray, min_sigma: np.ndarray,
                skewed: np.ndarray | None = None, lognormal: np.ndarray | None = None
                ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(log scale mask or None, sigma below, sigma above the median) of the unimodal rules from quartiles, in the
    test's units or, where the mask is set, in log(reading) units. ``min_sigma``: the resolution floor in the test's
    units (0: none). ``skewed``, ``lognormal``: masks of the tests of those shapes, None when there are none (the
    branch is skipped: dynamic PAT calls this on every refresh). A lognormal test whose quartiles are not all
    positive (a window holding readings <= 0) takes the linear rule."""
    below = above = np.maximum((q3 - q1) / ROBUST_SIGMA_PER_IQR, min_sigma)
    if skewed is not None:
        below = np.where(skewed, np.maximum((median - q1) / SIGMA_PER_HALF_IQR, min_sigma), below)
        above = np.where(skewed, np.maximum((q3 - median) / SIGMA_PER_HALF_IQR, min_sigma), above)
    if lognormal is None:
        return None, below, above
    log = lognormal & (q1 > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_sigma = np.maximum(np.log(q3 / q1) / ROBUST_SIGMA_PER_IQR, min_sigma / median)
    return log, np.where(log, log_sigma, below), np.where(log, log_sigma, above)


def pat_limits(q1: np.ndarray, median: np.ndarray, q3: np.ndarray, min_sigma: np.ndarray, k_sigma: np.ndarray,
               skewed: np.ndarray | None = None, lognormal: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """The dynamic rule's limits from a window's quartiles (``rule_sigmas``): median -/+ k sigma, or median /x
    exp(k sigma) on the log scale. NaN where ``k_sigma`` is NaN: a test without a dynamic rule (bimodal,
    constant) or one the self-check disabled."""
    log, below, above = rule_sigmas(q1, median, q3, min_sigma, skewed, lognormal)
    low, high = median - k_sigma * below, median + k_sigma * above
    if log is None:
        return low, high
    with np.errstate(over="ignore", invalid="ignore"):
        spread = np.exp(k_sigma * below)
        return np.where(log, median / spread, low), np.where(log, median * spread, high)


@dataclass(frozen=True)
class StaticRule:
    """One test's static PAT rule from its passing training readings: limits are ``centre_low - k * sigma_low``
    and ``centre_high + k * sigma_high`` on the rule's scale (log(reading) when ``log_scale``); the centres differ
    for a bimodal test (its two modes' medians) and by the between-lot allowance (``lot_allowance``)."""

    shape: int
    resolution: float | None
    median: float
    robust_sigma: float        # IQR/1.35 with the sigma floor, in the test's units
    centre_low: float
    sigma_low: float
    centre_high: float
    sigma_high: float
    log_scale: bool
    sigma_floor: float = 0.0   # the floor every sigma of this test takes, static or dynamic (``sigma_floor``)
    allowance: float = 0.0     # room for the next lot either side of the centres, in robust sigmas
    allowance_rule: str = ""   # where the allowance comes from, in words

    def limits(self, k_sigma: float) -> tuple[float, float]:
        low, high = self.centre_low - k_sigma * self.sigma_low, self.centre_high + k_sigma * self.sigma_high
        return (math.exp(low), math.exp(high)) if self.log_scale else (low, high)

    def z(self, values: np.ndarray) -> np.ndarray:
        """How many of the rule's sigmas each reading lies beyond its centre (0 between a bimodal test's modes);
        a reading <= 0 of a log-scale test is -inf."""
        with np.errstate(divide="ignore", invalid="ignore"):
            scaled = np.where(values > 0, np.log(np.where(values > 0, values, 1.0)), -np.inf) if self.log_scale \
                else values
            return np.where(scaled < self.centre_low, (scaled - self.centre_low) / self.sigma_low,
                            np.where(scaled > self.centre_high, (scaled - self.centre_high) / self.sigma_high, 0.0))


def static_rule(values: np.ndarray, sites: Groups | None = None,
                limit_range: float | None = None) -> StaticRule | None:
    """The static rule of one test from its passing training readings (NaN ignored); None for a constant test.

    ``sites``: the rows' head/site (``resolution``; ``values`` then a column in row order); ``limit_range``: the
    test limits' high - low (``sigma_floor``)."""
    step = resolution(values, sites)
    shape = classify(values, step, sites)
    values = np.sort(values[np.isfinite(values)])
    if shape == CONSTANT:
        return None
    min_sigma = sigma_floor(step, limit_range)
    q1, median, q3 = (float(v) for v in np.percentile(values, [25, 50, 75]))
    robust_sigma = max((q3 - q1) / ROBUST_SIGMA_PER_IQR, min_sigma)
    if shape == BIMODAL:
        lower, upper = np.split(values, [_bimodal_split(values)])
        (low_centre, low_sigma), (high_centre, high_sigma) = (_mode(mode, min_sigma) for mode in (lower, upper))
        return StaticRule(shape, step, median, robust_sigma, low_centre, low_sigma, high_centre, high_sigma, False,
                          min_sigma)
    log, below, above = rule_sigmas(np.float64(q1), np.float64(median), np.float64(q3), np.float64(min_sigma),
                                    np.bool_(True) if shape == SKEWED else None,
                                    np.bool_(True) if shape == LOGNORMAL else None)
    log = bool(log)
    centre = math.log(median) if log else median
    return StaticRule(shape, step, median, robust_sigma, centre, float(below), centre, float(above), log, min_sigma)


def lot_allowance(rule: StaticRule, values: np.ndarray, lots: Groups | None, wafers: Groups | None) -> StaticRule:
    """``rule`` with room for the next lot: its centres moved apart by the allowance (``BETWEEN_LOT_K`` x the sd of
    the training lots' medians with ``MIN_SPREAD_LOTS`` lots or more; with fewer, ``ONE_LOT_ALLOWANCE`` robust
    sigmas or the spread between wafers when wider), on the rule's scale. A next lot off by that much keeps the
    full k robust sigmas between its own parts and the limits."""
    scaled = _rule_scale(rule, values)
    sigma = (rule.sigma_low + rule.sigma_high) / 2
    lot_sd, n_lots = _between_sd(scaled, lots)
    measured = (BETWEEN_LOT_K * lot_sd, f"{BETWEEN_LOT_K:g} x the sd of {n_lots} training lots' medians")
    if n_lots >= MIN_SPREAD_LOTS:
        allowance, why = measured
    else:
        wafer_sd, n_wafers = _between_sd(scaled, wafers)
        choices = [(ONE_LOT_ALLOWANCE * sigma, f"{max(n_lots, 1)} training lot{'s' if n_lots > 1 else ''}: stated "
                                               f"allowance {ONE_LOT_ALLOWANCE:g} robust sigma")]
        if n_lots >= 2:
            choices.append(measured)
        if n_wafers >= MIN_SPREAD_LOTS:
            choices.append((BETWEEN_LOT_K * wafer_sd, f"{BETWEEN_LOT_K:g} x the sd of {n_wafers} wafers' medians"))
        allowance, why = max(choices, key=lambda choice: choice[0])
    return dataclasses.replace(rule, centre_low=rule.centre_low - allowance, centre_high=rule.centre_high + allowance,
                               allowance=float(allowance / sigma) if sigma > 0 else 0.0, allowance_rule=why)


def _between_sd(scaled: np.ndarray, groups: Groups | None) -> tuple[float, int]:
    """(sd of the medians of the groups with ``MIN_LOT_PARTS`` readings or more, how many such groups)."""
    medians = [float(np.median(own)) for own in groups.finite(scaled)] if groups is not None else []
    return (float(np.std(medians, ddof=1)) if len(medians) >= 2 else 0.0), len(medians)


def _rule_scale(rule: StaticRule, values: np.ndarray) -> np.ndarray:
    """``values`` on the rule's scale: log(reading) for a log-scale rule (NaN where a reading is <= 0)."""
    if not rule.log_scale:
        return values
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.where(values > 0, values, np.nan))


def widest_lot(rule: StaticRule, values: np.ndarray, lots: Groups | None) -> tuple[StaticRule, float | None]:
    """``rule`` with its sigmas scaled up to the widest training lot's when lots differ in spread by more than
    ``LOT_SPREAD_RATIO``; and that ratio (None with fewer than two lots of ``MIN_LOT_PARTS`` readings).

    Lot by lot the robust sigma is IQR/1.35 on the rule's scale. A bimodal rule is left as it is (its modes'
    sigmas mix the lots already).
    """
    sigmas = []
    for own in lots.finite(_rule_scale(rule, values)) if lots is not None else ():
        q1, q3 = np.percentile(own, [25, 75])
        sigmas.append((q3 - q1) / ROBUST_SIGMA_PER_IQR)
    if len(sigmas) < 2 or min(sigmas) <= 0:
        return rule, None
    ratio = max(sigmas) / min(sigmas)
    pooled = (rule.sigma_low + rule.sigma_high) / 2
    if ratio <= LOT_SPREAD_RATIO or rule.shape == BIMODAL or max(sigmas) <= pooled:
        return rule, ratio
    factor = max(sigmas) / pooled
    return dataclasses.replace(rule, sigma_low=rule.sigma_low * factor, sigma_high=rule.sigma_high * factor), ratio


@dataclass(frozen=True)
class SelfCheck:
    """What the training data says about one test's limits: the share of passing parts they flag, before and
    after the check's action (``kept``, ``widened`` or ``disabled``), the k they end with and why."""

    action: str
    k_sigma: float | None      # None: disabled
    rate_before: float
    rate_after: float
    reason: str


def self_check(rule: StaticRule, values: np.ndarray, k_sigma: float, max_rate: float,
               on_excess: str = "widen") -> SelfCheck:
    """Flag rate of ``rule``'s limits on the passing training readings ``values``; above ``max_rate`` the test is
    widened to that rate (k raised until at most ``max_rate`` of them are outside, by at most ``MAX_WIDENING``
    times) or disabled (``on_excess`` "disable", or widening beyond that bound)."""
    distance = np.sort(np.abs(rule.z(values[np.isfinite(values)])))
    n = len(distance)
    rate = float(np.mean(distance > k_sigma)) if n else 0.0
    if rate <= max_rate:
        return SelfCheck("kept", k_sigma, rate, rate, f"flags {rate:.3%} of passing training parts")
    allowed = int(math.floor(max_rate * n))
    needed = float(distance[n - allowed - 1]) * (1 + WIDEN_MARGIN)
    why = f"flagged {rate:.2%} of passing training parts (more than {max_rate:.2%})"
    if on_excess == "widen" and needed <= MAX_WIDENING * k_sigma:
        after = float(np.mean(distance > needed))
        return SelfCheck("widened", needed, rate, after, f"{why}; k widened from {k_sigma:g} to {needed:.3g}")
    because = ("self-check set to disable" if on_excess != "widen" else
               f"widening to that rate needs k {needed:.3g}, beyond {MAX_WIDENING:g} x {k_sigma:g}")
    return SelfCheck("disabled", None, rate, 0.0, f"{why}; disabled: {because}")


def _bimodal_split(values: np.ndarray) -> int | None:
    """Where sorted ``values`` split into two modes (the first index of the upper mode), or None if unimodal.

    The split minimises the within-group sum of squares (1-D two-means, exact over every cut), then the groups
    must be populous and separated (``BIMODAL_MIN_SHARE``, ``BIMODAL_SEPARATION``).
    """
    n = len(values)
    smallest = max(2, int(math.ceil(BIMODAL_MIN_SHARE * n)))
    if n < 2 * smallest:
        return None
    centred = values - values[n // 2]
    sums, squares = np.cumsum(centred), np.cumsum(centred * centred)
    cuts = np.arange(smallest, n - smallest + 1)
    left = squares[cuts - 1] - sums[cuts - 1] ** 2 / cuts
    right = (squares[-1] - squares[cuts - 1]) - (sums[-1] - sums[cuts - 1]) ** 2 / (n - cuts)
    cut = int(cuts[np.argmin(left + right)])
    (low_centre, low_sigma), (high_centre, high_sigma) = _mode(values[:cut], 0.0), _mode(values[cut:], 0.0)
    return cut if high_centre - low_centre > BIMODAL_SEPARATION * (low_sigma + high_sigma) else None


def _mode(values: np.ndarray, min_sigma: float) -> tuple[float, float]:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return float(median), max(float(q3 - q1) / ROBUST_SIGMA_PER_IQR, min_sigma)


def bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each value: the number of inner edges <= value (0 .. len(edges))."""
    return np.searchsorted(edges, values, side="right")
