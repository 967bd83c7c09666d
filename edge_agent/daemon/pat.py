"""Part Average Testing beside the models: static limits from the manifest, dynamic limits per site.

Static PAT (AEC-Q001): the manifest's per-test limits, the rule of each test's shape over the passing training
parts, checked against them by the trainer (``edge_agent.package.rules``). Dynamic PAT: the same rule over a
rolling window of the latest parts of each (head, site), with the shape, resolution floor and k (widened or
disabled by the self-check) the trainer found for each test, so a shift of one site, lot, sublot or wafer is
judged against its own recent parts. A bimodal test has no dynamic limits (a window of ~100 parts cannot place
two modes); its static limits still apply.

Restart and warm-up: a site's window starts afresh when a part of another group arrives (``reset_on``: "lot",
"sublot" = lot or sublot changed, "wafer" = lot, sublot or wafer changed, or "never"); for its first
``min_parts`` parts (the warm-up baseline, 30 by default) the site has no dynamic limits, then every test's
limits come from the window at once and are refreshed as below.

Cost per part is bounded and small: limits are not recomputed for every test on every part. Tests are cut
into slices of at least ``MIN_SLICE_TESTS`` tests, and every ``stride`` parts one slice is refreshed from the
window (one sort of window x slice values), round robin, with ``stride`` chosen so that every test's limits
are at most ``refresh_parts`` parts old. A refresh costs the same whatever the number of tests. The part that
completes a site's warm-up baseline makes every test's limits due at once, so dynamic PAT starts with all its
limits.

No part waits for a refresh: the part that makes one due only marks it, and the agent does it between parts
(``refresh_due``, when no request waits), or at the latest just before the site's next part is checked. The
window cannot change in between (only a part of that site adds to it, after its check), so every part is judged
against the same limits as if each refresh had been done at once.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..package.manifest import PatLimit
from ..package.rules import BIMODAL, CONSTANT, LOGNORMAL, NORMAL, SHAPES, SKEWED, pat_limits
from ..wire.score import Part

MIN_SLICE_TESTS = 64          # below this, numpy's per-call overhead dominates a refresh


@dataclass(frozen=True)
class PatBreak:
    """One test outside its PAT limits: ``kind`` is "static" or "dynamic"."""

    test: str
    kind: str
    value: float
    low: float | None
    high: float | None

    def to_wire(self) -> dict:
        return {"test": self.test, "kind": self.kind, "value": self.value, "low": self.low, "high": self.high}


class StaticPat:
    """The manifest's static PAT limits, as arrays aligned with the model's features (NaN = no limit), and each
    test's rule for dynamic PAT: its shape code, sigma floor in units and k relative to the package's
    (NaN: disabled by the self-check)."""

    def __init__(self, columns: list[str], limits: list[PatLimit], *, k_sigma: float = 6.0,
                 resolution_floor: float | None = None):
        self.columns = columns
        n = len(columns)
        self.low = np.full(n, np.nan, dtype=np.float32)
        self.high = np.full(n, np.nan, dtype=np.float32)
        self.shape = np.full(n, NORMAL, dtype=np.int8)
        self.min_sigma = np.zeros(n, dtype=np.float32)
        self.k_factor = np.ones(n, dtype=np.float32)
        index = {column: i for i, column in enumerate(columns)}
        for limit in limits:
            i = index.get(limit.column)
            if i is None:
                continue
            self.shape[i] = (SHAPES.index(limit.shape) if limit.shape
                             else LOGNORMAL if limit.scale == "log" else NORMAL)   # written before shapes
            self.min_sigma[i] = (limit.sigma_floor if limit.sigma_floor is not None   # written before the floors
                                 else (resolution_floor or 0.0) * (limit.resolution or 0.0))
            if limit.self_check == "disabled":
                self.k_factor[i] = np.nan
            elif limit.k_sigma is not None:
                self.k_factor[i] = limit.k_sigma / k_sigma
            # A zero robust sigma (a constant test, or a discrete one in a package written before the resolution
            # floor) makes median +/- k*sigma a single value that every other reading would break: no limit.
            if not limit.robust_sigma:
                continue
            self.low[i] = np.nan if limit.low is None else limit.low
            self.high[i] = np.nan if limit.high is None else limit.high
        self.n_limited = int(np.sum(~np.isnan(self.low) | ~np.isnan(self.high)))

    def breaks(self, row: np.ndarray) -> list[PatBreak]:
        return self.breaks_of(row, self.outside(row))

    def outside(self, rows: np.ndarray) -> np.ndarray:
        """Which readings of ``rows`` (one row or a matrix of them) lie outside their limits; NaN compares False:
        not run, or no limit."""
        return (rows < self.low) | (rows > self.high)

    def breaks_of(self, row: np.ndarray, outside: np.ndarray) -> list[PatBreak]:
        """The breaks of ``row``, given its ``outside`` mask."""
        return [_break(self.columns, "static", row, self.low, self.high, i) for i in np.flatnonzero(outside)]


class DynamicPat:
    """Rolling-window PAT per (head, site), restarted when the lot (sublot, wafer: ``reset_on``) of a site changes.

    ``shape``, ``min_sigma`` and ``k_factor`` per test as ``StaticPat`` holds them (default: every test normal,
    no floor, the configured k)."""

    def __init__(self, columns: list[str], *, window: int = 100, min_parts: int = 30, k_sigma: float = 6.0,
                 refresh_parts: int = 25, reset_on: str = "wafer", max_sites: int = 512,
                 shape: np.ndarray | None = None, min_sigma: np.ndarray | None = None,
                 k_factor: np.ndarray | None = None):
        if not 2 <= min_parts <= window:
            raise ValueError(f"dynamic PAT needs 2 <= min_parts <= window, got min_parts {min_parts}, "
                             f"window {window}")
        self.columns = columns
        n_tests = len(columns)
        self.window, self.min_parts, self.k_sigma = window, min_parts, k_sigma
        self._due: OrderedDict[tuple[int, int], slice] = OrderedDict()   # site -> tests due a refresh, oldest first
        self.set_rules(np.full(n_tests, NORMAL, np.int8) if shape is None else shape,
                       np.zeros(n_tests, np.float32) if min_sigma is None else min_sigma,
                       np.ones(n_tests, np.float32) if k_factor is None else k_factor)
        self.slice = min(n_tests, max(MIN_SLICE_TESTS, -(-n_tests // refresh_parts)))
        self.stride = max(1, refresh_parts // -(-n_tests // self.slice))
        if reset_on not in GROUPS:
            raise ValueError(f"dynamic PAT reset_on must be one of {', '.join(GROUPS)}, got {reset_on!r}")
        self.reset_on = reset_on
        self.max_sites = max_sites
        self.evicted = 0        # sites dropped to make room (least recently tested first)
        self._sites: OrderedDict[tuple[int, int], _SiteWindow] = OrderedDict()

    def set_rules(self, shape: np.ndarray, min_sigma: np.ndarray, k_factor: np.ndarray) -> None:
        """Each test's rule (a new package of the same tests brings its own); windows keep their parts and apply
        it from their next refresh. A test without a window rule (bimodal, constant) or disabled by the
        self-check gets k NaN: no dynamic limits. The refreshes already due are done under the rules they were due
        under."""
        while self.refresh_due():
            pass
        shape = np.asarray(shape, np.int8)
        self.shape = shape
        self.min_sigma = np.asarray(min_sigma, np.float32)
        self.k = np.where((shape == BIMODAL) | (shape == CONSTANT), np.nan,
                          self.k_sigma * np.asarray(k_factor, np.float32)).astype(np.float32)
        self._masks: dict[tuple[int, int], tuple[np.ndarray | None, np.ndarray | None]] = {}

    def _shape_masks(self, tests: slice) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(skewed, lognormal) masks of a slice of tests, None where the slice has none (cached per slice)."""
        key = (tests.start, tests.stop)
        if key not in self._masks:
            self._masks[key] = tuple(mask if mask.any() else None for mask in
                                     (self.shape[tests] == SKEWED, self.shape[tests] == LOGNORMAL))
        return self._masks[key]

    def check_and_add(self, part: Part, row: np.ndarray) -> list[PatBreak]:
        """Breaks of ``row`` against its site's current limits; then ``row`` joins the site's window.

        A part from another group (``reset_on``) than the site's window starts it afresh.
        """
        key = (part.head, part.site)
        group = GROUPS[self.reset_on](part)
        state = self._sites.get(key)
        if state is None or state.group != group:
            state = self._new_site(key, group)
        else:
            self._sites.move_to_end(key)
            tests = self._due.pop(key, None)
            if tests is not None:   # not done between parts: the agent had no idle moment since
                self._refresh(state, tests)
        outside = np.flatnonzero((row < state.low) | (row > state.high))
        breaks = [_break(self.columns, "dynamic", row, state.low, state.high, i) for i in outside]
        self._add(key, state, row)
        return breaks

    def refresh_due(self) -> bool:
        """Do the refresh due longest (between parts); False when none is due."""
        if not self._due:
            return False
        key, tests = self._due.popitem(last=False)
        self._refresh(self._sites[key], tests)
        return True

    @property
    def refreshes_due(self) -> int:
        return len(self._due)

    def sites(self, limit: int | None = None) -> dict[str, dict]:
        """Per-site window state, the ``limit`` most recently tested sites (all when None)."""
        recent = list(self._sites.items())[-limit:] if limit else self._sites.items()
        return {f"{head}/{site}": {"parts": s.parts, "active": s.parts >= self.min_parts, "group": _plain(s.group)}
                for (head, site), s in recent}

    def status(self, listed: int) -> dict:
        """For the health reply, its size bounded whatever sites and groups came in: the ``listed`` most recently
        tested sites, how many are tracked and how many were dropped to make room."""
        return {"window": self.window, "min_parts": self.min_parts, "sites": self.sites(listed),
                "sites_tracked": len(self._sites), "max_sites": self.max_sites, "sites_evicted": self.evicted,
                "refreshes_due": self.refreshes_due}

    def _new_site(self, key: tuple[int, int], group: object) -> "_SiteWindow":
        self._sites.pop(key, None)
        self._due.pop(key, None)
        if len(self._sites) >= self.max_sites:
            evicted, _ = self._sites.popitem(last=False)   # least recently tested: bounded against bad site numbers
            self._due.pop(evicted, None)
            self.evicted += 1
        state = _SiteWindow(self.window, len(self.columns), group)
        self._sites[key] = state
        return state

    def _add(self, key: tuple[int, int], state: "_SiteWindow", row: np.ndarray) -> None:
        state.values[state.parts % self.window] = row
        state.parts += 1
        if state.parts < self.min_parts:
            return
        if state.parts == self.min_parts:
            self._due[key] = slice(0, len(self.columns))
        elif not state.parts % self.stride:
            start = state.cursor
            stop = min(start + self.slice, len(self.columns))
            self._due[key] = slice(start, stop)
            state.cursor = 0 if stop >= len(self.columns) else stop

    def _refresh(self, state: "_SiteWindow", tests: slice) -> None:
        """The limits of ``tests`` from the site's window as it is."""
        filled = min(state.parts, self.window)
        q1, median, q3, counts = nan_quartiles(state.values[:filled, tests])
        min_sigma = self.min_sigma[tests]
        low, high = pat_limits(q1, median, q3, min_sigma, self.k[tests], *self._shape_masks(tests))
        usable = (counts >= self.min_parts) & ((q3 > q1) | (min_sigma > 0))
        state.low[tests] = np.where(usable, low, np.nan)
        state.high[tests] = np.where(usable, high, np.nan)


