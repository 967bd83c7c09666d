"""A touchdown as one matrix: every site of a touchdown in one score_touchdown message gets exactly the decision it
gets sent alone, between two real agent processes serving the pathological floor's package (tests/conftest.py):
one takes the parts one score request at a time, the other the same parts as touchdowns, sites in shuffled order,
some messages holding a site twice, one with a bad row. And slow replies carry their cause."""
from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

from edge_agent.client import AgentClient
from edge_agent.daemon.slow import Activities, SlowReplies
from edge_agent.processes import free_tcp_endpoint, start_agent, stop
from edge_agent.wire.score import MAX_TOUCHDOWN_PARTS

REPLY_MS = 30_000.0
SITES = 4
TOUCHDOWNS = 60          # 15 parts of dynamic PAT warm-up per site, then judged against its window
NOT_DECISION = {"agent_us", "round_trip_us", "model", "request_id"}


@pytest.fixture()
def two_agents(pathological_floor, keys, tmp_path):
    floor = pathological_floor
    endpoints, processes = [], []
    for name in ("alone", "touchdown"):
        endpoint = free_tcp_endpoint()
        processes.append(start_agent(floor.registry.root, floor.ref.name, endpoint, "--no-drift", *keys.trust_args,
                                     log_path=tmp_path / f"{name}.log"))
        endpoints.append(endpoint)
    yield endpoints
    for process in processes:
        assert stop(process) == 0


def _decision(result) -> dict:
    return {key: value for key, value in dataclasses.asdict(result).items() if key not in NOT_DECISION}


def test_every_site_of_a_touchdown_gets_the_decision_it_gets_alone(two_agents, pathological_floor):
    floor = pathological_floor
    rows = floor.next_lot.readings(floor.manifest.columns).astype(np.float32)[:TOUCHDOWNS * SITES].copy()
    rng = np.random.default_rng(3)
    # Parts after the warm-up with readings just inside their static limits: outside their site window's dynamic
    # limits, whose window is narrower than the training lots' spread, so the site windows decide these parts.
    limited = [i for i, limit in enumerate(floor.manifest.pat.limits) if limit.shape == "normal" and limit.high]
    for k in range(40 * SITES, len(rows), 7):
        i = limited[k % len(limited)]
        rows[k, i] = np.nextafter(np.float32(floor.manifest.pat.limits[i].high), np.float32(-np.inf))
    parts = [({"lot": "TD", "wafer": 1, "head": 1, "site": i % SITES + 1, "x": i, "y": 0}, row)
             for i, row in enumerate(rows)]
    messages = []
    for start in range(0, len(parts), SITES):
        touchdown = [parts[i] for i in start + rng.permutation(SITES)]   # the sites in any order
        messages.append(touchdown)
    # Sites mixed: two touchdowns in one message, each site twice, judged in order within its site's window.
    messages[10] = messages[10] + messages.pop(11)
    # One row bad: its result is an error naming it; the others are decided as if it had not been sent.
    infinite = rows[0].copy()
    infinite[5] = np.inf
    bad = ({"lot": "TD", "wafer": 1, "head": 1, "site": 1}, infinite)
    messages[20] = messages[20][:2] + [bad] + messages[20][2:]
    alone, together = [], []
    with AgentClient(two_agents[0], timeout_ms=REPLY_MS) as one, AgentClient(two_agents[1], timeout_ms=REPLY_MS) as td:
        for message in messages:
            alone += [one.score(readings, part) for part, readings in message if part is not bad[0]]
            results = td.score_touchdown(message)
            assert len(results) == len(message)
            together += [r for (part, _), r in zip(message, results) if part is not bad[0]]
            if message is messages[20]:
                refused = results[2]
                assert not refused.decided and "parts[2].readings" in refused.error_message
    assert len(alone) == len(together) == TOUCHDOWNS * SITES
    assert all(result.decided for result in alone)
    assert [_decision(r) for r in together] == [_decision(r) for r in alone]
    # The comparison covers decisions that depend on each site's window: dynamic PAT limits were live.
    assert sum("dynamic_pat" in r.flags for r in alone) >= 3
    assert {"pass", "static_pat", "insufficient_readings"} <= {r.bin_name for r in alone}


def test_a_touchdown_larger_than_a_tester_has_sites_is_refused_naming_the_limit(floor_agent, pathological_floor):
    row = pathological_floor.next_lot.readings(pathological_floor.manifest.columns).astype(np.float32)[0]
    with AgentClient(floor_agent, timeout_ms=REPLY_MS) as client:
        results = client.score_touchdown([({"head": 9, "site": i}, row) for i in range(MAX_TOUCHDOWN_PARTS + 1)])
    assert {r.error_code for r in results} == {"batch_too_large"}
    assert f"at most {MAX_TOUCHDOWN_PARTS} sites" in results[0].error_message


def test_a_slow_reply_is_kept_with_its_largest_cause_and_an_unexplained_one_says_so():
    activities = Activities()
    counts = Counter()
    slow = SlowReplies(5.0, counts, activities)
    activities.mark("gc (generation 2)", 100.002, 100.008)
    activities.mark("drift tick (a window closing)", 100.0085, 100.0087)
    slow.check("score_result", 100.0, 100.0005, 100.010, {"graphs": 150.0})      # 10 ms, 6 of them a collection
    slow.check("score_result", 200.0, 200.007, 200.009, None)                   # 9 ms, 7 waiting for its turn
    slow.check("score_result", 300.0, 300.0001, 300.006, None)                  # 6 ms, nothing the agent did
    slow.check("score_result", 400.0, 400.0001, 400.004, None)                  # 4 ms: not slow
    status = slow.status()
    assert status["total"] == 3 and dict(counts) == {"gc (generation 2)": 1, "queued": 1, "unexplained": 1}
    first = status["recent"][0]
    assert first["cause"] == "gc (generation 2)" and first["causes_ms"]["gc (generation 2)"] == pytest.approx(6.0)
    assert first["causes_ms"]["drift tick (a window closing)"] == pytest.approx(0.2)
    assert first["stages_us"] == {"graphs": 150.0} and first["agent_us"] == pytest.approx(10_000.0)


def test_a_real_agent_reports_its_slow_replies_with_stages_and_causes_in_health(pathological_floor, keys, tmp_path):
    """Every reply counts as slow at a threshold of 1 us: each is kept with its stage breakdown and causes, and the
    health reply and the metrics count them (no timing is asserted)."""
    floor = pathological_floor
    endpoint = free_tcp_endpoint()
    process = start_agent(floor.registry.root, floor.ref.name, endpoint, "--no-drift", "--slow-reply-ms", "0.001",
                          "--stage-sample-every", "1", *keys.trust_args, log_path=tmp_path / "agent.log")
    try:
        rows = floor.next_lot.readings(floor.manifest.columns).astype(np.float32)[:8]
        with AgentClient(endpoint, timeout_ms=REPLY_MS) as client:
            before = client.health(timeout_ms=REPLY_MS)["slow_replies"]["total"]
            results = [client.score(row, {"lot": "SLOW", "site": 1}) for row in rows]
            slow = client.health(timeout_ms=REPLY_MS)["slow_replies"]
    finally:
        assert stop(process) == 0
    assert all(r.decided for r in results)
    assert slow["threshold_ms"] == pytest.approx(0.001) and slow["total"] >= before + len(rows)
    scored = [entry for entry in slow["recent"] if entry["type"] == "score_result"]
    assert len(scored) >= len(rows)
    assert all(entry["cause"] and "graphs" in entry["stages_us"] for entry in scored)
    assert sum(slow["by_cause"].values()) == slow["total"]
