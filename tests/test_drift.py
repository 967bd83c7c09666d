"""Streaming drift: the fused kernel's bin counts, PSI / Jensen-Shannon / KS, Page-Hinkley, window closing.

Bin counts are checked against numpy's histogram over the trainer's own reference edges (the reference is
built by ``trainer.reference.drift_reference``, the code that writes real manifests), with NaN readings and
readings exactly on edges. The other tests read the manifest of a real package (tests/conftest.py,
``drift_floor``). The distance values are worked out by hand in the comments.
"""
from __future__ import annotations

import math
import re
from dataclasses import replace

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from edge_agent.daemon.drift import ChangeParams, DriftMonitor, DriftReference, PageHinkley
from edge_agent.errors import DataError
from edge_agent.wire.distances import js_distance, ks_statistic, psi
from trainer.reference import drift_reference

MODEL = {"name": "m", "version": "1", "checksum": "c0ffee"}


def _numpy_counts(values: np.ndarray, edges: list[float]) -> np.ndarray:
    """np.histogram over [-inf, e1, ..., ek, +inf]: bins are [a, b) and the last [a, b], so a value on an inner
    edge lands on the edge's right, as the trainer's bin_index (searchsorted side="right") puts it."""
    finite = values[~np.isnan(values)]
    return np.histogram(finite, bins=[-np.inf, *edges, np.inf])[0]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kernel_counts_match_numpy_histogram_with_nan_and_values_on_edges(dtype):
    rng = np.random.default_rng(5)
    reference_values = rng.normal(size=(3000, 6))
    reference_values[:, 5] = 2.5                      # a constant test: its quantile edges collapse to one
    columns = [f"{100 + i}:T{i}" for i in range(6)]
    bins = drift_reference(reference_values, columns, rng.normal(size=3000), 0.0)
    if dtype is np.float32:   # quantile edges fall between readings; round them so a float32 reading can sit on one
        bins = replace(bins, tests=[replace(test, edges=np.float32(test.edges).astype(np.float64).tolist())
                                    for test in bins.tests])
    reference = DriftReference.from_bins(columns, bins)
    edges = [test.edges for test in bins.tests]
    assert len(edges[0]) == 9 and edges[5] == [2.5]    # 10 bins, and 2 for the constant test

    rows = rng.normal(size=(2000, 6))
    rows[:, 5] = rng.choice([2.0, 2.5, 3.0], size=2000)
    for t in range(5):                                # put readings exactly on every inner edge
        rows[t * 9:(t + 1) * 9, t] = edges[t]
    rows[rng.random(rows.shape) < 0.03] = np.nan
    rows = rows.astype(dtype)
    monitor = DriftMonitor(reference, MODEL, window_parts=10_000)
    for row in rows:
        monitor.update(0, 1, row, 0.0, False)
    site = monitor.close("shutdown").to_payload()["sites"][0]

    for t in range(6):
        column = rows[:, t].astype(np.float64)
        assert site["counts"][t] == _numpy_counts(column, edges[t]).tolist(), t
        assert site["missing"][t] == int(np.isnan(column).sum())
    on_edge = rows[:9, 0].astype(np.float64)
    assert np.isin(on_edge, edges[0]).sum() >= 8     # the edge readings survived (a few may be NaN)


def test_counts_are_kept_per_site_and_a_site_beyond_the_limit_makes_the_least_recent_one_room(drift_floor):
    reference = DriftReference.from_manifest(drift_floor.manifest)
    monitor = DriftMonitor(reference, MODEL, window_parts=1000, max_sites=2)
    row = np.zeros(reference.n_tests, np.float32)
    for head, site, n in ((0, 1, 5), (0, 2, 7), (0, 1, 1), (1, 1, 2)):   # (0, 2) is the least recent when (1, 1) comes
        for _ in range(n):
            monitor.update(head, site, row, 0.1, site == 2)
    payload = monitor.close("shutdown").to_payload()
    by_site = {(s["head"], s["site"]): s for s in payload["sites"]}
    assert set(by_site) == {(0, 1), (1, 1)} and monitor.evicted == 1
    assert by_site[(0, 1)]["parts"] == 6 and sum(by_site[(0, 1)]["counts"][0]) == 6
    assert payload["window"]["parts"] == 8 and payload["window"]["unobserved_parts"] == 7   # (0, 2)'s parts
    # A burst of bogus site numbers costs their own detail, never the sites still testing.
    for i in range(50):
        monitor.update(0, 1, row, 0.1, False)
        monitor.update(2, i, row, 0.1, False)
    by_site = {(s["head"], s["site"]): s for s in monitor.close("shutdown").to_payload()["sites"]}
    assert by_site[(0, 1)]["parts"] == 50 and monitor.sites == 2 and monitor.evicted == 1 + 50


