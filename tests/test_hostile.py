"""Hostile and extreme input against real processes: a property-based fuzz of the agent's protocol, a flood of
maximum-size requests beside a fail-open client, bounded state and queues, deadlines, and every command-line
mistake the outside campaign found.

The agent under test is a real `edge-agent run` process serving tests/conftest.py's ``packages`` (20 tests); the
fuzz run also ships its drift windows to a real `edge-collector run`, so "nothing the agent accepts makes a window
the collector cannot store" is checked end to end. No assertion is on time: the flood's client counts decisions
within its own 20 ms timeout, and the flooder runs at nice 19 (what is measured is the agent's fairness, not how
the operating system shares two loaded cores).
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.client import AgentClient
from edge_agent.collector.store import Store
from edge_agent.daemon.fairness import Inbox
from edge_agent.processes import free_tcp_endpoint, start_agent, start_collector, stop
from edge_agent.wire.score import (INTEGER_RANGES, MAX_IDENTITY_BYTES, REPLY_TYPES, Code, ReadingsParser,
                                   largest_request_bytes)

FLOODER = Path(__file__).with_name("flooder.py")
STEADY_CLIENT = Path(__file__).with_name("steady_client.py")
REPLY_S = 10.0
DOCUMENTED = {value for name, value in vars(Code).items() if name.isupper()}
REPLIES = set(REPLY_TYPES.values()) | {"error"}
FUZZ_MESSAGES = 3000   # Hypothesis examples: one message each, plus a valid part from another client every 8th


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


class Dealer:
    """One DEALER connection that sends raw frames and reads one reply."""

    def __init__(self, endpoint: str):
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)

    def send(self, frames: list[bytes]) -> None:
        self.socket.send_multipart(frames)

    def receive(self, timeout_s: float = REPLY_S) -> dict | None:
        if not self.socket.poll(int(timeout_s * 1000)):
            return None
        return msgpack.unpackb(self.socket.recv(), raw=False, strict_map_key=False)

    def ask(self, message) -> dict:
        self.send(message if isinstance(message, list) else [_pack(message)])
        reply = self.receive()
        assert reply is not None, f"no reply to {str(message)[:300]}"
        return reply

    def close(self) -> None:
        self.socket.close()


def _pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def identity_at_limits(site: int = 255, text: str = "L") -> dict:
    """Every identity field at the edge of its range (strings of exactly 255 bytes of UTF-8)."""
    fill = (text * MAX_IDENTITY_BYTES)[:MAX_IDENTITY_BYTES // len(text.encode())]
    return {"lot": fill, "sublot": fill, "wafer": fill, "part_id": fill, "x": -32768, "y": 32767, "head": 255,
            "site": site}


# ---- the flood -------------------------------------------------------------------------------------------------

def _largest_batch(packages, max_batch: int) -> bytes:
    """A valid score_batch of ``max_batch`` parts as large as they come: the longest id, identity at its limits,
    readings as a map keyed by each test's longest name, in float64, and a deadline far ahead."""
    manifest = packages.manifest("1")
    names = [feature.name for feature in manifest.features]
    keys = [c if len(c) >= len(n) else n for c, n in zip(manifest.columns, names)]
    parts = [{"part": identity_at_limits(i % 256), "readings": dict(zip(keys, map(float, packages.stream[i % 400])))}
             for i in range(max_batch)]
    return _pack({"v": 1, "type": "score_batch", "id": "\U0010ffff" * 128, "deadline": 1e300, "parts": parts})


