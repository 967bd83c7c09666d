"""Does each PAT screen tell good parts from failing ones on parts later than those that set it?

The training parts are cut in time: the earlier ones (every lot but the last; with one lot, every wafer but the
last ones; else the first 70 % of rows) set static PAT limits by the package's own rules (``trainer.reference``),
and the later ones are judged: static limits through the agent's ``StaticPat``, dynamic PAT replayed part by part
through the agent's ``DynamicPat`` with those rules and its default settings (window 100, warm-up 30, restart on
a wafer change), in the later parts' order and by their head/site/lot/wafer. The
share of good parts (the tester's pass flag) and of failing parts each screen flags, with 95 % Wilson intervals.

A screen that flags failing parts less than ``SEPARATION`` times as often as good ones screens nothing (a real next
lot: dynamic PAT flagged 27.2 % of the good parts and 28.7 % of the failing ones). Its verdict "does not separate"
goes in the manifest and the card, and the agent reports that screen's breaks without letting them decide a bin.
"""
from __future__ import annotations

import math

import numpy as np

from edge_agent.daemon.pat import DynamicPat, StaticPat
from edge_agent.package.manifest import PatScreen
from edge_agent.package.rules import RESOLUTION_FLOOR
from edge_agent.wire.score import Part

from .reference import static_pat_limits
from .table import ParametricTable

LATER_SHARE = 0.3            # without lots or wafers to cut at, the latest 30 % of the rows are judged
MAX_LATER_PARTS = 20_000     # the replay costs tens of microseconds a part: the latest this many are judged
MAX_EARLIER_PARTS = 100_000  # limits from this many earlier passing parts (evenly spread) are as good as from all
MIN_GOOD, MIN_FAIL = 30, 10  # fewer later good or failing parts with readings: not judged
SEPARATION = 2.0             # flags failing parts at least this many times as often as good ones
Z95 = 1.96


def check_screens(table: ParametricTable, X: np.ndarray, columns: list[str], passed: np.ndarray, *,
                  k_sigma: float, max_flag_rate: float, on_excess: str,
                  limit_ranges: list[float | None]) -> tuple[list[PatScreen], str]:
    """(static and dynamic screen checks, how the parts were cut) for the rows ``X`` of ``table``."""
    earlier, later, cut = _cut_in_time(table.frame)
    later = later[-MAX_LATER_PARTS:]
    groups = {name: _column(table.frame, name) for name in ("lot", "sublot", "wafer")}
    sites = table.site_keys()
    reference = earlier[passed[earlier]]
    reference = reference[np.linspace(0, len(reference) - 1, min(len(reference), MAX_EARLIER_PARTS)).astype(int)]
    limits = static_pat_limits(X[reference], columns, k_sigma, max_flag_rate=max_flag_rate, on_excess=on_excess,
                               lots=table.lot_keys()[reference], wafers=table.wafer_keys()[reference],
                               sites=sites[reference], limit_ranges=limit_ranges)
    static = StaticPat(columns, limits, k_sigma=k_sigma, resolution_floor=RESOLUTION_FLOOR)
    dynamic = DynamicPat(columns, k_sigma=k_sigma, shape=static.shape, min_sigma=static.min_sigma,
                         k_factor=static.k_factor)
    rows = X[later].astype(np.float32)
    static_flag = np.zeros(len(later), bool)
    dynamic_flag = np.zeros(len(later), bool)
    for k, i in enumerate(later):
        static_flag[k] = bool(static.breaks(rows[k]))
        part = Part(lot=groups["lot"][i], sublot=groups["sublot"][i], wafer=groups["wafer"][i],
                    head=int(sites[i] // 1000), site=int(sites[i] % 1000))
        dynamic_flag[k] = bool(dynamic.check_and_add(part, rows[k]))
        while dynamic.refresh_due():
            pass
    judged = np.isfinite(rows).any(axis=1)
    good = passed[later] & judged
    failing = ~passed[later] & judged
    return [_screen(kind, flags, good, failing) for kind, flags in (("static", static_flag),
                                                                     ("dynamic", dynamic_flag))], cut


def _screen(kind: str, flags: np.ndarray, good: np.ndarray, failing: np.ndarray) -> PatScreen:
    n_good, n_fail = int(good.sum()), int(failing.sum())
    k_good, k_fail = int(flags[good].sum()), int(flags[failing].sum())
    good_rate = k_good / n_good if n_good else 0.0
    fail_rate = k_fail / n_fail if n_fail else 0.0
    if n_good < MIN_GOOD or n_fail < MIN_FAIL:
        verdict = "not judged"
        reason = f"{n_good} good and {n_fail} failing later parts (needs {MIN_GOOD} and {MIN_FAIL})"
    elif fail_rate < SEPARATION * good_rate or k_fail == 0:
        verdict = "does not separate"
        reason = (f"flags {good_rate:.1%} of the later good parts and {fail_rate:.1%} of the failing ones "
                  f"(needs {SEPARATION:g}x as many failing): it screens nothing, so its breaks are reported, not "
                  "binned")
    else:
        verdict = "separates"
        reason = f"flags {fail_rate / good_rate:.1f}x as many failing parts as good" if k_good else \
            "flags failing parts and no good one"
    return PatScreen(kind=kind, good_parts=n_good, good_flagged=k_good, good_rate_interval=_wilson(k_good, n_good),
                     fail_parts=n_fail, fail_flagged=k_fail, fail_rate_interval=_wilson(k_fail, n_fail),
                     verdict=verdict, reason=reason)


def _cut_in_time(frame) -> tuple[np.ndarray, np.ndarray, str]:
    """(earlier rows, later rows, in words): at the last lot, else the last wafers, else the latest rows."""
    n = len(frame)
    for name in ("lot", "wafer"):
        if name not in frame.columns:
            continue
        values = frame[name].astype(object).where(frame[name].notna(), "").astype(str).to_numpy()
        order = list(dict.fromkeys(values))          # groups in the order they were tested
        if len(order) < 2:
            continue
        later_groups, count = [], 0
        for group in reversed(order[1:]):
            later_groups.append(group)
            count += int(np.count_nonzero(values == group))
            if count >= LATER_SHARE * n:
                break
        later = np.isin(values, later_groups)
        return (np.flatnonzero(~later), np.flatnonzero(later),
                f"limits from the earlier {name}s, judged on the later {len(later_groups)} {name}(s)")
    split = int(round((1 - LATER_SHARE) * n))
    return np.arange(split), np.arange(split, n), f"limits from the first {1 - LATER_SHARE:.0%} of the rows, " \
                                                   f"judged on the rest"


def _column(frame, name: str) -> np.ndarray:
    if name not in frame.columns:
        return np.full(len(frame), None, dtype=object)
    return frame[name].astype(object).where(frame[name].notna(), None).to_numpy()


def _wilson(k: int, n: int) -> list[float]:
    if not n:
        return [0.0, 1.0]
    p = k / n
    centre = (p + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / (1 + Z95 ** 2 / n)
    return [round(max(0.0, centre - half), 6), round(min(1.0, centre + half), 6)]