def test_psi_js_ks_against_hand_computed_values():
    reference = np.full(4, 0.25)
    counts = np.array([40, 30, 20, 10])                # current proportions 0.4 0.3 0.2 0.1
    # PSI = sum (a - e) ln(a / e) = 0.15 ln 1.6 + 0.05 ln 1.2 + (-0.05) ln 0.8 + (-0.15) ln 0.4
    #     = 0.070501 + 0.009116 + 0.011157 + 0.137444 = 0.228218
    assert psi(counts, reference) == pytest.approx(0.228218, abs=1e-6)
    # KS: cumulative 0.4 0.7 0.9 1.0 against 0.25 0.5 0.75 1.0 -> largest gap 0.2 (after bin 2)
    assert ks_statistic(counts, reference) == pytest.approx(0.2)
    # JS (base 2): m = 0.325 0.275 0.225 0.175; KL(p||m) = 0.042764, KL(e||m) = 0.037640 bits;
    # divergence 0.040202, distance sqrt = 0.200504. scipy's jensenshannon is an independent check.
    assert js_distance(counts, reference) == pytest.approx(0.200504, abs=1e-6)
    assert js_distance(counts, reference) == pytest.approx(jensenshannon(counts / 100, reference, base=2))
    # Empty bins: each proportion floored at 1e-4: 2 (1e-4 - 0.25) ln(1e-4 / 0.25) + 2 (0.25) ln 2 = 4.257032
    assert psi(np.array([0, 50, 50, 0]), reference) == pytest.approx(4.257032, abs=1e-6)
    # Same distribution: all zero. Disjoint: JS distance 1 and KS 1.
    assert psi(np.array([25, 25, 25, 25]), reference) == pytest.approx(0.0, abs=1e-12)
    assert js_distance(np.array([0, 0, 0, 9]), np.array([1.0, 0, 0, 0])) == pytest.approx(1.0)
    assert ks_statistic(np.array([0, 0, 0, 9]), np.array([1.0, 0, 0, 0])) == pytest.approx(1.0)
    # No readings: undefined, not zero.
    assert math.isnan(psi(np.zeros(4), reference))
    # Vectorized over tests (rows), as the window computes them.
    both = psi(np.array([[40, 30, 20, 10], [25, 25, 25, 25]]), np.vstack([reference, reference]))
    assert both == pytest.approx([0.228218, 0.0], abs=1e-6)


def test_page_hinkley_fires_on_a_mean_shift_and_not_on_stationary_noise():
    rng = np.random.default_rng(11)
    quiet = PageHinkley(ChangeParams())
    assert not any(quiet.update(x) for x in rng.normal(size=20_000))

    for shift in (+1.0, -1.0):                         # two-sided: a score shift either way
        detector = PageHinkley(ChangeParams())
        stream = np.concatenate([rng.normal(size=1000), rng.normal(shift, 1.0, size=1000)])
        fired = [i for i, x in enumerate(stream) if detector.update(x)]
        assert fired and 1000 <= fired[0] < 1150, (shift, fired[:3])


def test_change_detector_in_the_kernel_reports_fires_per_window_and_keeps_its_state(drift_floor):
    reference = DriftReference.from_manifest(drift_floor.manifest)
    monitor = DriftMonitor(reference, MODEL, window_parts=400)
    rng = np.random.default_rng(3)
    row = np.zeros(reference.n_tests, np.float32)
    sigma = reference.score_scale
    changes = []
    for mean in (0.0, -1.5):                           # the second window: scores 1.5 reference sigmas lower
        for z in rng.normal(mean, 1.0, size=400):
            monitor.update(0, 0, row, reference.score_center + z * sigma, False)
        changes.append(monitor.maybe_close().to_payload()["sites"][0]["change"])
    assert not changes[0]["fired"] and changes[0]["parts_since_fire"] is None
    assert changes[1]["fired"] and changes[1]["fires"] >= 1 and 0 < changes[1]["parts_since_fire"] < 400


def test_windows_close_by_part_count_and_by_time_whichever_first(drift_floor):
    reference = DriftReference.from_manifest(drift_floor.manifest)
    row = np.zeros(reference.n_tests, np.float32)
    monitor = DriftMonitor(reference, MODEL, window_parts=10, window_seconds=5.0, now=100.0)
    for _ in range(9):
        monitor.update(0, 0, row, 0.1, False)
        assert monitor.maybe_close(now=101.0) is None
    monitor.update(0, 0, row, 0.1, False)
    by_count = monitor.maybe_close(now=101.0)
    assert by_count.closed_by == "parts" and by_count.parts == 10 and by_count.end - by_count.start == 1.0

    for _ in range(3):                                 # the next window opened at 101.0
        monitor.update(0, 0, row, 0.1, False)
    assert monitor.maybe_close(now=105.9) is None
    by_time = monitor.maybe_close(now=106.0)
    assert by_time.closed_by == "time" and by_time.parts == 3
    assert by_time.to_payload()["sites"][0]["parts"] == 3   # counts restarted with the window

    idle = monitor.maybe_close(now=111.0)              # nothing scored: the window still closes (a heartbeat)
    assert idle.closed_by == "time" and idle.parts == 0 and idle.to_payload()["sites"] == []


def test_a_manifest_without_a_reference_for_every_feature_is_refused_by_name(drift_floor):
    columns, manifest = drift_floor.columns, drift_floor.manifest
    reference = manifest.drift_reference
    tests = reference.tests
    without = replace(manifest, drift_reference=replace(reference, tests=[tests[0], *tests[2:]]))
    with pytest.raises(DataError, match=re.escape(columns[1])):
        DriftReference.from_manifest(without)
    short = replace(tests[0], proportions=tests[0].proportions[:-1])
    with pytest.raises(DataError, match=re.escape(columns[0])):
        DriftReference.from_manifest(replace(manifest, drift_reference=replace(reference, tests=[short, *tests[1:]])))