def test_twenty_flooding_connections_leave_a_fail_open_client_its_decisions_and_the_agent_within_its_bound(
        packages, tmp_path):
    """20 connections from one process (at nice 19) send maximum-size valid batches without reading a reply, beside
    the reference fail-open client at 200 parts/s with a 20 ms timeout (in a process of its own, as a test program
    is): it gets at least 95 % of its decisions during the flood, and from one second after it every one (this
    shared machine may stall a process past 20 ms now and then: the client may miss one part more than it missed in
    as long a time before the flood, when nothing but the machine's own load could make it miss), and the agent's
    RSS (from /proc) stays within its documented bound and under 300 MB."""
    endpoint = free_tcp_endpoint()
    agent = start_agent(packages.root, packages.model, endpoint, *packages.keys.trust_args,
                        log_path=tmp_path / "agent.log")
    np.save(tmp_path / "rows.npy", packages.stream)
    steady = subprocess.Popen([sys.executable, str(STEADY_CLIENT), "--connect", endpoint, "--readings",
                               str(tmp_path / "rows.npy"), "--rate", "200", "--timeout-ms", "20"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    flooder = None

    def phase(seconds: float) -> dict:
        steady.stdin.write(f"{seconds}\n")
        steady.stdin.flush()
        return json.loads(steady.stdout.readline())

    try:
        with AgentClient(endpoint) as admin:
            limits = admin.health(timeout_ms=REPLY_S * 1000)["limits"]
        request = _largest_batch(packages, 500)
        assert 0.999 * limits["max_message_bytes"] < len(request) <= limits["max_message_bytes"]
        (tmp_path / "request.msgpack").write_bytes(request)
        phase(1.0)   # warm up
        before = phase(2.0)
        baseline = rss_bytes(agent.pid)
        peak = [baseline]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.05):
                peak[0] = max(peak[0], rss_bytes(agent.pid))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        flooder = subprocess.Popen([sys.executable, str(FLOODER), "--connect", endpoint, "--connections", "20",
                                    "--request", str(tmp_path / "request.msgpack")], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, preexec_fn=lambda: os.nice(19))
        assert json.loads(flooder.stdout.readline())["connected"] == 20
        time.sleep(1.0)   # the flood builds up
        during = phase(6.0)
        flooder.stdin.close()
        flooded = json.loads(flooder.stdout.readline())
        assert flooder.wait(30) == 0
        after = phase(3.0)
        sampling.set()
        sampler.join()
        with AgentClient(endpoint) as admin:
            health = admin.health(timeout_ms=REPLY_S * 1000)
    finally:
        steady.stdin.close()
        steady.wait(30)
        if flooder is not None and flooder.poll() is None:
            flooder.kill()
        assert stop(agent) == 0
    decided = sum(d for _, d in during["parts"]) / len(during["parts"])
    print(f"\nflood: {flooded['sent']} requests of {len(request)} bytes sent; fail-open client decided "
          f"{decided:.1%} of {len(during['parts'])} during, {sum(d for _, d in after['parts'])}/{len(after['parts'])}"
          f" after; agent RSS {baseline / 1e6:.0f} MB before, peak {peak[0] / 1e6:.0f} MB, documented bound "
          f"{(baseline + 21 * limits['per_connection_bytes'] + (32 << 20)) / 1e6:.0f} MB ({limits}); "
          f"errors {health['errors']};"
          f" client {after['no_decision']}; {sum(not d for _, d in before['parts'])} missed in 2 s before; load "
          f"average {os.getloadavg()[0]:.1f}; after at {[t for t, d in after['parts'] if not d]}")
    assert flooded["sent"] > 100 and health["requests"]["score_batch"] > 0   # the flood was served, fairly
    assert decided >= 0.95
    missed_before = sum(not d for _, d in before["parts"])
    assert sum(not d for t, d in after["parts"] if t >= 1.0) <= missed_before + 1, (before, after)
    assert peak[0] < baseline + 21 * limits["per_connection_bytes"] + (32 << 20)   # the documented bound ...
    assert peak[0] < 300e6                                                           # ... and the issue's
    assert Code.INTERNAL_ERROR not in health["errors"]


# ---- the fuzz: generated messages ------------------------------------------------------------------------------

EDGE_INTS = [-(2 ** 63), -32769, -32768, -1, 0, 1, 255, 256, 32767, 32768, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1,
             2 ** 64 - 1]
INTS = st.integers(-(2 ** 63), 2 ** 64 - 1) | st.sampled_from(EDGE_INTS)
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([3.4e38, 3.5e38, -3.5e38, 1e-45, 1e300])
TEXT = st.text(max_size=40) | st.sampled_from(["", "L" * 256, "é" * 128, "\U0010ffff" * 64, "\x00"])
SCALARS = st.none() | st.booleans() | INTS | FLOATS | TEXT | st.binary(max_size=40)
KEYS = st.text(max_size=10) | st.binary(max_size=4) | st.integers(-5, 5) | st.sampled_from(
    ["v", "type", "id", "part", "readings", "parts", "deadline", "version", "lot", "head", "site", "x"])
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(KEYS, inner, max_size=5),
                      max_leaves=15)
