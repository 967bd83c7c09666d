"""Edge agent: a real agent process, real sockets, real packages, real onnxruntime and scikit-learn.

Packages are trained once per session (tests/conftest.py, ``packages``: 1,500 synthetic parts x 20 tests, 50-tree
forest): version 1 in production, version 2 (another lot) a candidate, both signed by the test trainer key that
every agent here trusts. Reload and rollback go to the agent's CURVE control socket with the ``control`` key.
Tests that change the registry work on a copy.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import onnx
import pytest
import zmq

from edge_agent.daemon.binning import BinPolicy, decide
from edge_agent.client import BACKING_OFF, ENCODE_FAILED, TIMEOUT, AgentClient
from edge_agent.daemon.config import ConfigError, load_config
from edge_agent.errors import ExportError
from edge_agent.package import rules
from edge_agent.package.manifest import MANIFEST_FILE, OUTLIER_FILE, SAMPLE_ROWS_FILE, SIGNATURE_FILE, YIELD_INT8_FILE
from edge_agent.package.registry import PackageRef, Registry
from edge_agent.package.runtime import YIELD_PREFIX, combined_graph, make_session
from edge_agent.daemon.pat import DynamicPat, PatBreak, nan_quartiles
from edge_agent.processes import free_tcp_endpoint, start_agent, stop
from edge_agent.daemon.scoring import SMOKE_SLACK, ModelRefused, load_package
from edge_agent.daemon.stages import STAGES
from edge_agent.daemon.touchdowns import LEAD_S, MAX_GAP_S, TouchdownClock
from edge_agent.wire.score import Code, Part
from trainer.package import build_package
from trainer.replay import feature_columns, stream_lot
from trainer.table import ParametricTable
from conftest import synth_lot, train

REPO = Path(__file__).resolve().parents[1]
REPLY_S = 10.0          # generous: a reply that does not come at all fails the test, a slow one does not
OUTCOME_WAIT_S = 60.0   # bound on waiting for a background reload to finish


def security_table(keys, control_endpoint: str, folder: Path) -> str:
    """``[security]`` of an agent that trusts the test trainer key and takes control messages from the ``control``
    key (its own CURVE key: ``agent-a``)."""
    return (f'[security]\ntrusted_keys = "{keys.trusted}"\nkey = "{keys.secret("agent-a")}"\n'
            f'control_bind = "{control_endpoint}"\ncontrol_keys = "{keys.allow(folder / "control-keys", "control")}"\n')


def control_client(keys, endpoint: str) -> AgentClient:
    """The operator's client of an agent's control socket (``security_table``)."""
    return AgentClient(endpoint, timeout_ms=REPLY_S * 1000, curve=keys.client("control", "agent-a"))


@pytest.fixture(scope="module")
def agent(packages, tmp_path_factory):
    """One agent for the read-mostly tests: small message cap and batch limit, Prometheus on a free port, a control
    socket."""
    folder = tmp_path_factory.mktemp("agent")
    metrics_port = int(free_tcp_endpoint().rsplit(":", 1)[1])
    control = free_tcp_endpoint()
    config = folder / "agent.toml"
    config.write_text(f"""
