"""Explanations: every ML outlier and PAT break names the tests furthest from typical, with value, robust sigmas and
typical range, from a real agent process serving the pathological floor's package (tests/conftest.py)."""
from __future__ import annotations

import numpy as np
import pytest

from edge_agent.client import AgentClient
from edge_agent.daemon.explain import Explainer

REPLY_MS = 30_000.0
PART = {"lot": "EXPLAIN", "head": 2, "site": 1}   # its own dynamic PAT window, apart from other tests' parts


def _complete_good_parts(floor) -> np.ndarray:
    frame = floor.next_lot.frame
    rows = floor.next_lot.readings(floor.manifest.columns).astype(np.float32)
    good = frame["passed"].to_numpy(bool) & (frame["truth_excursion"] == "").to_numpy() & ~np.isnan(rows).any(axis=1)
    return rows[good]


def test_a_single_test_outlier_is_named_with_how_far_out_it_is(floor_agent, pathological_floor):
    """A good part with one test moved 14,000 robust sigmas: the outlier score barely moves (an Isolation Forest
    isolates it only in the trees that split on that test: the saturation the issue describes), static PAT breaks,
    and the explanation names the injected test first with its distance."""
    floor = pathological_floor
    limits = {limit.column: limit for limit in floor.manifest.pat.limits}
    column = next(c for c, limit in limits.items() if limit.shape == "normal" and limit.self_check == "kept")
    index = floor.manifest.columns.index(column)
    part = _complete_good_parts(floor)[7]
    injected = part.copy()
    injected[index] = limits[column].median + 14_000 * limits[column].robust_sigma
    with AgentClient(floor_agent, timeout_ms=REPLY_MS) as client:
        plain, far = client.score(part, PART), client.score(injected, PART)
    assert plain.decided and far.decided and not plain.flags and plain.drivers == []
    assert abs(far.outlier_score - plain.outlier_score) < 0.02            # the score hides it ...
    assert "static_pat" in far.flags and far.bin_name == "static_pat"
    first = far.drivers[0]                                                 # ... the explanation does not
    assert first["test"] == column and first["z"] == pytest.approx(14_000, rel=0.01)
    assert first["typical_low"] < limits[column].median < first["typical_high"]
    assert f"furthest from typical: {column}=" in far.why and "+1.4e+04 robust sigma" in far.why


def test_ml_outliers_are_explained_by_the_tests_their_defect_moved(floor_agent, pathological_floor):
    """The next lot's injected latent outliers that the model flags: the tests named are the ones the injection
    moved (35 % of the tests, 3.5-5 sigma each), not the other 65 %."""
    floor = pathological_floor
    frame = floor.next_lot.frame
    columns = floor.manifest.columns
    rows = floor.next_lot.readings(columns).astype(np.float32)
    latent = (frame["truth_excursion"] == "latent_outliers").to_numpy() & ~np.isnan(rows).any(axis=1)
    (excursion,) = [e for e in floor.truth["excursions"] if e["kind"] == "latent_outliers"]
    moved = set(excursion["tests"])
    with AgentClient(floor_agent, timeout_ms=REPLY_MS) as client:
        results = client.score_batch([(PART, row) for row in rows[latent]])
    explained = [r for r in results if r.outlier]
    assert len(explained) >= 10
    named = [driver["test"] for r in explained for driver in r.drivers]
    assert all(len(r.drivers) == 3 and "ML outlier" in r.why and "robust sigma" in r.why for r in explained)
    assert sum(test in moved for test in named) >= 0.9 * len(named)


def test_explainer_skips_tests_not_run_and_tests_without_statistics(pathological_floor):
    manifest = pathological_floor.manifest
    explainer = Explainer(manifest.columns, manifest.pat.limits)
    row = _complete_good_parts(pathological_floor)[0].copy()
    normal = [i for i, limit in enumerate(manifest.pat.limits) if limit.shape == "normal"]
    far = normal[3:60:15]                       # four tests of the normal rule: z is linear in the reading
    for i, distance in zip(far, (50, 40, 30, 20)):
        limit = manifest.pat.limits[i]
        row[i] = limit.median - distance * limit.robust_sigma
    row[far[0]] = np.nan                        # the furthest test did not run
    drivers = explainer.drivers(row)
    assert [d.test for d in drivers] == [manifest.columns[i] for i in far[1:]]
    assert all(d.z < 0 for d in drivers) and [d.z for d in drivers] == sorted(d.z for d in drivers)
    assert explainer.drivers(np.full(len(manifest.columns), np.nan, np.float32)) == []
    blind = Explainer(manifest.columns, [])     # no statistics at all
    assert blind.drivers(row) == []