TYPES = st.sampled_from(["score", "score_batch", "health", "rollback", "predict", "", "SCORE"]) | TEXT
PART_FIELDS = ["lot", "sublot", "wafer", "part_id", "x", "y", "head", "site"]


def _nested(depth: int, as_map: bool) -> bytes:
    """A msgpack value nested ``depth`` levels deep (built as bytes: msgpack's own packer stops at 512)."""
    return (b"\x81\xa1k" if as_map else b"\x91") * depth + b"\x01"


def _map_with(fields: dict, raw_key: str, raw_value: bytes) -> bytes:
    """A msgpack map of ``fields`` plus one entry whose value is given as msgpack bytes."""
    packer = msgpack.Packer(use_bin_type=True)
    return b"".join([packer.pack_map_header(len(fields) + 1), *(packer.pack(k) + packer.pack(v)
                                                                 for k, v in fields.items()),
                     packer.pack(raw_key), raw_value])


@st.composite
def fuzz_message(draw, n_features: int, columns: list[str]) -> tuple[str, list[bytes]]:
    """(kind, frames): malformed, hostile or extreme-but-valid, ``kind`` naming which."""
    kind = draw(st.sampled_from(["garbage", "any_msgpack", "deep", "frames", "mutated_score", "mutated_batch",
                                 "bad_identity", "extreme_valid", "extreme_valid_batch"]))
    rid = draw(INTS | TEXT)
    row = draw(st.lists(st.floats(width=32, allow_infinity=False), min_size=n_features,
                        max_size=n_features))
    if kind == "garbage":
        return kind, [draw(st.binary(max_size=300))]
    if kind == "any_msgpack":
        return kind, [_pack(draw(VALUES))]
    if kind == "deep":
        nested = _nested(draw(st.integers(1, 3000)), draw(st.booleans()))
        where = draw(st.sampled_from(["top", "id", "v", "type", "readings", "part", "parts", "extra"]))
        fields = {key: value for key, value in {"v": 1, "type": "score", "id": 1, "readings": row}.items()
                  if key != where}
        return kind, [nested if where == "top" else _map_with(fields, where, nested)]
    if kind == "frames":
        return kind, [_pack({"v": 1, "type": "health", "id": rid})] * draw(st.integers(2, 4))
    if kind in ("mutated_score", "mutated_batch"):
        item = {"readings": np.asarray(row, "<f4").tobytes(), "part": {"lot": "L1", "head": 1, "site": 2}}
        message = ({"v": 1, "type": "score", "id": rid, **item} if kind == "mutated_score"
                   else {"v": 1, "type": "score_batch", "id": rid, "parts": [item] * draw(st.integers(0, 3))})
        for _ in range(draw(st.integers(1, 3))):
            key = draw(st.sampled_from(["v", "type", "id", "readings", "part", "parts", "deadline", "extra",
                                        "drop"]))
            if key == "drop" and message:
                message.pop(draw(st.sampled_from(sorted(message))))
            elif key == "type":
                message[key] = draw(TYPES)
            elif key == "readings":
                message[key] = draw(VALUES | st.lists(FLOATS, min_size=n_features - 1, max_size=n_features + 1)
                                    | st.dictionaries(st.sampled_from(columns) | TEXT, FLOATS, max_size=4)
                                    | st.binary(max_size=4 * n_features + 4))
            else:
                message[key] = draw(VALUES)
        if message.get("type") == "reload" and message.get("version") in (2, "2"):
            message["version"] = "99"   # the fuzz must not swap the model its scores are compared with
        return kind, [_pack(message)]
    if kind == "bad_identity":
        part = {field: draw(INTS | TEXT | VALUES) for field in draw(st.lists(st.sampled_from(PART_FIELDS + ["socket"]),
                                                                            min_size=1, max_size=4))}
        return kind, [_pack({"v": 1, "type": "score", "id": rid, "readings": row, "part": part})]
    # Extreme but valid: identity at its limits (or anywhere inside them), readings anywhere in float32, NaN.
    text = draw(st.sampled_from(["L", "é", "\U0010ffff", "ab"]))
    part = {field: value for field, value in identity_at_limits(draw(st.integers(0, 255)), text).items()
            if draw(st.booleans())}
    for field in draw(st.lists(st.sampled_from(sorted(INTEGER_RANGES)), max_size=3)):
        low, high, _ = INTEGER_RANGES[field]
        part[field] = draw(st.integers(low, high))
    item = {"readings": draw(st.sampled_from([row, np.asarray(row, "<f4").tobytes()])), "part": part}
    deadline = {"deadline": time.time() + 3600} if draw(st.booleans()) else {}
    rid = draw(st.integers(-(2 ** 63), 2 ** 64 - 1) | st.text(max_size=128))
    if kind == "extreme_valid":
        return kind, [_pack({"v": 1, "type": "score", "id": rid, **item, **deadline})]
    return kind, [_pack({"v": 1, "type": "score_batch", "id": rid, "parts": [item] * draw(st.integers(1, 20)),
                         **deadline})]