[agent]
max_message_bytes = 65536
transport_max_message_bytes = 1048576
max_batch = 50
[metrics]
port = {metrics_port}
{security_table(packages.keys, control, folder)}
""")
    endpoint = free_tcp_endpoint()
    process = start_agent(packages.root, packages.model, endpoint, "--config", str(config), "--metrics-port",
                          str(metrics_port), "--log-format", "json", log_path=folder / "agent.log")
    yield {"endpoint": endpoint, "control": control, "config": config, "metrics_port": metrics_port,
           "log": folder / "agent.log"}
    assert stop(process) == 0


class Raw:
    """A bare DEALER socket, for requests the client library would never send."""

    def __init__(self, endpoint: str):
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)

    def send(self, message) -> None:
        frames = message if isinstance(message, list) else [message]
        self.socket.send_multipart([f if isinstance(f, bytes) else msgpack.packb(f) for f in frames])

    def receive(self) -> dict | None:
        if not self.socket.poll(int(REPLY_S * 1000)):
            return None
        return msgpack.unpackb(self.socket.recv(), raw=False)

    def ask(self, message) -> dict:
        self.send(message)
        reply = self.receive()
        assert reply is not None, f"no reply to {str(message)[:200]}"
        return reply

    def close(self) -> None:
        self.socket.close()


def score_request(rid, readings, **extra) -> dict:
    return {"v": 1, "type": "score", "id": rid, "readings": readings, **extra}


def decision(result) -> dict:
    """What decides a part, without the fields that differ between calls (ids, timings)."""
    fields = dataclasses.asdict(result)
    for key in ("request_id", "agent_us", "round_trip_us"):
        fields.pop(key)
    return fields


def wait_for(condition, what: str, timeout_s: float = OUTCOME_WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ---- scoring ---------------------------------------------------------------------------------------------------

def test_scores_equal_offline_onnxruntime_and_scikit_learn(agent, packages):
    rows = packages.stream[:120].copy()
    rows[3, [0, 5]] = np.nan                  # tests not run: imputed inside the graphs
    rows[4, :] = np.nan                       # no readings at all: no scores (tests/test_coverage.py)
    checksum = Registry(packages.root).checksum(PackageRef(packages.model, "1"))
    with AgentClient(agent["endpoint"], timeout_ms=REPLY_S * 1000) as client:
        results = [client.score(row, {"lot": "offline", "site": 3}) for row in rows]
    assert all(r.decided for r in results), [r.error_message for r in results if not r.decided][:3]
    empty = results.pop(4)
    assert empty.insufficient_readings and empty.outlier_score is None and empty.pass_probability is None
    rows = np.delete(rows, 4, axis=0)
    score, probability = packages.offline("1", rows)
    got_score = np.array([r.outlier_score for r in results])
    got_probability = np.array([r.pass_probability for r in results])
    np.testing.assert_allclose(got_score, score, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_probability, probability, rtol=0, atol=1e-6)

    trained = packages.trained["1"]
    sk_score = trained.outlier.decision_function(rows.astype(np.float64))
    sk_probability = trained.yield_model.predict_proba(rows.astype(np.float64))[:, 1]
    np.testing.assert_allclose(got_score, sk_score, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got_probability, sk_probability, rtol=0, atol=1e-5)

    for r, s in zip(results, sk_score):
        assert r.model == {"name": packages.model, "version": "1", "checksum": checksum}
        assert r.outlier == (r.outlier_score < trained.outlier_threshold)
        assert r.predicted_fail == (r.pass_probability < trained.yield_threshold)
        assert r.agent_us > 0
        assert (r.bin_name == "pass") == (not r.flags)   # default policy: every condition may decide
    assert sum(r.outlier for r in results) < len(results)   # the stream is the same product, mostly normal


def test_readings_as_array_map_and_binary_agree(agent, packages):
    manifest = packages.manifest("1")
    columns = manifest.columns
    names = [f.name for f in manifest.features]
    row = packages.stream[7].astype(np.float64)
    row[2] = np.nan
    raw = Raw(agent["endpoint"])
    try:
        forms = {
            "array": row.tolist(),
            "binary": row.astype("<f4").tobytes(),
            "map by column": {c: v for c, v in zip(columns, row.tolist())},
            # By name where the name is unique (the tests of a multi-pin test share one), else by column.
            "map by name, test not run left out": {n if names.count(n) == 1 else c: v for i, (c, n, v)
                                                   in enumerate(zip(columns, names, row.tolist())) if i != 2},
        }
        replies = {form: raw.ask(score_request(i, readings)) for i, (form, readings) in enumerate(forms.items())}
    finally:
        raw.close()
    expected = packages.offline("1", row[None, :])
    for form, reply in replies.items():
        assert reply["type"] == "score_result", (form, reply)
        assert reply["outlier_score"] == pytest.approx(float(expected[0][0]), abs=1e-6), form
        assert reply["pass_probability"] == pytest.approx(float(expected[1][0]), abs=1e-6), form
    assert len({r["outlier_score"] for r in replies.values()}) == 1


def test_batch_equals_the_same_parts_one_by_one(agent, packages):
    """Singles on lot S and the batch on lot B of the same site: each starts that site's dynamic PAT window
    afresh, so both see the same PAT state; a far-off part before and after the warm-up shows it acts."""
    rows = packages.stream[200:245].copy()   # the agent here takes batches of up to 50
    manifest = packages.manifest("1")
    limit = manifest.pat.limits[4]
    for i in (5, 40):
        rows[i, 4] = limit.median + 10 * limit.robust_sigma
    with AgentClient(agent["endpoint"], timeout_ms=REPLY_S * 1000) as client:
        singles = [client.score(row, {"lot": "S", "site": 7, "x": i}) for i, row in enumerate(rows)]
        batch = client.score_batch([({"lot": "B", "site": 7, "x": i}, row) for i, row in enumerate(rows)])
        mixed = client.score_batch([(None, rows[0]), (None, rows[0][:3]), (None, rows[1])])
    assert all(r.decided for r in singles + batch)
    assert [decision(r) for r in batch] == [decision(r) for r in singles]
    assert "dynamic_pat" not in singles[5].flags and "static_pat" in singles[5].flags   # still warming up
    assert {"static_pat", "dynamic_pat"} <= set(singles[40].flags)
    assert any(b["kind"] == "dynamic" and b["test"] == limit.column for b in singles[40].pat)
    assert singles[40].bin_name == "static_pat" and "static PAT" in singles[40].why
    # One bad part in a batch gets its own error; the others are scored.
    assert [r.decided for r in mixed] == [True, False, True]
    assert mixed[1].error_code == Code.WRONG_READING_COUNT
    assert mixed[0].outlier_score == singles[0].outlier_score


def test_a_touchdown_sent_at_once_is_scored_ahead_and_each_site_answered_in_order(agent, packages):
    """16 sites sent back to back behind a batch that keeps the agent busy, with a malformed request and a health
    request among them: the waiting score requests have their graphs run in an earlier one's call
    (``parts_scored_ahead``), and each still gets its own reply, in order, with the scores of its part alone. The
    touchdown is sent again until some parts were scored ahead (a loaded machine may deliver it late)."""
    rows = packages.stream[300:316]
    expected_score, expected_probability = packages.offline("1", rows)
    busy = [{"readings": row.tobytes()} for row in packages.stream[:50]]
    raw = Raw(agent["endpoint"])
    try:
        start = raw.ask({"v": 1, "type": "health", "id": "start"})["parts_scored_ahead"]
        for attempt in range(5):
            raw.send({"v": 1, "type": "score_batch", "id": "busy", "parts": busy})
            sent = []
            for site, row in enumerate(rows, 1):
                if site == 5:
                    raw.send(score_request("short", row[:3].tobytes()))
                    sent.append("short")
                if site == 9:
                    raw.send({"v": 1, "type": "health", "id": "between"})
                    sent.append("between")
                raw.send(score_request(site, row.tobytes(), part={"lot": "TD", "site": site}))
                sent.append(site)
            replies = [raw.receive() for _ in range(len(sent) + 1)]
            assert all(replies), "a request of the touchdown got no reply"
            assert [r["id"] for r in replies] == ["busy", *sent]
            by_id = {r["id"]: r for r in replies}
            assert by_id["short"]["code"] == Code.WRONG_READING_COUNT
            assert by_id["between"]["type"] == "health_result"
            scored = [by_id[site] for site in range(1, 17)]
            assert all(r["type"] == "score_result" for r in scored)
            np.testing.assert_allclose([r["outlier_score"] for r in scored], expected_score, rtol=0, atol=1e-6)
            np.testing.assert_allclose([r["pass_probability"] for r in scored], expected_probability, rtol=0,
                                       atol=1e-6)
            ahead = raw.ask({"v": 1, "type": "health", "id": attempt})["parts_scored_ahead"] - start
            if ahead:
                break
    finally:
        raw.close()
    assert 0 < ahead <= 15 * (attempt + 1)   # the first site of a touchdown is scored in its own turn


# ---- bad input --------------------------------------------------------------------------------------------------

def _bad_requests(row: list[float], columns: list[str], names: list[str]) -> list[tuple[str, object, str, str]]:
    """(what, request frames, expected code, a word the message must contain)."""
    unique = next(i for i, name in enumerate(names) if names.count(name) == 1)   # a test known by its name
    inf_row, huge_row = list(row), list(row)
    inf_row[3], huge_row[4] = float("inf"), 1e39
    return [
        ("not msgpack", b"\xc1\x00garbage", Code.MALFORMED_MESSAGE, "msgpack"),
        ("truncated msgpack", msgpack.packb(score_request(1, row))[:-7], Code.MALFORMED_MESSAGE, "msgpack"),
        ("array at top level", msgpack.packb([1, 2, 3]), Code.MALFORMED_MESSAGE, "map"),
        ("two payload frames", [b"x", b"y", b"z"], Code.MALFORMED_MESSAGE, "frame"),
        ("unknown type", {"v": 1, "type": "predict", "id": 1}, Code.UNKNOWN_TYPE, "predict"),
        ("protocol version 2", {"v": 2, "type": "score", "id": 1, "readings": row}, Code.UNSUPPORTED_VERSION, "2"),
        ("no type", {"v": 1, "id": 1}, Code.MISSING_FIELD, "type"),
        ("type not a string", {"v": 1, "type": ["score"], "id": 1}, Code.WRONG_TYPE, "type"),
        ("id a float", score_request(1.5, row), Code.WRONG_TYPE, "id"),
        ("unknown field", score_request(1, row, reading=row), Code.UNKNOWN_FIELD, "reading"),
        ("readings a string", score_request(1, "1.0,2.0"), Code.WRONG_TYPE, "readings"),
        ("a reading a string", score_request(1, row[:2] + ["x"] + row[3:]), Code.WRONG_TYPE, "readings[2]"),
        ("a reading true", score_request(1, [True] + row[1:]), Code.WRONG_TYPE, "readings[0]"),
        ("no readings", {"v": 1, "type": "score", "id": 1}, Code.MISSING_FIELD, "readings"),
        ("too few readings", score_request(1, row[:-1]), Code.WRONG_READING_COUNT, f"{len(row) - 1}"),
        ("too many readings", score_request(1, row + [1.0]), Code.WRONG_READING_COUNT, f"{len(row) + 1}"),
        ("binary readings of the wrong size", score_request(1, b"\x00" * 12), Code.WRONG_READING_COUNT, "12 bytes"),
        ("unknown test name", score_request(1, {columns[0]: 1.0, "NO_SUCH_TEST": 2.0}), Code.UNKNOWN_TEST,
         "NO_SUCH_TEST"),
        ("a test twice", score_request(1, {columns[unique]: 1.0, names[unique]: 1.0}), Code.DUPLICATE_TEST,
         names[unique]),
        ("infinity", score_request(1, inf_row), Code.NON_FINITE_READING, columns[3]),
        ("beyond float32", score_request(1, huge_row), Code.NON_FINITE_READING, columns[4]),
        ("part not a map", score_request(1, row, part="L1-3-10-4"), Code.WRONG_TYPE, "part"),
        ("part site a string", score_request(1, row, part={"site": "2"}), Code.WRONG_TYPE, "part.site"),
        ("part unknown field", score_request(1, row, part={"socket": 2}), Code.UNKNOWN_FIELD, "socket"),
        ("part head beyond STDF U1", score_request(1, row, part={"head": 2 ** 64 - 1}), Code.FIELD_OUT_OF_RANGE,
         "0..255"),
        ("map keys as binary", msgpack.packb({b"v": 1, b"type": b"score", b"id": 1}, use_bin_type=True),
         Code.MALFORMED_MESSAGE, "not a string"),
        ("nested a thousand levels", b"\x83\xa1v\x01\xa4type\xa5score\xa2id" + b"\x91" * 1000 + b"\x01",
         Code.WRONG_TYPE, "id"),
        ("deadline passed", score_request(1, row, deadline=1.0), Code.DEADLINE_EXCEEDED, "deadline"),
        ("oversized message", score_request(1, row, part={"lot": "L" * 70000}), Code.MESSAGE_TOO_LARGE,
         "max_message_bytes"),
        ("batch too large", {"v": 1, "type": "score_batch", "id": 1, "parts": [{"readings": row}] * 51},
         Code.BATCH_TOO_LARGE, "51"),
        ("batch parts not an array", {"v": 1, "type": "score_batch", "id": 1, "parts": {"readings": row}},
         Code.WRONG_TYPE, "parts"),
        ("reload on the score socket", {"v": 1, "type": "reload", "id": 1, "version": "2"}, Code.NOT_AUTHORIZED,
         "control socket"),
        ("rollback on the score socket", {"v": 1, "type": "rollback", "id": 1}, Code.NOT_AUTHORIZED, "control socket"),
    ]


def test_each_bad_input_gets_its_error_code_and_the_next_request_is_answered(agent, packages):
    good_row = packages.stream[11]
    expected_score = float(packages.offline("1", good_row[None, :])[0][0])
    manifest = packages.manifest("1")
    cases = _bad_requests(good_row.astype(np.float64).tolist(), manifest.columns, [f.name for f in manifest.features])
    raw = Raw(agent["endpoint"])
    try:
        before = raw.ask({"v": 1, "type": "health", "id": "before"})
        for n, (what, request, code, word) in enumerate(cases):
            reply = raw.ask(request)
            assert reply["type"] == "error", what
            assert reply["code"] == code, (what, reply)
            assert word in reply["message"], (what, reply["message"])
            good = raw.ask(score_request(f"good-{n}", good_row.tobytes()))
            assert good["type"] == "score_result" and good["id"] == f"good-{n}", what
            assert good["outlier_score"] == pytest.approx(expected_score, abs=1e-6), what
        # NaN is a test that did not run, not an error.
        nan_reply = raw.ask(score_request("nan", [float("nan")] * packages.n_tests))
        assert nan_reply["type"] == "score_result"
        after = raw.ask({"v": 1, "type": "health", "id": "after"})
    finally:
        raw.close()
    assert before["id"] == "before" and after["id"] == "after"
    expected_counts: dict[str, int] = {}
    for _, _, code, _ in cases:
        expected_counts[code] = expected_counts.get(code, 0) + 1
    for code, count in expected_counts.items():
        assert after["errors"].get(code, 0) - before["errors"].get(code, 0) == count, code
    assert after["parts_scored"] - before["parts_scored"] == len(cases) + 1


def test_a_message_beyond_the_transport_cap_costs_only_its_sender(agent, packages):
    """ZeroMQ drops a connection that sends more than transport_max_message_bytes; the agent serves on."""
    row = packages.stream[12]
    flooder = Raw(agent["endpoint"])
    flooder.send(b"\x00" * (2 << 20))
    with AgentClient(agent["endpoint"], timeout_ms=REPLY_S * 1000) as client:
        assert client.score(row).decided
    flooder.close()


def test_health_and_prometheus_endpoint(agent, packages):
    with AgentClient(agent["endpoint"], timeout_ms=REPLY_S * 1000) as client:
        for row in packages.stream[:10]:
            assert client.score(row).decided
        health = client.health(timeout_ms=REPLY_S * 1000)
    assert health["status"] == "serving"
    assert health["model"]["version"] == "1" and health["model"]["features"] == packages.n_tests
    assert health["model"]["checksum"] == Registry(packages.root).checksum(PackageRef(packages.model, "1"))
    assert health["parts_scored"] >= 10 and health["requests"]["score"] >= 10
    latency = health["latency_us"]
    assert latency["count"] >= 10 and 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert health["uptime_s"] > 0 and health["following"]["stage"] == "production"

    text = urllib.request.urlopen(f"http://127.0.0.1:{agent['metrics_port']}/metrics", timeout=REPLY_S).read().decode()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples["edge_agent_parts_scored_total"] >= health["parts_scored"]
    info = f'edge_agent_model_info{{checksum="{health["model"]["checksum"]}",name="{packages.model}",version="1"}}'
    assert samples[info] == 1
    assert samples['edge_agent_request_seconds_bucket{le="+Inf"}'] >= latency["count"]
    assert samples['edge_agent_requests_total{type="score"}'] >= 10

    entries = [json.loads(line) for line in agent["log"].read_text().splitlines() if line.startswith("{")]
    assert any(e["logger"] == "edge_agent.daemon.server" and e["message"].startswith(f"serving {packages.model}/1")
               for e in entries)
    assert {"time", "level", "logger", "message", "pid"} <= set(entries[0])


def test_sampled_stages_cover_the_score_path_and_an_idle_agent_rehearses_without_a_trace(packages, tmp_path):
    endpoint = free_tcp_endpoint()
    process = start_agent(packages.root, packages.model, endpoint, "--stage-sample-every", "1", "--keep-warm-ms",
                          "1", *packages.keys.trust_args, log_path=tmp_path / "agent.log")
    try:
        with AgentClient(endpoint, timeout_ms=REPLY_S * 1000) as client:
            taken = client.health(timeout_ms=REPLY_S * 1000)["stages"]["taken"]
            assert all(client.score(row).decided for row in packages.stream[:9])
            assert all(r.decided for r in client.score_batch([(None, row) for row in packages.stream[9:12]]))
            time.sleep(0.3)   # idle: about 300 rehearsals of the last score request at 1 ms
            health = client.health(timeout_ms=REPLY_S * 1000, stages_since=taken)
            later = client.health(timeout_ms=REPLY_S * 1000, stages_since=health["stages"]["taken"])
        raw = Raw(endpoint)
        refused = raw.ask({"v": 1, "type": "health", "id": 1, "stages_since": "all"})
        raw.close()
    finally:
        assert stop(process) == 0
    stages = health["stages"]
    # Single score requests are sampled (every one here); the batch and the health requests are not.
    assert stages["every"] == 1 and stages["taken"] == taken + 9 and stages["samples"] == 9
    assert list(stages["by_stage"]) == list(STAGES)
    for stage, summary in stages["by_stage"].items():
        assert 0 <= summary["p50_us"] <= summary["p99_us"] <= summary["max_us"], stage
    for stage in ("decode", "validate", "graphs", "pat", "drift", "bin", "audit", "encode", "send"):
        assert stages["by_stage"][stage]["p50_us"] > 0, stage   # audit: on with drift shipping
    assert later["stages"]["samples"] == 0 and later["stages"]["by_stage"] == {}
    assert refused["type"] == "error" and refused["code"] == Code.WRONG_TYPE and "stages_since" in refused["message"]
    # The rehearsals left no trace: every count is of the 12 parts sent, the site's PAT window holds those 12.
    assert health["parts_scored"] == 12 and sum(health["bins"].values()) == 12
    assert health["requests"]["score"] == 9 and health["requests"]["score_batch"] == 1
    assert health["dynamic_pat"]["sites"]["1/1"]["parts"] == 12
    assert health["drift"]["open_window_parts"] + health["drift"]["queued_parts"] == 12   # queued: between parts
    audit = health["lifecycle"]["audit"]
    assert audit["recorded"] + audit["open_batch"] == 12


def test_a_req_socket_is_served_too(agent):
    req = zmq.Context.instance().socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(agent["endpoint"])
    try:
        req.send(msgpack.packb({"v": 1, "type": "health", "id": "req"}))
        assert req.poll(int(REPLY_S * 1000))
        reply = msgpack.unpackb(req.recv())
    finally:
        req.close()
    assert reply["type"] == "health_result" and reply["id"] == "req"


def test_cli_health_and_reload_talk_to_a_running_agent(agent, packages):
    health = subprocess.run([sys.executable, "-m", "edge_agent.daemon.cli", "health", "--connect", agent["endpoint"]],
                            capture_output=True, text=True, timeout=60)
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["status"] == "serving"
    keys = packages.keys
    reload = subprocess.run([sys.executable, "-m", "edge_agent.daemon.cli", "reload", "--config", str(agent["config"]),
                             "--key", str(keys.secret("control"))], capture_output=True, text=True, timeout=120)
    assert reload.returncode == 0, reload.stderr
    outcome = json.loads(reload.stdout)["last_reload"]
    assert outcome["outcome"] == "unchanged" and outcome["ref"] == f"{packages.model}/1"   # verified again, same one
    without_key = subprocess.run([sys.executable, "-m", "edge_agent.daemon.cli", "rollback", "--config",
                                  str(agent["config"])], capture_output=True, text=True, timeout=60)
    assert without_key.returncode == 2 and "--key" in without_key.stderr
    with control_client(keys, agent["control"]) as client:
        unknown = client.reload("99")
    assert (unknown["type"], unknown["code"]) == ("error", Code.UNKNOWN_VERSION) and "99" in unknown["message"]


def test_demo_streams_a_lot_and_summarises_it(agent, packages):
    full = packages.lot(14, 80, "DEMO")
    columns = feature_columns(str(packages.root), packages.model)
    dropped = columns[-1]   # a test this lot did not run
    table = ParametricTable(full.frame.drop(columns=[dropped]), [t for t in full.tests if t.column != dropped])
    with AgentClient(agent["endpoint"], timeout_ms=REPLY_S * 1000) as client:
        summary = stream_lot(client, table, columns)
    assert summary["parts"] == summary["decided"] == 80 and summary["no_decision"] == {}
    assert summary["tests_missing_from_table"] == [dropped]
    assert sum(summary["bins"].values()) == 80 and summary["model_versions"] == {"1": 80}
    ml_flags = summary["flags"].get("ml_outlier", 0)
    assert ml_flags == summary["pat_and_ml_outlier"] + len(summary["ml_outlier_only"])
    scores = [p["outlier_score"] for p in summary["most_anomalous"]]
    assert scores == sorted(scores) and summary["most_anomalous"][0]["lot"] == "DEMO0001"
    assert 0 < summary["round_trip_us"]["p50"] <= summary["round_trip_us"]["p99"]


def test_client_turns_unusable_readings_into_a_counted_no_decision(agent, packages):
    row = packages.stream[21].astype(np.float64)
    with AgentClient(agent["endpoint"], timeout_ms=REPLY_S * 1000) as client:
        letters = client.score(["x"] * packages.n_tests)
        short = client.score(row[:5])
        not_run = client.score([None] + row[1:].tolist())
    assert (letters.decided, letters.error_code) == (False, ENCODE_FAILED)
    assert (short.decided, short.error_code) == (False, Code.WRONG_READING_COUNT)
    assert "5 readings" in short.error_message or "20 bytes" in short.error_message
    with_nan = row.copy()
    with_nan[0] = np.nan
    assert not_run.decided
    assert not_run.outlier_score == pytest.approx(float(packages.offline("1", with_nan[None, :])[0][0]), abs=1e-6)
    assert client.no_decision == {ENCODE_FAILED: 1, Code.WRONG_READING_COUNT: 1} and client.decided == 1


# ---- hot reload -------------------------------------------------------------------------------------------------

def test_hot_reload_under_a_steady_stream_loses_no_request(packages, tmp_path):
    root = packages.copy(tmp_path / "models")
    endpoint, control = free_tcp_endpoint(), free_tcp_endpoint()
    config = tmp_path / "agent.toml"
    config.write_text(security_table(packages.keys, control, tmp_path))
    process = start_agent(root, packages.model, endpoint, "--watch-interval-s", "0.2", "--config", str(config),
                          log_path=tmp_path / "agent.log")
    rows = packages.stream
    streams: dict[int, list] = {k: [] for k in range(3)}
    finished = threading.Event()

    def stream(k: int) -> None:
        with AgentClient(endpoint, timeout_ms=REPLY_S * 1000) as client:
            i = 0
            while not finished.is_set() and i < 50_000:
                streams[k].append((i, client.score(rows[i % len(rows)], {"lot": "L", "site": k + 1})))
                i += 1

    threads = [threading.Thread(target=stream, args=(k,)) for k in streams]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: all(len(s) >= 30 for s in streams.values()), "the streams to start")
        Registry(root).promote(packages.model, "2", "production", "test: hot reload under load")
        wait_for(lambda: all(sum(r.decided and r.model["version"] == "2" for _, r in s[-30:]) == 30
                             for s in streams.values()), "every stream to see version 2")
    finally:
        finished.set()
        for thread in threads:
            thread.join()
    for k, results in streams.items():
        assert all(r.decided for _, r in results), f"stream {k} lost a request"
        assert [r.request_id for _, r in results] == list(range(1, len(results) + 1))   # in order, none missing
        versions = [r.model["version"] for _, r in results]
        switch = versions.index("2")
        assert set(versions[:switch]) == {"1"} and set(versions[switch:]) == {"2"}, f"stream {k} went back"
        for version in ("1", "2"):
            scored = [(i, r) for i, r in results if r.model["version"] == version]
            expected, _ = packages.offline(version, rows[[i % len(rows) for i, _ in scored]])
            np.testing.assert_allclose([r.outlier_score for _, r in scored], expected, rtol=0, atol=1e-6)

    with AgentClient(endpoint, timeout_ms=REPLY_S * 1000) as client:
        health = client.health()
        assert health["reloads"] == {"loaded": 1}
        assert health["model"]["version"] == "2" and health["previous_model"]["version"] == "1"
        assert health["last_reload"]["outcome"] == "loaded"
        with control_client(packages.keys, control) as operator:
            rollback = operator.rollback()
        assert rollback["type"] == "rollback_result" and rollback["model"]["version"] == "1"
        after = client.score(rows[0])
        assert after.decided and after.model["version"] == "1"
        assert after.outlier_score == pytest.approx(float(packages.offline("1", rows[:1])[0][0]), abs=1e-6)
    assert stop(process) == 0


def test_packages_that_fail_verification_are_refused_and_the_old_model_keeps_serving(packages, tmp_path):
    root = packages.copy(tmp_path / "models")
    registry = Registry(root)
    # Version 3: every checksum right, but its sample rows expect other scores than its graphs give.
    source = registry.package_dir(PackageRef(packages.model, "1"))
    files = {p.name: p.read_bytes() for p in source.iterdir() if p.name not in (MANIFEST_FILE, SIGNATURE_FILE)}
    with np.load(io.BytesIO(files[SAMPLE_ROWS_FILE])) as sample:
        arrays = dict(sample)
    arrays["score"] = arrays["score"] + 0.05
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    files[SAMPLE_ROWS_FILE] = buffer.getvalue()
    ref3 = registry.publish(packages.model, files, registry.manifest(PackageRef(packages.model, "1")),
                            reason="test: sample rows that disagree with the graphs", signer=packages.keys.signer)
    endpoint, control = free_tcp_endpoint(), free_tcp_endpoint()
    config = tmp_path / "agent.toml"
    config.write_text(security_table(packages.keys, control, tmp_path))
    process = start_agent(root, packages.model, endpoint, "--watch-interval-s", "0.2", "--config", str(config),
                          log_path=tmp_path / "agent.log")
    row = packages.stream[:1]
    expected = float(packages.offline("1", row)[0][0])
    try:
        with AgentClient(endpoint, timeout_ms=REPLY_S * 1000) as client:
            registry.promote(packages.model, ref3.version, "production", "test: the stage moves to a bad package")
            first = wait_for(lambda: client.health()["last_reload"], "the stage reload's outcome")
            assert first["outcome"] == "refused" and first["ref"] == f"{packages.model}/{ref3.version}"
            assert any("smoke score" in p for p in first["problems"]), first["problems"]

            # Version 2 corrupted on disk after it was published: one byte of its outlier graph flipped.
            folder = registry.package_dir(PackageRef(packages.model, "2"))
            os.chmod(folder, 0o755)
            graph = folder / OUTLIER_FILE
            os.chmod(graph, stat.S_IRUSR | stat.S_IWUSR)
            data = bytearray(graph.read_bytes())
            data[len(data) // 2] ^= 0xFF
            graph.write_bytes(bytes(data))
            with control_client(packages.keys, control) as operator:
                assert operator.reload("2")["accepted"] is True
            second = wait_for(lambda: (h := client.health())["last_reload"]["number"] == 2 and h["last_reload"],
                              "the reload request's outcome")
            assert second["outcome"] == "refused" and any("checksum mismatch" in p for p in second["problems"])

            health = client.health()
            assert health["reloads"] == {"refused": 2}
            assert health["model"]["version"] == "1" and health["previous_model"] is None
            result = client.score(row[0])
            assert result.decided and result.model["version"] == "1"
            assert result.outlier_score == pytest.approx(expected, abs=1e-6)
    finally:
        assert stop(process) == 0
    log = (tmp_path / "agent.log").read_text()
    assert "reload refused" in log and "checksum mismatch" in log


def test_an_int8_graph_that_breaks_its_recorded_fidelity_on_this_cpu_is_refused_and_the_old_model_keeps_serving(
        tmp_path, keys):
    """int8 scores come from the serving CPU's integer kernels, so the load-time smoke score on this CPU must stay
    within the difference the exporter recorded. Version 2 is version 1's package (an MLP with an int8 variant)
    with the recorded int8 difference halved, as if exported on a CPU whose int8 came closer to scikit-learn."""
    registry, name = Registry(tmp_path / "models"), "mlp"
    table = synth_lot(11, 1500, 12)
    files, manifest = build_package(train(table, name, n_trees=20, yield_trees=10, seed=11, yield_model="mlp"),
                                    table, {}, [])
    assert manifest.models.yield_model.files.get("int8") == YIELD_INT8_FILE, manifest.models.yield_model
    good = registry.publish(name, files, manifest, reason="test: an MLP with an int8 variant", signer=keys.signer)
    # The small MLP is at chance on this lot (the quality gate holds it back): promoted by force for its int8 graph.
    registry.promote(name, good.version, "production", "test fixture", force=True)
    loaded = load_package(registry, good, yield_variant="int8")
    here = loaded.smoke["pass_probability"]["max_abs_diff"]
    # The export gate and the smoke score agree, and int8 really moved the scores (else nothing is tested).
    assert 1e-4 < here <= manifest.fidelity["yield.int8"].max_abs_diff + SMOKE_SLACK

    fidelity = {**manifest.fidelity, "yield.int8": dataclasses.replace(manifest.fidelity["yield.int8"],
                                                                       max_abs_diff=here / 2)}
    tight = registry.publish(name, files, dataclasses.replace(manifest, fidelity=fidelity),
                             reason="test: int8 fidelity tighter than this CPU gives", signer=keys.signer)
    with pytest.raises(ModelRefused) as refused:
        load_package(registry, tight, yield_variant="int8")
    assert refused.value.problems == [
        f"smoke score: yield.int8 ({YIELD_INT8_FILE}) on this CPU: pass_probability of the "
        f"{loaded.smoke['pass_probability']['rows']} sample rows differs from the expected values by up to "
        f"{here:.3g}, more than fidelity.yield.int8.max_abs_diff {here / 2:.3g} recorded in the manifest allows "
        f"(+ {SMOKE_SLACK:g})"]
    assert load_package(registry, tight).yield_variant == "float32"   # its float32 graph is still fine

    row = synth_lot(13, 40, 12, lot_prefix="L9").readings()[:1].astype(np.float32)
    _, expected_probability = loaded.score(row)
    endpoint = free_tcp_endpoint()
    process = start_agent(registry.root, name, endpoint, "--yield-variant", "int8", "--watch-interval-s", "0.2",
                          *keys.trust_args, log_path=tmp_path / "agent.log")
    try:
        with AgentClient(endpoint, timeout_ms=REPLY_S * 1000) as client:
            registry.promote(name, tight.version, "production", "test: the stage moves to the tight package",
                             force=True)
            outcome = wait_for(lambda: client.health()["last_reload"], "the stage reload's outcome")
            assert outcome["outcome"] == "refused" and outcome["problems"] == refused.value.problems
            health = client.health()
            assert health["model"]["version"] == good.version and health["model"]["yield_variant"] == "int8"
            result = client.score(row[0])
            assert result.decided and result.model["version"] == good.version
            assert result.pass_probability == pytest.approx(float(expected_probability[0]), abs=1e-6)
    finally:
        assert stop(process) == 0


# ---- the client fails open, SIGTERM drains -----------------------------------------------------------------------

def test_client_fails_open_while_the_agent_is_gone_and_recovers_when_it_returns(packages, tmp_path):
    endpoint = free_tcp_endpoint()
    log = tmp_path / "agent.log"
    row = packages.stream[0]
    process = start_agent(packages.root, packages.model, endpoint, *packages.keys.trust_args, log_path=log)
    client = AgentClient(endpoint, timeout_ms=300, failures_before_backoff=2, backoff_s=0.5)
    try:
        # A first reply slower than the short timeout (a busy machine) is not what this test is about.
        wait_for(lambda: client.score(row).decided, "a first decision")
        decided, undecided = client.decided, sum(client.no_decision.values())
        assert stop(process) == 0
        gone = [client.score(row) for _ in range(4)]   # must return, not raise or hang
        assert [r.decided for r in gone] == [False] * 4
        assert {r.error_code for r in gone} <= {TIMEOUT, BACKING_OFF}
        assert sum(r.error_code == TIMEOUT for r in gone) >= 2
        assert sum(client.no_decision.values()) == undecided + 4 and client.decided == decided

        process = start_agent(packages.root, packages.model, endpoint, *packages.keys.trust_args, log_path=log)
        back = wait_for(lambda: (r := client.score(row)).decided and r, "the client to reconnect")
        assert back.outlier_score == pytest.approx(float(packages.offline("1", row[None, :])[0][0]), abs=1e-6)
        assert client.decided == decided + 1
    finally:
        client.close()
        assert stop(process) == 0


def test_sigterm_answers_every_request_already_sent(packages, tmp_path):
    endpoint = free_tcp_endpoint()
    log = tmp_path / "agent.log"
    process = start_agent(packages.root, packages.model, endpoint, *packages.keys.trust_args, log_path=log)
    raw = Raw(endpoint)
    try:
        n = 300
        for i in range(n):
            raw.send(score_request(i, packages.stream[i % len(packages.stream)].tobytes()))
        process.send_signal(signal.SIGTERM)
        replies = []
        while len(replies) < n and (reply := raw.receive()) is not None:
            replies.append(reply)
    finally:
        raw.close()
        status = stop(process)
    assert status == 0
    assert [r["type"] for r in replies] == ["score_result"] * n
    assert [r["id"] for r in replies] == list(range(n))
    assert "stopped after" in log.read_text()


def test_cli_refuses_unusable_configuration(packages, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "edge_agent.daemon.cli", "run", "--registry", str(packages.root),
                               "--metrics-port", "0", *args], capture_output=True, text=True, timeout=120)

    everywhere = run("--model", packages.model, "--bind", "tcp://0.0.0.0:5555")
    assert everywhere.returncode == 2 and "listens on every network interface" in everywhere.stderr
    unknown = run("--model", "no-such-model", "--bind", free_tcp_endpoint(), *packages.keys.trust_args)
    assert unknown.returncode == 2 and "no-such-model" in unknown.stderr


def test_loaded_sessions_are_tuned_for_one_row_and_a_missing_variant_is_refused(packages):
    registry = Registry(packages.root)
    model = load_package(registry, PackageRef(packages.model, "1"))
    options = model._session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert model.smoke["score"]["rows"] > 0 and model.smoke["score"]["max_abs_diff"] <= model.smoke["score"]["allowed"]
    with pytest.raises(ModelRefused, match="int8"):
        load_package(registry, PackageRef(packages.model, "1"), yield_variant="int8")   # a forest has no int8 graph


@pytest.mark.parametrize("variant", ["float32", "int8"])
def test_the_combined_graph_gives_each_graphs_own_outputs_bit_for_bit_and_refuses_graphs_that_cannot_combine(
        unpublished, variant):
    """The agent runs a package's outlier and yield graphs as one (one onnxruntime call per part): on this CPU, the
    combined graph's two outputs are each graph's own, on complete rows, rows with missing readings and an empty
    row, for the float32 and the int8 yield graph."""
    files, manifest = unpublished.package(int8=True)
    outlier, yield_model, name = manifest.models.outlier, manifest.models.yield_model, manifest.input.name
    with np.load(io.BytesIO(files[SAMPLE_ROWS_FILE])) as sample:
        rows = np.asarray(sample["readings"], np.float32)
    rows = np.vstack([rows, np.where(np.arange(rows.shape[1]) % 3 == 0, np.nan, rows[:1]),
                      np.full((1, rows.shape[1]), np.nan)]).astype(np.float32)
    outlier_bytes, yield_bytes = files[outlier.files["float32"]], files[yield_model.files[variant]]
    combined = make_session(combined_graph(outlier_bytes, yield_bytes, name))
    score, probability = combined.run([outlier.output, YIELD_PREFIX + yield_model.output], {name: rows})
    assert np.array_equal(score, make_session(outlier_bytes).run([outlier.output], {name: rows})[0])
    assert np.array_equal(probability, make_session(yield_bytes).run([yield_model.output], {name: rows})[0])
    assert len(np.unique(probability)) > 1   # the outputs are not a constant that any graph would match

    other_opset = onnx.load_from_string(yield_bytes)
    other_opset.opset_import[0].version += 1
    with pytest.raises(ExportError, match="versions"):
        combined_graph(outlier_bytes, other_opset.SerializeToString(), name)
    with pytest.raises(ExportError, match="expected only 'x'"):
        combined_graph(outlier_bytes, yield_bytes, "x")


# ---- components ---------------------------------------------------------------------------------------------------

def test_the_touchdown_clock_plans_one_rehearsal_just_before_a_regular_testers_next_touchdown():
    clock = TouchdownClock()
    clock.arrived(10.0)
    assert clock.rehearse_in(10.1) is None        # one touchdown: no index time yet
    for site in range(16):                         # 16 sites sent at once: one touchdown
        clock.arrived(11.0 + site * 1e-5)
    assert clock.started == 11.0 and clock.gap == pytest.approx(1.0)
    assert clock.rehearse_in(11.5) == pytest.approx(0.5 - LEAD_S)
    assert clock.rehearse_in(12.0) < 0             # due until done
    clock.rehearsing(11.5)                         # a keep-warm rehearsal before it is due does not count
    assert clock.rehearse_in(12.0) < 0
    clock.rehearsing(12.0)
    assert clock.rehearse_in(12.0) is None         # once per touchdown
    for part in range(1, 1001):                    # then 1,000 parts/s: a stream with no pause is no touchdown
        clock.arrived(12.0 + part * 1e-3)
    assert clock.started == pytest.approx(12.001) and clock.rehearse_in(12.5) is not None
    clock.arrived(13.001 + MAX_GAP_S + 1)          # a stop longer than an index time: nothing planned
    assert clock.rehearse_in(13.001 + MAX_GAP_S + 1.5) is None


def test_client_library_needs_only_numpy_pyzmq_and_msgpack():
    code = ("import sys, edge_agent.client; "
            "print(sorted(m for m in ('onnxruntime', 'sklearn', 'trainer', 'pandas', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_nan_quartiles_match_numpy():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(57, 40)).astype(np.float32)
    values[rng.random(values.shape) < 0.2] = np.nan
    values[:, 3] = np.nan
    q1, median, q3, counts = nan_quartiles(values)
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        expected = np.nanpercentile(values, [25, 50, 75], axis=0)
    np.testing.assert_allclose(np.vstack([q1, median, q3]), expected, rtol=0, atol=1e-6, equal_nan=True)
    assert counts[3] == 0 and np.isnan(median[3])
    np.testing.assert_array_equal(counts, np.sum(~np.isnan(values), axis=0))


def test_dynamic_pat_warms_up_per_site_and_restarts_on_a_new_lot():
    columns = [f"T{i}" for i in range(3)]
    pat = DynamicPat(columns, window=50, min_parts=30, k_sigma=6.0, refresh_parts=5)
    rng = np.random.default_rng(1)
    far = np.array([0.0, 100.0, 0.0], np.float32)
    site1, site2 = Part(lot="A", site=1), Part(lot="A", site=2)
    for _ in range(29):
        assert pat.check_and_add(site1, rng.normal(size=3).astype(np.float32)) == []
    assert pat.check_and_add(site1, far) == []             # 30th part: still the baseline
    breaks = pat.check_and_add(site1, far)
    assert [(b.test, b.kind) for b in breaks] == [("T1", "dynamic")] and breaks[0].high < 100
    assert pat.check_and_add(site2, far) == []              # another site has its own window
    assert pat.check_and_add(Part(lot="B", site=1), far) == []   # a new lot starts site 1 afresh
    assert pat.sites()["1/1"] == {"parts": 1, "active": False, "group": "B"}


def test_dynamic_pat_sets_limits_on_the_log_scale_for_log_scale_tests():
    """Leakage-like readings (log-normal, sigma 1 in log): the linear rule's upper limit lies inside the
    ordinary tail, the log rule's does not, and a reading far above the population still breaks it."""
    rng = np.random.default_rng(3)
    baseline = rng.lognormal(0.0, 1.0, (100, 1)).astype(np.float32)
    fresh = rng.lognormal(0.0, 1.0, 20_000).astype(np.float32)
    flagged = {}
    for name, shape in (("linear", [rules.NORMAL]), ("log", [rules.LOGNORMAL])):
        pat = DynamicPat(["ILEAK"], window=100, min_parts=30, k_sigma=6.0, refresh_parts=1, shape=shape)
        for row in baseline:
            pat.check_and_add(Part(lot="A", site=1), row)
        while pat.refresh_due():   # the agent does them between parts
            pass
        state = pat._sites[(1, 1)]
        flagged[name] = float(np.mean((fresh < state.low[0]) | (fresh > state.high[0])))
        median = float(np.median(baseline))
        assert [b.test for b in pat.check_and_add(Part(lot="A", site=1), np.float32([median * 1e6]))] == ["ILEAK"]
    assert flagged["linear"] > 0.005      # about 2 % of ordinary parts: why the log scale exists
    assert flagged["log"] < 0.0005        # 6 robust sigma on the log scale: essentially none


