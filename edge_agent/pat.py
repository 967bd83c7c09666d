"""Part Average Testing beside the models: static limits from the manifest, dynamic limits per site.

Static PAT (AEC-Q001): the manifest's per-test limits, median +/- k robust sigma of the passing training
parts. Dynamic PAT: the same statistic over a rolling window of the latest parts of each (head, site),
so a shift of one site or one lot is judged against its own recent parts.

Cost per part is bounded and small: limits are not recomputed for every test on every part. Tests are cut
into slices of at least ``MIN_SLICE_TESTS`` tests, and every ``stride`` parts one slice is refreshed from the
window (one sort of window x slice values), round robin, with ``stride`` chosen so that every test's limits
are at most ``refresh_parts`` parts old. A refresh costs the same whatever the number of tests, and most parts
pay nothing. The one exception is the part that completes a site's warm-up baseline: it computes every
test's limits at once, so dynamic PAT starts with all its limits.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .package.manifest import PatLimit
from .package.rules import pat_limits
from .wire.score import Part

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
    """The manifest's static PAT limits, as arrays aligned with the model's features (NaN = no limit)."""

    def __init__(self, columns: list[str], limits: list[PatLimit]):
        self.columns = columns
        self.low = np.full(len(columns), np.nan, dtype=np.float32)
        self.high = np.full(len(columns), np.nan, dtype=np.float32)
        self.log_scale = np.zeros(len(columns), dtype=bool)   # the trainer's choice, which dynamic PAT follows
        index = {column: i for i, column in enumerate(columns)}
        for limit in limits:
            i = index.get(limit.column)
            # A zero robust sigma (a constant or discrete test) makes median +/- k*sigma a single value that
            # every other reading would break: no PAT limit is defined for such a test.
            if i is None or not limit.robust_sigma:
                continue
            self.log_scale[i] = limit.scale == "log"
            self.low[i] = np.nan if limit.low is None else limit.low
            self.high[i] = np.nan if limit.high is None else limit.high
        self.n_limited = int(np.sum(~np.isnan(self.low) | ~np.isnan(self.high)))

    def breaks(self, row: np.ndarray) -> list[PatBreak]:
        outside = np.flatnonzero((row < self.low) | (row > self.high))   # NaN compares False: not run, no limit
        return [_break(self.columns, "static", row, self.low, self.high, i) for i in outside]


class DynamicPat:
    """Rolling-window PAT per (head, site), reset when the lot (or wafer) of a site changes."""

    def __init__(self, columns: list[str], *, window: int = 100, min_parts: int = 30, k_sigma: float = 6.0,
                 refresh_parts: int = 25, reset_on: str = "lot", max_sites: int = 512,
                 log_scale: np.ndarray | None = None):
        if not 2 <= min_parts <= window:
            raise ValueError(f"dynamic PAT needs 2 <= min_parts <= window, got min_parts {min_parts}, "
                             f"window {window}")
        self.columns = columns
        self.log_scale = np.zeros(len(columns), dtype=bool) if log_scale is None else np.asarray(log_scale, bool)
        self.window, self.min_parts, self.k_sigma = window, min_parts, k_sigma
        n_tests = len(columns)
        self.slice = min(n_tests, max(MIN_SLICE_TESTS, -(-n_tests // refresh_parts)))
        self.stride = max(1, refresh_parts // -(-n_tests // self.slice))
        if reset_on not in _GROUPS:
            raise ValueError(f"dynamic PAT reset_on must be one of {', '.join(_GROUPS)}, got {reset_on!r}")
        self.reset_on = reset_on
        self.max_sites = max_sites
        self.evicted = 0        # sites dropped to make room (least recently tested first)
        self._sites: OrderedDict[tuple[int, int], _SiteWindow] = OrderedDict()

    def check_and_add(self, part: Part, row: np.ndarray) -> list[PatBreak]:
        """Breaks of ``row`` against its site's current limits; then ``row`` joins the site's window.

        A part from another lot (``reset_on="lot"``) or wafer (``"wafer"``) than the site's window starts it afresh.
        """
        key = (part.head, part.site)
        group = _GROUPS[self.reset_on](part)
        state = self._sites.get(key)
        if state is None or state.group != group:
            state = self._new_site(key, group)
        else:
            self._sites.move_to_end(key)
        outside = np.flatnonzero((row < state.low) | (row > state.high))
        breaks = [_break(self.columns, "dynamic", row, state.low, state.high, i) for i in outside]
        self._add(state, row)
        return breaks

    def sites(self, limit: int | None = None) -> dict[str, dict]:
        """Per-site window state, the ``limit`` most recently tested sites (all when None)."""
        recent = list(self._sites.items())[-limit:] if limit else self._sites.items()
        return {f"{head}/{site}": {"parts": s.parts, "active": s.parts >= self.min_parts, "group": _plain(s.group)}
                for (head, site), s in recent}

    def status(self, listed: int) -> dict:
        """For the health reply, its size bounded whatever sites and groups came in: the ``listed`` most recently
        tested sites, how many are tracked and how many were dropped to make room."""
        return {"window": self.window, "min_parts": self.min_parts, "sites": self.sites(listed),
                "sites_tracked": len(self._sites), "max_sites": self.max_sites, "sites_evicted": self.evicted}

    def _new_site(self, key: tuple[int, int], group: object) -> "_SiteWindow":
        self._sites.pop(key, None)
        if len(self._sites) >= self.max_sites:
            self._sites.popitem(last=False)   # least recently tested site: bounded memory against bad site numbers
            self.evicted += 1
        state = _SiteWindow(self.window, len(self.columns), group)
        self._sites[key] = state
        return state

    def _add(self, state: "_SiteWindow", row: np.ndarray) -> None:
        state.values[state.parts % self.window] = row
        state.parts += 1
        if state.parts < self.min_parts:
            return
        if state.parts == self.min_parts:
            self._refresh(state, slice(0, len(self.columns)))
            return
        if state.parts % self.stride:
            return
        start = state.cursor
        stop = min(start + self.slice, len(self.columns))
        self._refresh(state, slice(start, stop))
        state.cursor = 0 if stop >= len(self.columns) else stop

    def _refresh(self, state: "_SiteWindow", tests: slice) -> None:
        filled = min(state.parts, self.window)
        q1, median, q3, counts = nan_quartiles(state.values[:filled, tests])
        # A log-scale test whose window holds a reading <= 0 falls back to the linear rule for this window.
        log_scale = self.log_scale[tests] & (q1 > 0)
        low, high = pat_limits(q1, median, q3, log_scale, self.k_sigma)
        usable = (counts >= self.min_parts) & (q3 > q1)
        state.low[tests] = np.where(usable, low, np.nan)
        state.high[tests] = np.where(usable, high, np.nan)


_GROUPS = {"lot": lambda part: part.lot, "wafer": lambda part: (part.lot, part.wafer), "never": lambda part: None}


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


def _plain(value: object) -> object:
    return value if value is None or isinstance(value, (str, int)) else str(value)