def _check_reply(kind: str, reply) -> None:
    """A structured reply with a documented code, never internal_error; extreme-but-valid input is scored."""
    assert isinstance(reply, dict) and reply.get("v") == 1 and reply.get("type") in REPLIES, (kind, reply)
    if reply["type"] == "error":
        assert reply["code"] in DOCUMENTED and reply["code"] != Code.INTERNAL_ERROR, (kind, reply)
        assert isinstance(reply["message"], str) and len(reply["message"]) < 2000, (kind, reply)
    for result in reply.get("results", []):
        error = result.get("error")
        assert error is None or (error["code"] in DOCUMENTED and error["code"] != Code.INTERNAL_ERROR), (kind, result)
    if kind == "extreme_valid":
        assert reply["type"] == "score_result", reply
    if kind == "extreme_valid_batch":
        assert reply["type"] == "score_batch_result" and not any("error" in r for r in reply["results"]), reply


@pytest.fixture(scope="module")
def fuzzed(packages, tmp_path_factory):
    """An agent shipping drift windows of 300 parts to a real collector, both real processes."""
    folder = tmp_path_factory.mktemp("fuzz")
    collector_endpoint = free_tcp_endpoint()
    collector = start_collector(folder / "stats.sqlite", collector_endpoint, log_path=folder / "collector.log")
    config = folder / "agent.toml"
    config.write_text("[agent]\nmax_batch = 20\n[drift]\nwindow_parts = 300\n")
    endpoint = free_tcp_endpoint()
    agent = start_agent(packages.root, packages.model, endpoint, *packages.keys.trust_args, "--config", str(config),
                        "--collector", collector_endpoint, log_path=folder / "agent.log")
    yield {"endpoint": endpoint, "agent": agent, "db": folder / "stats.sqlite", "log": folder / "agent.log"}
    stop(agent)
    stop(collector)