def test_bin_policy_order_decides_and_every_condition_is_flagged():
    static = [PatBreak("T1", "static", 9.0, 0.0, 1.0)]
    kwargs = dict(static=static, dynamic=[], score=-0.3, score_threshold=-0.05, pass_probability=0.9,
                  pass_threshold=0.5)
    default = decide(BinPolicy(), **kwargs)
    assert (default.bin, default.name, default.flags) == (21, "static_pat", ["static_pat", "ml_outlier"])
    assert "T1=9" in default.why
    ml_first = decide(BinPolicy(order=("ml_outlier", "static_pat")), **kwargs)
    assert (ml_first.bin, ml_first.name) == (23, "ml_outlier") and "-0.3" in ml_first.why
    watch_only = decide(BinPolicy(order=("predicted_fail",)), **kwargs)
    assert (watch_only.bin, watch_only.name) == (1, "pass") and watch_only.flags == ["static_pat", "ml_outlier"]
    assert "observed only" in watch_only.why
    with pytest.raises(ValueError, match="unknown condition"):
        BinPolicy(order=("static_pat", "gut_feeling"))


def test_configuration_file_then_command_line(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nmodel = "m"\nbind = "ipc:///tmp/a.sock"\n[pat]\nwindow = 60\n'
                    '[binning.bins]\nml_outlier = 40\n')
    config = load_config(path, {"bind": "tcp://127.0.0.1:6000", "metrics.port": 0, "security.trusted_keys": "keys"})
    assert config.bind == "tcp://127.0.0.1:6000" and config.metrics.port == 0
    assert config.pat.window == 60 and config.binning.bins["ml_outlier"] == 40 and config.binning.bins["pass"] == 1
    path.write_text('[agent]\nmodel = "m"\nbnid = "tcp://127.0.0.1:6000"\n')
    with pytest.raises(ConfigError, match=r"agent.toml: \[agent\] bnid: unknown key"):
        load_config(path)
    with pytest.raises(ConfigError, match="security.trusted_keys: expected the trainer's public signing key"):
        load_config(None, {"model": "m"})
    assert load_config(None, {"model": "m", "security.allow_unsigned": True}).security.allow_unsigned


def test_shipped_deployment_configuration_loads():
    """The example a site copies to /etc/edge-agent must stay valid as configuration keys change."""
    config = load_config(Path(__file__).parents[1] / "edge_agent" / "daemon" / "deploy" / "agent.toml")
    assert config.model == "demo" and config.bind == "tcp://127.0.0.1:5555"
    assert config.drift.enabled and config.drift.spool_dir == "/var/lib/edge-agent/spool"
    assert config.binning.bins["ml_outlier"] == 23