# What starts a site's window afresh: a part whose group differs from the window's (dynamic PAT's reset_on).
GROUPS = {"lot": lambda part: (part.lot,), "sublot": lambda part: (part.lot, part.sublot),
          "wafer": lambda part: (part.lot, part.sublot, part.wafer), "never": lambda part: ()}


class _SiteWindow:
    __slots__ = ("values", "parts", "cursor", "group", "low", "high")

    def __init__(self, window: int, n_tests: int, group: object):
        self.values = np.full((window, n_tests), np.nan, dtype=np.float32)
        self.parts = 0          # parts seen since the window (re)started; the ring position is parts % window
        self.cursor = 0         # first test of the next slice to refresh
        self.group = group
        self.low = np.full(n_tests, np.nan, dtype=np.float32)
        self.high = np.full(n_tests, np.nan, dtype=np.float32)


def nan_quartiles(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Column-wise 25th, 50th and 75th percentile ignoring NaN (numpy's linear method), and the counts.

    Same numbers as ``np.nanpercentile(values, [25, 50, 75], axis=0)`` at a fraction of its cost on small
    blocks: one sort, NaN sorting last, then interpolation at each column's own count.
    """
    ordered = np.sort(values, axis=0)
    counts = np.count_nonzero(~np.isnan(values), axis=0)
    last = np.maximum(counts - 1, 0)
    position = _QUARTILES * last
    below = position.astype(np.intp)   # floor: positions are >= 0
    above = np.minimum(below + 1, last)
    low = np.take_along_axis(ordered, below, axis=0)
    high = np.take_along_axis(ordered, above, axis=0)
    quartiles = low + (position - below) * (high - low)
    quartiles[:, counts == 0] = np.nan
    return quartiles[0], quartiles[1], quartiles[2], counts


_QUARTILES = np.array([[0.25], [0.5], [0.75]])


def _break(columns: list[str], kind: str, row: np.ndarray, low: np.ndarray, high: np.ndarray, i: int) -> PatBreak:
    return PatBreak(columns[i], kind, float(row[i]), _limit(low[i]), _limit(high[i]))


def _limit(value: np.floating) -> float | None:
    return None if np.isnan(value) else float(value)


def _plain(group: tuple) -> str | None:
    """A window's group as the health reply shows it: "L1", "L1/A/W03" (unknown parts left out), or None."""
    return "/".join(str(value) for value in group if value is not None) or None