def test_generated_malformed_and_extreme_messages_each_get_a_documented_reply_and_valid_parts_score_as_offline(
        fuzzed, packages):
    """3,000 generated messages of nine kinds; every 8th, a valid part from another connection must score exactly
    as offline onnxruntime scores it; afterwards the agent is up, within its memory bound, and every drift window
    it shipped was stored by the collector."""
    manifest = packages.manifest("1")
    columns = manifest.columns
    stream = packages.stream
    offline_score, offline_probability = packages.offline("1", stream)
    hostile, valid = Dealer(fuzzed["endpoint"]), Dealer(fuzzed["endpoint"])
    kinds: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    baseline = rss_bytes(fuzzed["agent"].pid)

    @settings(max_examples=FUZZ_MESSAGES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(fuzz_message(packages.n_tests, columns))
    def run(case):
        kind, frames = case
        kinds[kind] += 1
        hostile.send(frames)
        reply = hostile.receive()
        assert reply is not None, f"no reply to a {kind} message: {frames[0][:200]!r}"
        _check_reply(kind, reply)
        codes[reply.get("code", reply["type"])] += 1
        if sum(kinds.values()) % 8 == 0:
            i = sum(kinds.values()) // 8 % len(stream)
            scored = valid.ask({"v": 1, "type": "score", "id": i, "readings": stream[i].tobytes()})
            assert scored["type"] == "score_result", scored
            assert scored["outlier_score"] == pytest.approx(float(offline_score[i]), abs=1e-6)
            assert scored["pass_probability"] == pytest.approx(float(offline_probability[i]), abs=1e-6)

    try:
        run()
        health = valid.ask({"v": 1, "type": "health", "id": "after"})
    finally:
        hostile.close()
        valid.close()
    print(f"\nfuzz: {sum(kinds.values())} messages by kind {dict(kinds)}; replies {dict(codes)}")
    assert sum(kinds.values()) >= FUZZ_MESSAGES * 0.9 and len(kinds) == 9
    assert Code.INTERNAL_ERROR not in health["errors"]
    bound = baseline + 2 * health["limits"]["per_connection_bytes"] + (32 << 20)   # + the allocator's slack
    assert rss_bytes(fuzzed["agent"].pid) < bound
    assert "internal error" not in fuzzed["log"].read_text()
    assert stop(fuzzed["agent"]) == 0   # ships the open window, waiting for its ack
    spool = fuzzed["log"].with_suffix(".spool")
    with sqlite3.connect(fuzzed["db"]) as db:
        windows = db.execute("SELECT count(*) FROM windows").fetchone()[0]
        refused = db.execute("SELECT count(*) FROM alerts WHERE kind = 'refused_window'").fetchone()[0]
    assert windows >= 2 and refused == 0
    assert not list(spool.glob("*.msg")) and not (spool / "dead-letter").exists()   # every window stored


# ---- bounded state, queues and deadlines ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def agent(packages, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bounded")
    config = folder / "agent.toml"
    config.write_text("[agent]\nmax_batch = 50\nmax_request_age_ms = 100\n[pat]\nmax_sites = 64\n"
                      "[drift]\nmax_sites = 64\n")
    endpoint = free_tcp_endpoint()
    process = start_agent(packages.root, packages.model, endpoint, *packages.keys.trust_args, "--config",
                          str(config), log_path=folder / "agent.log")
    yield {"endpoint": endpoint, "process": process}
    assert stop(process) == 0


def test_identity_beyond_its_stdf_range_is_refused_naming_field_limit_and_value(agent, packages):
    row = packages.stream[0].tobytes()
    cases = [({"head": 2 ** 64 - 1}, "part.head", "0..255"), ({"site": 256}, "part.site", "256"),
             ({"x": 32768}, "part.x", "-32768..32767"), ({"y": -32769}, "part.y", "-32769"),
             ({"wafer": 2 ** 32}, "part.wafer", "4294967295"), ({"lot": "L" * 256}, "part.lot", "255"),
             ({"sublot": "é" * 128}, "part.sublot", "256 bytes"), ({"part_id": "P" * 5000}, "part.part_id", "255")]
    dealer = Dealer(agent["endpoint"])
    try:
        for part, field, word in cases:
            reply = dealer.ask({"v": 1, "type": "score", "id": field, "readings": row, "part": part})
            assert (reply["type"], reply["code"]) == ("error", Code.FIELD_OUT_OF_RANGE), reply
            assert field in reply["message"] and word in reply["message"] and len(reply["message"]) < 300
        at_limits = dealer.ask({"v": 1, "type": "score", "id": "edge", "readings": row,
                                "part": identity_at_limits(0, "é")})
    finally:
        dealer.close()
    assert at_limits["type"] == "score_result"


def test_a_thousand_sites_with_long_identities_leave_state_and_the_health_reply_small(agent, packages):
    dealer = Dealer(agent["endpoint"])
    try:
        for i in range(1000):
            reply = dealer.ask({"v": 1, "type": "score", "id": i, "readings": packages.stream[i % 400].tobytes(),
                                "part": {**identity_at_limits(i % 256, "\U0010ffff"), "head": i // 256}})
            assert reply["type"] == "score_result"
        for _ in range(3):   # a real site keeps its window among the bogus ones
            assert dealer.ask({"v": 1, "type": "score", "id": "real", "readings": packages.stream[0].tobytes(),
                               "part": {"lot": "L1", "site": 7}})["type"] == "score_result"
        for attempt in range(100):   # drift statistics are taken between parts: until none is queued
            dealer.send([_pack({"v": 1, "type": "health", "id": f"h{attempt}"})])
            raw = dealer.socket.recv() if dealer.socket.poll(int(REPLY_S * 1000)) else b""
            if msgpack.unpackb(raw)["drift"]["queued_parts"] == 0:
                break
    finally:
        dealer.close()
    health = msgpack.unpackb(raw)
    pat, drift = health["dynamic_pat"], health["drift"]
    assert len(raw) < 64 << 10 and len(pat["sites"]) <= 32 and "1/7" in pat["sites"]
    assert pat["sites_tracked"] == pat["max_sites"] == 64 and pat["sites_evicted"] >= 1000 - 64
    assert drift["sites_tracked"] <= 64 and drift["sites_evicted"] >= 1000 - 64


def test_a_deadline_already_past_is_answered_at_once_without_scoring(agent, packages):
    dealer = Dealer(agent["endpoint"])
    try:
        before = dealer.ask({"v": 1, "type": "health", "id": 0})["parts_scored"]
        for i in range(200):   # a backlog nobody waits for
            dealer.send([_pack({"v": 1, "type": "score", "id": i, "readings": packages.stream[i].tobytes(),
                                "deadline": time.time() - 1.0})])
        replies = [dealer.receive() for _ in range(200)]
        after = dealer.ask({"v": 1, "type": "health", "id": 1})
        bad = dealer.ask({"v": 1, "type": "score", "id": "nan", "readings": packages.stream[0].tobytes(),
                          "deadline": float("nan")})
        with AgentClient(agent["endpoint"], timeout_ms=REPLY_S * 1000, send_deadline=True) as client:
            in_time = client.score(packages.stream[0])   # its deadline: now + its timeout
    finally:
        dealer.close()
    assert in_time.decided
    assert [(r["id"], r["code"]) for r in replies] == [(i, Code.DEADLINE_EXCEEDED) for i in range(200)]
    assert after["parts_scored"] == before
    assert bad["code"] == Code.FIELD_OUT_OF_RANGE and "deadline" in bad["message"]


def test_requests_that_waited_too_long_behind_heavy_clients_expire_and_a_light_client_is_served_first(
        agent, packages):
    """Eight connections each send a 50-part batch (max_request_age_ms = 100): the last of them wait their turn
    longer than that, are answered deadline_exceeded without scoring, and a single part sent after them all is
    answered before any batch finishes."""
    rows = packages.stream
    batch = _pack({"v": 1, "type": "score_batch", "id": "b",
                   "parts": [{"readings": rows[i].tobytes(), "part": {"site": 9}} for i in range(50)]})
    heavy = [Dealer(agent["endpoint"]) for _ in range(8)]
    light = Dealer(agent["endpoint"])
    try:
        for _ in range(20):
            for dealer in heavy:
                dealer.send([batch])
        light.send([_pack({"v": 1, "type": "score", "id": "light", "readings": rows[0].tobytes()})])
        first = light.receive()
        outcomes = Counter()
        for dealer in heavy:
            while (reply := dealer.receive(timeout_s=2.0)) is not None:
                outcomes[reply.get("code", reply["type"])] += 1
    finally:
        for dealer in heavy + [light]:
            dealer.close()
    assert first["type"] == "score_result"
    assert outcomes[Code.DEADLINE_EXCEEDED] > 0 and outcomes["score_batch_result"] > 0
    assert set(outcomes) <= {Code.DEADLINE_EXCEEDED, "score_batch_result", Code.OVERLOADED}


def test_requests_over_a_clients_share_are_refused_at_once_and_the_rest_answered_in_order(agent, packages):
    """A client that sends 400 batches without waiting: those beyond its share of the agent's queue get overloaded
    at once (with their id), the others are answered in the order sent (or expire, max_request_age_ms being 100),
    and a polite client is not held up."""
    big = _pack({"v": 1, "type": "score_batch", "id": "big",
                 "parts": [{"readings": packages.stream[i].tobytes(), "part": identity_at_limits(1)}
                           for i in range(50)]})
    greedy, polite = Dealer(agent["endpoint"]), Dealer(agent["endpoint"])
    try:
        for i in range(400):
            greedy.send([big.replace(b"big", f"{i:03d}".encode(), 1)])
        for i in range(20):
            assert polite.ask({"v": 1, "type": "score", "id": i,
                               "readings": packages.stream[i].tobytes()})["type"] == "score_result"
        replies = []
        while len(replies) < 400 and (reply := greedy.receive()) is not None:
            replies.append(reply)
        health = polite.ask({"v": 1, "type": "health", "id": "h"})
    finally:
        greedy.close()
        polite.close()
    overloaded = [r["id"] for r in replies if r.get("code") == Code.OVERLOADED]
    answered = [r["id"] for r in replies if r["type"] == "score_batch_result"]
    expired = [r["id"] for r in replies if r.get("code") == Code.DEADLINE_EXCEEDED]
    assert len(overloaded) + len(answered) + len(expired) == len(replies) == len({r["id"] for r in replies})
    # A refusal that finds ZeroMQ's queue to the client full is dropped and counted, never held.
    assert len(replies) + health["replies_dropped"].get("queue_full", 0) >= 400
    assert overloaded and answered and answered == sorted(answered)
    assert health["errors"][Code.OVERLOADED] >= len(overloaded) and health["inbox"]["requests"] == 1   # itself


# ---- the fair queue, alone -----------------------------------------------------------------------------------------

def test_the_fair_queue_serves_a_light_client_next_and_holds_one_whose_replies_are_held():
    inbox = Inbox(client_bytes=300, total_bytes=10_000, held_bytes=100)
    for i in range(3):
        assert inbox.take(b"heavy", f"h{i}", 100)
    assert not inbox.take(b"heavy", "h3", 100)           # its share is full
    assert inbox.take(b"heavy-2", "g0", 100)
    served = []
    for _ in range(3):                                    # the heavy clients take turns of 10 ms
        client, item = inbox.next()
        served.append(item)
        inbox.served(client, 0.010, finished=False)
    assert served == ["h0", "g0", "h0"]
    assert inbox.take(b"light", "l0", 10) and inbox.take(b"light", "l1", 10)
    assert inbox.next() == (b"light", "l0")             # next, however long the others keep it busy
    inbox.hold(b"light", "its reply", 60)
    inbox.hold(b"light", "the next", 60)                 # behind it, in order: 120 bytes held, over its 100
    assert inbox.holds(b"light") and inbox.held == 2
    inbox.served(b"light", 0.0001, finished=True)
    for _ in range(4):                                    # too much held: no turn for it, l1 waits
        client, _ = inbox.next()
        assert client != b"light"
        inbox.served(client, 0.010, finished=False)
    assert inbox.held_due(time.perf_counter() + 1) == [(b"light", "its reply")]
    assert inbox.release(b"light") == "the next"         # sent: the next is offered at once; 60 held, under 100
    assert inbox.next() == (b"light", "l1") and inbox.requests == 5 and inbox.bytes == 410
    inbox.served(b"light", 0.0001, finished=False)
    assert inbox.release(b"light") is None and not inbox.holds(b"light") and inbox.held == 0
    # A client whose reply could not be routed has gone: its requests go, and so does what still arrives for a while.
    assert inbox.gone(b"heavy", 0, now=100.0) == 3 and inbox.requests == 2
    assert inbox.is_gone(b"heavy", now=101.0) and not inbox.is_gone(b"heavy", now=102.5)


def test_the_largest_request_bound_is_the_size_of_a_request_built_at_every_limit(packages):
    manifest = packages.manifest("1")
    parser = ReadingsParser(manifest.columns, [feature.name for feature in manifest.features])
    built = len(_largest_batch(packages, 50))
    bound = largest_request_bytes(parser, 50)
    assert built <= bound < built * 1.001


# ---- command-line mistakes: one line naming what was wrong and what was expected -------------------------------

def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def _one_line(result: subprocess.CompletedProcess, status: int, *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status and len(lines) == 1, (result.returncode, result.stderr)
    assert all(word in lines[0] for word in words), lines[0]


def test_each_command_line_mistake_gives_one_line_and_its_exit_status(tmp_path, packages):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    stdf = Path(__file__).with_name("data") / "stdf" / "a595.stdf.gz"
    sqlite_db = tmp_path / "stats.sqlite"
    Store(sqlite_db).close()   # an empty collector database to report on

    _one_line(_run("edge_agent.daemon.cli", "health", "--connect", "127.0.0.1:5555"), 2,
              "--connect", "tcp://host:port", "'127.0.0.1:5555'")
    _one_line(_run("trainer.replay", str(stdf), "--features-from-agent", "--connect", "127.0.0.1:5555"), 2,
              "--connect", "tcp://host:port")
    _one_line(_run("edge_agent.collector.cli", "report", "--db", str(sqlite_db), "--out",
                   str(tmp_path / "missing" / "r.html")), 2, "missing", "does not exist", "expected an existing folder")
    _one_line(_run("edge_agent.collector.cli", "report", "--db", str(sqlite_db), "--out", str(a_file / "r.html")), 2,
              "a-file is a file", "expected a folder")
    _one_line(_run("trainer.cli", "synth", "--out", str(a_file / "lot.csv"), "--parts", "10"), 2,
              "--out", "a-file is a file", "expected a folder")
    _one_line(_run("bench.cli", "--quick", "--json", str(a_file / "r.json")), 2, "--json", "a-file is a file")

    endpoint = free_tcp_endpoint()
    holder = zmq.Context.instance().socket(zmq.ROUTER)
    holder.bind(endpoint)
    try:
        taken = _run("edge_agent.daemon.cli", "run", "--registry", str(packages.root), "--model", packages.model, "--bind",
                     endpoint, "--metrics-port", "0", "--no-drift", *packages.keys.trust_args)
    finally:
        holder.close(linger=0)
    assert taken.returncode == 3, taken.stderr
    assert f"cannot listen on {endpoint}: Address already in use" in taken.stderr.strip().splitlines()[-1]
