"""The collector with real processes: agents (tests/drift_feeder.py: the real DriftMonitor, DiskSpool and
Shipper over a real package), `edge-collector run` in its own process, its SQLite file, its Prometheus endpoint,
and the report opened in headless Chromium.

The package and the parts fed come from tests/conftest.py's ``drift_floor``: parts of the training lot that
training held out, so without an injected shift they follow the drift reference. Sample sizes: windows carry
300 parts per site, so a test's PSI without drift is about chi2(9)/300 (mean 0.03; above 0.2 with probability
~1e-9), while a one-sigma shift over decile bins gives PSI near 1.
"""
from __future__ import annotations

import copy
import json
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from prometheus_client import CollectorRegistry, generate_latest

from edge_agent.collector.alerts import AlertConfig, AlertRules
from edge_agent.collector.store import Store
from edge_agent.daemon.drift import DriftMonitor, DriftReference
from edge_agent.daemon.metrics import Metrics, PrometheusCollector
from edge_agent.package.manifest import SAMPLE_ROWS_FILE
from edge_agent.daemon.shipping import DiskSpool, Shipper
from edge_agent.wire.codec import decode_trusted as decode
from edge_agent.wire.stats import InvalidMessage, parse_stats

REPO = Path(__file__).resolve().parents[1]
FEEDER = Path(__file__).with_name("drift_feeder.py")
SHIFTED_TEST = "2200:VOS"   # normally distributed, in the drift floor's 12-test program
STARTUP_S = 30.0
REPLY_MS = 10_000.0   # generous: a reply that does not come at all fails a test, a slow one (a busy machine) does not


# ---- processes -------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Collector:
    """`edge-collector run` as a child process (python -m, so no installed console script is needed)."""

    def __init__(self, tmp: Path, *, config: str | None = None, port: int | None = None,
                 metrics_port: int | None = None, db: Path | None = None, extra: tuple[str, ...] = ()):
        self.tmp = tmp
        self.extra = extra   # more `edge-collector run` options (CURVE keys)
        self.endpoint = f"tcp://127.0.0.1:{port or _free_port()}"
        self.metrics_port = metrics_port or _free_port()
        self.db = db or tmp / "stats.sqlite"
        self.config = None
        if config is not None:
            self.config = tmp / "collector.toml"
            self.config.write_text(config)
        self.process = None
        self.starts = 0

    def start(self) -> Collector:
        self.starts += 1
        self.log = self.tmp / f"collector-{self.starts}.log"
        argv = [sys.executable, "-m", "edge_agent.collector.cli", "run", "--bind", self.endpoint, "--db", str(self.db),
                "--metrics-port", str(self.metrics_port)]
        if self.config:
            argv += ["--config", str(self.config)]
        argv += self.extra
        self.process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        deadline = time.monotonic() + STARTUP_S
        while "collecting on" not in self.log.read_text():
            assert self.process.poll() is None, f"collector exited:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"collector did not start:\n{self.log.read_text()}"
            time.sleep(0.05)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line.startswith("edge_collector_")}


def _feeder(tmp: Path, floor, endpoint: str, agent_id: str, windows: int, *extra: str,
            spool: Path | None = None) -> subprocess.Popen:
    spool = spool or tmp / f"spool-{agent_id}"
    return subprocess.Popen([sys.executable, str(FEEDER), "--registry", str(floor.registry.root), "--model",
                             floor.ref.name, "--feed", str(floor.feed), "--agent-id", agent_id, "--collector", endpoint,
                             "--spool", str(spool), "--windows", str(windows), *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, timeout: float = 90.0) -> dict:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _windows(db: Path) -> dict[str, list[int]]:
    """Every stored window's seq per agent, in the order the collector stored them."""
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT agent_id, seq FROM windows ORDER BY id").fetchall()
    stored: dict[str, list[int]] = {}
    for agent, seq in rows:
        stored.setdefault(agent, []).append(seq)
    return stored


@pytest.fixture
def collector(tmp_path):
    running = []

    def start(**kwargs) -> Collector:
        running.append(Collector(tmp_path, **kwargs).start())
        return running[-1]
    yield start
    for c in running:
        c.stop(signal.SIGKILL)


# ---- one shifted test on one site ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def drifted_fleet(tmp_path_factory, drift_floor):
    """Two testers x 4 sites, 2 windows each; SHIFTED_TEST shifted by one sigma on tester-b site 2 only."""
    tmp = tmp_path_factory.mktemp("fleet")
    hook_log = tmp / "hook.jsonl"
    (tmp / "hook.sh").write_text('cat >> "$1"\necho >> "$1"\n')
    collector = Collector(tmp, config=f'[alerts]\nhook = "/bin/sh {tmp / "hook.sh"} {hook_log}"\n').start()
    try:
        feeders = [_feeder(tmp, drift_floor, collector.endpoint, "agent-a", 2, "--tester", "tester-a",
                           "--window-parts", "1200", "--seed", "1"),
                   _feeder(tmp, drift_floor, collector.endpoint, "agent-b", 2, "--tester", "tester-b",
                           "--window-parts", "1200", "--seed", "2", "--shift-test", SHIFTED_TEST,
                           "--shift-site", "2", "--shift", "1.0")]
        results = [_finish(f) for f in feeders]
        metrics = collector.metrics()
    finally:
        collector.stop()           # the hook's queue is drained before the collector exits
    return {"tmp": tmp, "db": collector.db, "results": results, "metrics": metrics, "hook_log": hook_log}


def test_one_shifted_test_on_one_site_drifts_there_only_and_raises_evidence_naming_it_that_pages_nobody(
        drifted_fleet):
    """The drift evidence is stored; it pages nobody (incidents do, once a site has a baseline to move from:
    test_incidents.py; here the site is off from its first part, as a calibration offset would be)."""
    db = drifted_fleet["db"]
    assert [r["acked"] for r in drifted_fleet["results"]] == [2, 2]
    with sqlite3.connect(db) as connection:
        connection.row_factory = sqlite3.Row
        columns = msgpack.unpackb(connection.execute("SELECT columns FROM models").fetchone()[0])
        shifted = columns.index(SHIFTED_TEST)
        rows = connection.execute("SELECT w.tester, s.site, s.psi, s.counts FROM windows w "
                                  "JOIN site_windows s ON s.window_id = w.id").fetchall()
        alerts = connection.execute("SELECT * FROM alerts").fetchall()
    assert len(rows) == 2 * 2 * 4
    for row in rows:
        psi = msgpack.unpackb(row["psi"])
        assert sum(msgpack.unpackb(row["counts"])[shifted]) >= 290   # ~300 readings (a few missing)
        if (row["tester"], row["site"]) == ("tester-b", 2):
            assert psi[shifted] > 0.2
            assert max(p for t, p in enumerate(psi) if t != shifted) < 0.2
        else:
            assert max(psi) < 0.2, (row["tester"], row["site"], psi)
    psi_alerts = [a for a in alerts if a["kind"] == "psi"]
    assert psi_alerts and {(a["tester"], a["site"], a["test"]) for a in psi_alerts} == {("tester-b", 2, SHIFTED_TEST)}
    assert SHIFTED_TEST in psi_alerts[0]["message"] and "n = " in psi_alerts[0]["message"]
    assert psi_alerts[0]["sample_size"] >= 290
    # Against its three sibling sites, only the shifted site stands out (the other sites' rest includes it).
    site_alerts = [a for a in alerts if a["kind"] == "site_psi"]
    assert {(a["tester"], a["site"], a["test"]) for a in site_alerts} == {("tester-b", 2, SHIFTED_TEST)}
    assert "against its 3 sibling sites" in site_alerts[0]["message"]
    log = drifted_fleet["hook_log"]
    hooked = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    assert not [a for a in hooked if a["kind"] in ("psi", "site_psi")]


def test_prometheus_shows_psi_per_tester_and_test_alerts_agents_and_messages(drifted_fleet):
    metrics = drifted_fleet["metrics"]
    assert metrics[f'edge_collector_psi{{test="{SHIFTED_TEST}",tester="tester-b"}}'] > 0.2
    assert metrics[f'edge_collector_psi{{test="{SHIFTED_TEST}",tester="tester-a"}}'] < 0.2
    assert metrics['edge_collector_alerts_total{kind="psi"}'] >= 1
    assert metrics['edge_collector_alerts_total{kind="spool_loss"}'] == 0
    assert metrics["edge_collector_agents_alive"] == 2
    assert metrics["edge_collector_messages_received_total"] >= 4
    assert metrics["edge_collector_duplicates_dropped_total"] == \
        metrics["edge_collector_messages_received_total"] - 4


# ---- no loss -----------------------------------------------------------------------------------------------------

def test_collector_stopped_and_restarted_ends_with_every_window_once_in_order(tmp_path, drift_floor, collector):
    first = collector()
    feeder = _feeder(tmp_path, drift_floor, first.endpoint, "agent-1", 16, "--pace-s", "0.15", "--window-parts", "200")
    deadline = time.monotonic() + 30
    while not _windows(first.db).get("agent-1") and time.monotonic() < deadline:
        time.sleep(0.05)
    first.stop(signal.SIGKILL)               # no goodbye: what was acknowledged must already be on disk
    stored_before = len(_windows(first.db).get("agent-1", []))
    time.sleep(1.5)                          # windows keep closing; they wait in the agent's spool
    second = Collector(tmp_path, port=int(first.endpoint.rsplit(":", 1)[1]), db=first.db)
    second.start()
    try:
        result = _finish(feeder)
    finally:
        second.stop()
    assert 0 < stored_before < 16            # the outage really fell in the middle of the stream
    assert result["acked"] == 16 and result["pending"] == 0
    assert _windows(first.db) == {"agent-1": list(range(1, 17))}


def test_agent_killed_and_restarted_resends_its_spool_with_nothing_lost(tmp_path, drift_floor, collector):
    port = _free_port()                      # nothing listens here yet: every window stays spooled
    spool = tmp_path / "spool"
    feeder = _feeder(tmp_path, drift_floor, f"tcp://127.0.0.1:{port}", "agent-k", 6, "--window-parts", "200",
                     spool=spool)
    deadline = time.monotonic() + 60
    while len(list(spool.glob("*.msg"))) < 6:
        assert feeder.poll() is None and time.monotonic() < deadline, feeder.stderr.read() if feeder.poll() else ""
        time.sleep(0.05)
    feeder.send_signal(signal.SIGKILL)
    feeder.wait(timeout=10)
    spooled = {decode(p.read_bytes())["seq"]: decode(p.read_bytes())["window"] for p in spool.glob("*.msg")}
    assert sorted(spooled) == [1, 2, 3, 4, 5, 6]

    running = collector(port=port)
    result = _finish(_feeder(tmp_path, drift_floor, running.endpoint, "agent-k", 2, "--window-parts", "200",
                             "--seed", "9", spool=spool))
    assert result["last_seq"] == 8 and result["pending"] == 0
    assert _windows(running.db) == {"agent-k": list(range(1, 9))}
    with sqlite3.connect(running.db) as connection:
        stored = dict(connection.execute("SELECT seq, start FROM windows WHERE seq <= 6").fetchall())
    assert stored == {seq: window["start"] for seq, window in spooled.items()}   # the very windows spooled


def test_a_full_spool_drops_the_oldest_and_the_loss_reaches_the_collector(tmp_path, drift_floor, collector):
    port = _free_port()
    spool = tmp_path / "spool"
    bounded = ("--window-parts", "200", "--spool-max-messages", "3")
    result = _finish(_feeder(tmp_path, drift_floor, f"tcp://127.0.0.1:{port}", "agent-s", 7, *bounded,
                             "--wait-acked-s", "0", spool=spool))
    assert result == {**result, "last_seq": 7, "pending": 3, "dropped_total": 4}
    running = collector(port=port)
    _finish(_feeder(tmp_path, drift_floor, running.endpoint, "agent-s", 1, "--window-parts", "200", spool=spool))
    assert _windows(running.db) == {"agent-s": [5, 6, 7, 8]}
    with sqlite3.connect(running.db) as connection:
        alerts = connection.execute("SELECT kind, value, message FROM alerts ORDER BY id").fetchall()
        dropped = connection.execute("SELECT dropped_total FROM agents").fetchone()[0]
    # Each message reports the loss as it stood when it was spooled (5: 2 dropped, 6: 3, 7: 4): each increase
    # is one alert, and together they count every lost window once.
    assert {kind for kind, _, _ in alerts} == {"spool_loss"} and sum(value for _, value, _ in alerts) == 4
    assert "seq 1-4; 4 in total" in alerts[-1][2] and dropped == 4


def test_twenty_agents_feed_one_collector_at_once(tmp_path, drift_floor, collector):
    running = collector()
    feeders = [_feeder(tmp_path, drift_floor, running.endpoint, f"agent-{i:02d}", 5, "--window-parts", "200",
                       "--seed", str(i)) for i in range(20)]
    results = [_finish(f, timeout=120) for f in feeders]
    assert all(r["acked"] == 5 and r["pending"] == 0 for r in results)
    assert _windows(running.db) == {f"agent-{i:02d}": [1, 2, 3, 4, 5] for i in range(20)}
    metrics = running.metrics()
    assert metrics["edge_collector_agents_alive"] == 20
    assert metrics["edge_collector_messages_received_total"] >= 100


# ---- CURVE: agents known by their keys ------------------------------------------------------------------------------

def test_a_window_sent_with_agent_a_key_claiming_agent_b_is_refused_and_alerted_and_b_loses_nothing(
        tmp_path, drift_floor, keys, collector):
    """The issue's attack: forged windows with the victim's id made its real windows look like duplicates. With
    CURVE the collector knows each sender by its key, refuses the forgery for good, and, after a restart, stores
    every real window of the victim as new."""
    allowed = ("--key", str(keys.secret("collector")), "--agent-keys",
               str(keys.allow(tmp_path / "agent-keys", "agent-a", "agent-b")))

    def keyed(name: str) -> tuple[str, ...]:
        return "--key", str(keys.secret(name)), "--collector-key", str(keys.public("collector"))

    first = collector(extra=allowed)
    forger = _finish(_feeder(tmp_path, drift_floor, first.endpoint, "agent-b", 3, "--window-parts", "200",
                             *keyed("agent-a"), spool=tmp_path / "forger-spool"))
    outsider = _finish(_feeder(tmp_path, drift_floor, first.endpoint, "agent-x", 2, "--window-parts", "200",
                               "--wait-acked-s", "3", *keyed("stranger")))
    metrics = first.metrics()
    first.stop()
    assert forger == {**forger, "acked": 0, "pending": 0, "dropped_total": 3}   # refused for good, a counted loss
    assert outsider == {**outsider, "acked": 0, "pending": 2}                    # no handshake, no answer at all
    assert metrics["edge_collector_agent_id_mismatches_total"] == 3
    assert metrics['edge_collector_alerts_total{kind="agent_id_mismatch"}'] == 1   # once per sender per repeat time
    assert "refused a CURVE client on the agents socket" in first.log.read_text()

    second = collector(port=int(first.endpoint.rsplit(":", 1)[1]), db=first.db, extra=allowed)
    victim = _finish(_feeder(tmp_path, drift_floor, second.endpoint, "agent-b", 3, "--window-parts", "200",
                             *keyed("agent-b"), spool=tmp_path / "victim-spool"))
    assert victim == {**victim, "acked": 3, "pending": 0, "dropped_total": 0}
    assert _windows(second.db) == {"agent-b": [1, 2, 3]}
    assert second.metrics()["edge_collector_duplicates_dropped_total"] == 0
    with sqlite3.connect(second.db) as connection:
        alerts = connection.execute("SELECT kind, agent_id, message FROM alerts").fetchall()
    assert [(kind, agent) for kind, agent, _ in alerts] == [("agent_id_mismatch", "agent-a")]
    assert "claiming to be agent 'agent-b'" in alerts[0][2]


def test_invalid_messages_get_an_error_naming_the_field_and_are_not_stored(tmp_path, collector):
    running = collector()
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(running.endpoint)
    try:
        replies = []
        for payload in (b"\xc1 not msgpack", msgpack.packb({"type": "stats", "v": 1, "agent_id": "x", "seq": 1})):
            dealer.send(payload)
            assert dealer.poll(10_000), "no reply from the collector"
            replies.append(msgpack.unpackb(dealer.recv()))
    finally:
        dealer.close(linger=0)
        context.term()
    assert [r["code"] for r in replies] == ["invalid_message", "invalid_message"]
    assert "message.tester: missing" in replies[1]["message"] and replies[1]["seq"] == 1
    assert _windows(running.db) == {}
    assert running.metrics()["edge_collector_invalid_messages_total"] == 2


# ---- no poison pill: windows that can never be stored -----------------------------------------------------------

def _body(floor, site: int = 1, parts: int = 20, seed: int = 0) -> dict:
    """The body of one small window, as the agent's drift builds it (the shipper adds agent, tester, seq, spool)."""
    reference = DriftReference.from_manifest(floor.manifest)
    model = {"name": floor.ref.name, "version": floor.ref.version, "checksum": floor.registry.checksum(floor.ref)}
    monitor = DriftMonitor(reference, model, window_parts=10 ** 6)
    for part in np.random.default_rng(seed).integers(len(floor.readings), size=parts):
        monitor.update(1, site, floor.readings[part], float(floor.scores[part]), False)
    return monitor.close("parts").to_payload()


def _ship(tmp_path, endpoint: str, bodies: list[dict], *, acked: int) -> tuple[Shipper, DiskSpool]:
    spool = DiskSpool(tmp_path / "spool")
    shipper = Shipper(endpoint, spool, agent_id="edge-1", tester="t1", ack_timeout_s=0.5)
    shipper.start()
    for body in bodies:
        assert shipper.submit(body)
    deadline = time.monotonic() + 120
    while shipper.acked < acked or spool.pending:
        assert time.monotonic() < deadline, shipper.status()
        time.sleep(0.05)
    shipper.stop()
    return shipper, spool


def _alerts(db: Path, kind: str) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT agent_id, value, message FROM alerts WHERE kind = ?", (kind,)).fetchall()


def test_a_window_that_can_never_be_stored_is_dead_lettered_with_an_alert_and_the_next_hundred_are_stored(
        tmp_path, drift_floor, collector):
    running = collector()
    normal = _body(drift_floor)
    bad = copy.deepcopy(normal)
    bad["sites"][0]["head"] = 2 ** 64 - 1           # what the agent's door refuses, built here by hand
    shipper, spool = _ship(tmp_path, running.endpoint, [bad] + [normal] * 100, acked=100)
    assert _windows(running.db) == {"edge-1": list(range(2, 102))}
    assert shipper.status()["dead_lettered"] == spool.dead_lettered == 1 and spool.dropped_ranges == [[1, 1]]
    letters = tmp_path / "spool" / "dead-letter"
    assert decode((letters / "000000000001.msg").read_bytes())["sites"][0]["head"] == 2 ** 64 - 1
    assert (letters / "000000000001.why").read_text().startswith("invalid_message: sites[0].head: expected an "
                                                                 "integer in 0..255, got 18446744073709551615")
    [(agent, seq, message)] = _alerts(running.db, "refused_window")
    assert (agent, seq) == ("edge-1", 1) and "dead-letter" in message and "sites[0].head" in message
    assert _alerts(running.db, "sequence_gap") == []   # the refused window is a reported loss, not a gap
    assert running.metrics()['edge_collector_alerts_total{kind="refused_window"}'] == 1
    registry = CollectorRegistry()   # the agent's /metrics, fed by the same shipper status as its health reply
    registry.register(PrometheusCollector(Metrics(), lambda: {"name": "m", "version": "1", "checksum": "c"},
                                          drift=shipper.status))
    exposed = generate_latest(registry).decode()
    assert 'edge_agent_drift_windows_total{outcome="dead_lettered"} 1.0' in exposed
    assert 'edge_agent_drift_windows_total{outcome="acked"} 100.0' in exposed


def test_a_valid_window_whose_store_keeps_failing_is_refused_for_good_after_three_attempts(
        tmp_path, drift_floor, collector):
    """The database works but one window trips a constraint (a trigger here) every time: after three attempts it
    is refused as unstorable and dead-lettered, and the windows behind it are stored."""
    db = tmp_path / "stats.sqlite"
    Store(db).close()
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TRIGGER poison BEFORE INSERT ON windows WHEN NEW.seq = 2 "
                           "BEGIN SELECT RAISE(ABORT, 'poisoned window'); END")
    running = collector(db=db)
    shipper, spool = _ship(tmp_path, running.endpoint, [_body(drift_floor, seed=i) for i in range(5)], acked=4)
    assert _windows(db) == {"edge-1": [1, 3, 4, 5]}
    assert spool.dead_lettered == 1 and shipper.resends >= 2
    why = (tmp_path / "spool" / "dead-letter" / "000000000002.why").read_text()
    assert why.startswith("unstorable: 3 attempts to store it failed: poisoned window")
    assert [(a, v) for a, v, _ in _alerts(db, "refused_window")] == [("edge-1", 2)]
    assert running.metrics()["edge_collector_unstorable_windows_total"] == 1


@pytest.mark.parametrize("change, field", [
    (lambda m: m["sites"][0].update(head=2 ** 64 - 1), "sites[0].head: expected an integer in 0..255"),
    (lambda m: m["sites"][0].update(site=-1), "sites[0].site: expected an integer in 0..255"),
    (lambda m: m["sites"].append(copy.deepcopy(m["sites"][0])), "sites[1]: head 1 site 1 appears twice"),
    (lambda m: m["sites"][0]["change"].update(statistic=float("nan")), "sites[0].change.statistic: expected a "
                                                                        "finite number"),
    (lambda m: m["sites"][0]["counts"][0].__setitem__(0, 2 ** 63), "sites[0].counts[0][0]: expected a count"),
    (lambda m: m["sites"][0]["psi"].__setitem__(0, float("inf")), "sites[0].psi[0]: expected a finite number"),
    (lambda m: m.update(agent_id="a" * 256), "agent_id: expected a non-empty string of at most 255 characters"),
    (lambda m: m.update(seq=2 ** 64 - 1), "seq: expected an integer in 1..9007199254740992"),
    (lambda m: m["window"].update(closed_by="boredom"), "window.closed_by: expected one of parts, time"),
    (lambda m: m["spool"].update(dropped_seq_ranges=[[1, 10 ** 12]]), "spool.dropped_seq_ranges[0]: expected "
                                                                      "[first, last] with 1 <= first <= last < seq"),
    (lambda m: m.update(expected_outlier_rate=1.5), "expected_outlier_rate: expected a finite number in [0.0, 1.0]"),
    (lambda m: m["reference"]["edges"][0].__setitem__(0, float("nan")), "reference.edges[0][0]: expected a finite"),
    (lambda m: m["reference"].update(pat_screens=[{"kind": "static", "verdict": "separates", "good_parts": 10,
                                                   "good_flagged": 11, "fail_parts": 0, "fail_flagged": 0}]),
     "reference.pat_screens[0].good_flagged: expected an integer in 0..10"),
    (lambda m: m["reference"].update(pat_screens="static"), "reference.pat_screens: expected a list of at most 8"),
])
def test_the_collector_refuses_every_value_it_could_not_store_naming_field_limit_and_value(drift_floor, change,
                                                                                             field):
    message = _window(drift_floor, 5)
    parse_stats(message)
    change(message)
    with pytest.raises(InvalidMessage) as refused:
        parse_stats(message)
    assert str(refused.value).startswith(field)


def test_a_sequence_gap_of_billions_is_counted_without_listing_it(tmp_path, drift_floor):
    store = Store(tmp_path / "g.sqlite")
    rules = AlertRules(AlertConfig())
    _ingest(store, rules, _window(drift_floor, 1), 1000.0)
    assert _ingest(store, rules, _window(drift_floor, 2 ** 52, dropped=((2, 9),)), 1001.0) == ["spool_loss",
                                                                                                "sequence_gap"]
    [(_, missing, message)] = _alerts(tmp_path / "g.sqlite", "sequence_gap")
    assert missing == 2 ** 52 - 2 - 8 and "(first 10)" in message


# ---- the spool alone ---------------------------------------------------------------------------------------------

def test_spool_survives_restarts_and_repairs_an_interrupted_write(tmp_path):
    spool = DiskSpool(tmp_path / "s", max_messages=100)
    for i in range(3):
        spool.append({"n": i})
    spool.ack(1)
    stream = spool.stream
    (tmp_path / "s" / "000000000004.msg.tmp").write_bytes(b"half a message")   # a crash mid-write
    again = DiskSpool(tmp_path / "s", max_messages=100)
    assert again.stream == stream and again.pending == 2 and again.oldest()[0] == 2
    assert not list((tmp_path / "s").glob("*.tmp"))
    assert again.append({"n": 3}) == 4                                      # the sequence continues
    again.ack(2), again.ack(3), again.ack(4)
    assert DiskSpool(tmp_path / "s").append({"n": 4}) == 5                  # even with nothing left spooled
    message = decode(DiskSpool(tmp_path / "s").oldest()[1])
    assert message["seq"] == 5 and message["spool"] == {"stream": stream, "dropped_total": 0,
                                                        "dropped_seq_ranges": [], "unspooled_lost": 0}


def test_spool_bound_by_bytes_drops_oldest_and_records_ranges(tmp_path):
    spool = DiskSpool(tmp_path / "s", max_messages=1000, max_bytes=3500)
    for i in range(10):
        spool.append({"pad": "x" * 900, "n": i})              # about 1 kB each as stored: 3 fit in 3500 bytes
    assert spool.bytes <= 3500 and spool.pending == 3
    assert spool.dropped_total == 7 and spool.dropped_ranges == [[1, 7]]
    assert decode(spool.oldest()[1])["n"] == 7
    spool.drop(8, "refused")
    assert DiskSpool(tmp_path / "s", max_messages=1000, max_bytes=3500).dropped_ranges == [[1, 8]]


def test_a_window_lost_before_spooling_is_counted_persisted_and_reported(tmp_path):
    shipper = Shipper(f"tcp://127.0.0.1:{_free_port()}", DiskSpool(tmp_path / "s"), agent_id="a", tester="t",
                      queue_length=1)
    assert shipper.submit({"n": 1}) and not shipper.submit({"n": 2})     # the thread is not running yet
    shipper.start()
    shipper.stop(timeout_s=0.0)
    restarted = DiskSpool(tmp_path / "s")
    assert restarted.unspooled_lost == 1
    assert decode(restarted.oldest()[1])["spool"]["unspooled_lost"] == 1


# ---- alert rules on the real store ---------------------------------------------------------------------------------

def _window(floor, seq: int, *, agent: str = "a1", score_shift_sigmas: float = 0.0,
            shifted_sites: tuple[int, ...] = (), sites: tuple[int, ...] = (1,), parts: int = 600, dropped: tuple = (),
            stream: str = "s1") -> dict:
    """A stats message built in process by the real DriftMonitor over the drift floor's package: ``parts`` per
    site drawn from its held-out parts (the first test moved by one robust sigma on ``shifted_sites``), and half
    of the scores moved by ``score_shift_sigmas`` reference sigmas."""
    manifest = floor.manifest
    reference = DriftReference.from_manifest(manifest)
    model = {"name": floor.ref.name, "version": floor.ref.version, "checksum": floor.registry.checksum(floor.ref)}
    monitor = DriftMonitor(reference, model, window_parts=10 ** 6)
    rng = np.random.default_rng([seq, len(agent)])
    threshold = manifest.models.outlier.threshold
    sigma = manifest.pat.limits[0].robust_sigma
    for site in sites:
        for i, part in enumerate(rng.integers(len(floor.readings), size=parts)):
            score = float(floor.scores[part]) + (score_shift_sigmas * reference.score_scale if i >= parts // 2 else 0.0)
            row = floor.readings[part].copy()
            row[0] += sigma if site in shifted_sites else 0.0
            monitor.update(1, site, row, score, score < threshold)
    body = monitor.close("parts").to_payload()
    return {"type": "stats", "v": 1, "agent_id": agent, "tester": f"tester-{agent}", "seq": seq, **body,
            "spool": {"stream": stream, "dropped_total": len(dropped), "dropped_seq_ranges": [list(r) for r in dropped],
                      "unspooled_lost": 0}}


def _ingest(store: Store, rules: AlertRules, message: dict, now: float) -> list[str]:
    """What the collector does with one received message (in its own transaction); the alert kinds raised."""
    window = parse_stats(message)
    with store.transaction():
        added = store.add_window(window, now)
        alerts = [] if added is None else rules.for_window(window, added, now).alerts
        for alert in alerts:
            store.add_alert(alert)
    return [a["kind"] for a in alerts]


def test_alert_rules_outlier_rate_change_gap_silence_and_repeat_suppression(tmp_path, drift_floor):
    first_test = drift_floor.columns[0]
    store = Store(tmp_path / "a.sqlite")
    rules = AlertRules(AlertConfig(silent_after_s=60.0, repeat_after_s=3600.0))

    def ingest(message: dict, now: float) -> list[str]:
        return _ingest(store, rules, message, now)

    floor = drift_floor
    assert ingest(_window(floor, 1), 1000.0) == []                             # reference-like: quiet
    assert ingest(_window(floor, 1), 1001.0) == []                             # a duplicate: not stored again
    shifted = ingest(_window(floor, 2, score_shift_sigmas=-3.0), 1002.0)       # half the scores 3 sigma lower
    assert "outlier_rate" in shifted and "change" in shifted
    again = ingest(_window(floor, 3, score_shift_sigmas=-3.0), 1003.0)
    assert "outlier_rate" not in again and "change" not in again              # suppressed for repeat_after_s
    assert ingest(_window(floor, 6, dropped=((4, 4),)), 1004.0) == ["spool_loss", "sequence_gap"]   # 5: unexplained
    assert ingest(_window(floor, 1, stream="s2"), 1005.0) == []                # a new spool restarts the sequence
    # PSI is judged on at least psi_min_parts (200) readings: two windows of 100 parts are summed first.
    assert ingest(_window(floor, 2, stream="s2", parts=100, shifted_sites=(1,)), 1006.0) == []
    assert ingest(_window(floor, 3, stream="s2", parts=100, shifted_sites=(1,)), 1007.0) == ["psi"]
    with sqlite3.connect(tmp_path / "a.sqlite") as connection:
        message = connection.execute("SELECT message FROM alerts WHERE kind = 'psi'").fetchone()[0]
    assert first_test in message and "n = 200 readings" in message and "windows seq 2-3" in message
    assert rules.for_silence(store.agents(), 1060.0) == []
    silent = rules.for_silence(store.agents(), 1068.0)                       # last message at 1007
    assert [a["kind"] for a in silent] == ["silent"] and "a1" in silent[0]["message"]
    with sqlite3.connect(tmp_path / "a.sqlite") as connection:
        assert connection.execute("SELECT count(*) FROM windows").fetchone()[0] == 7


def test_a_whole_tester_shift_raises_psi_but_no_site_alert_and_one_site_raises_both(tmp_path, drift_floor):
    """A new lot moves every site together: PSI against the training reference fires on every site, the
    site-against-siblings comparison stays quiet. One moved site of four fires both, at that site only."""
    first_test = drift_floor.columns[0]
    store = Store(tmp_path / "s.sqlite")
    rules = AlertRules(AlertConfig())
    _ingest(store, rules, _window(drift_floor, 1, sites=(1, 2, 3, 4), shifted_sites=(1, 2, 3, 4), parts=400), 1000.0)
    with sqlite3.connect(tmp_path / "s.sqlite") as connection:
        raised = connection.execute("SELECT kind, site, test FROM alerts").fetchall()
    assert sorted(raised) == [("psi", site, first_test) for site in (1, 2, 3, 4)]

    _ingest(store, rules, _window(drift_floor, 1, agent="b2", sites=(1, 2, 3, 4), shifted_sites=(3,), parts=400),
            1001.0)
    with sqlite3.connect(tmp_path / "s.sqlite") as connection:
        raised = connection.execute("SELECT kind, site, test FROM alerts WHERE agent_id = 'b2'").fetchall()
    assert sorted(raised) == [("psi", 3, first_test), ("site_psi", 3, first_test)]


# ---- the agent's drift hook with a real model package --------------------------------------------------------------

@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    from edge_agent.package.registry import Registry
    from trainer.ingest import load_tables
    from trainer.package import build_package
    from trainer.synth import SynthConfig, write
    from trainer.train import TrainConfig, fit

    tmp = tmp_path_factory.mktemp("registry")
    registry = Registry(tmp / "models")
    refs = []
    for seed in (3, 4):
        lot = tmp / f"lot{seed}.parquet"
        write(SynthConfig(seed=seed, parts=1500, tests=12, lots=1, excursions=("latent_outliers",)), lot)
        table, report = load_tables([str(lot)], min_rows=200)
        trained = fit(table, TrainConfig(name="tiny", n_trees=20, yield_trees=10, seed=seed), progress=lambda m: None)
        files, manifest = build_package(trained, table, report.to_dict(), [str(lot)])
        refs.append(registry.publish("tiny", files, manifest, reason="drift hook test"))
    return registry, refs


def test_agent_drift_hook_ships_windows_of_each_served_model(tmp_path, two_versions, collector):
    from edge_agent.daemon.scoring import load_package
    from edge_agent.daemon.upstream import AgentDrift, DriftConfig
    from edge_agent.wire.score import Part

    registry, refs = two_versions
    first, second = (load_package(registry, ref) for ref in refs)
    running = collector()
    drift = AgentDrift(DriftConfig(agent_id="tester07-agent", tester="tester07", collector=running.endpoint,
                                   window_parts=100, spool_dir=str(tmp_path / "spool"), ack_timeout_s=2.0))
    assert DriftConfig(window_parts=0, collector="http://x").problems() == [
        "drift.window_parts: expected a positive number, got 0",
        "drift.collector: expected tcp://host:port or ipc:///path, got 'http://x'"]
    with np.load(first.path / SAMPLE_ROWS_FILE) as sample:
        rows = sample["readings"]
    drift.start(first)
    for model, n in ((first, 250), (second, 30)):
        scores, _ = model.score(rows[:n])
        for i in range(n):
            drift.update(model, Part(head=1, site=1 + i % 2), rows[i], float(scores[i]))
    # No moment between parts here: 256 parts wait (QUEUED_PARTS), the 24 before them were taken on the request
    # path, and the windows below hold the same parts as if each had been taken at once.
    queued = drift.status()
    assert (queued["queued_parts"], queued["parts_taken_on_path"]) == (256, 24)
    drift.stop(timeout_s=10.0)
    assert drift.status()["spooled"] == 0
    with sqlite3.connect(running.db) as connection:
        stored = connection.execute("SELECT seq, closed_by, parts, model_checksum, tester FROM windows "
                                    "ORDER BY id").fetchall()
    assert [row[:3] for row in stored] == [(1, "parts", 100), (2, "parts", 100), (3, "model_change", 50),
                                           (4, "shutdown", 30)]
    assert [row[3] for row in stored] == [first.checksum] * 3 + [second.checksum]
    assert {row[4] for row in stored} == {"tester07"}


# ---- the real agent process in the fleet ------------------------------------------------------------------------

def test_a_real_agent_ships_drift_windows_that_name_the_shifted_test_and_site(tmp_path, drift_floor, collector,
                                                                              keys):
    """The whole path with real processes: client -> `edge-agent run` (scoring + drift) -> `edge-collector run`.

    Parts of the training lot that training held out stream through the agent on sites 1 and 2 with
    SHIFTED_TEST moved by 2 sigma on site 2 only; 300 parts per site per window keep undrifted PSI far below 0.2
    (module docstring)."""
    from edge_agent.client import AgentClient
    from edge_agent.processes import free_tcp_endpoint, start_agent, stop

    # Over CURVE, as deployed: the collector binds the agent-a key pair to the id agent-7.
    allowed = tmp_path / "agent-keys"
    allowed.mkdir()
    shutil.copy(keys.public("agent-a"), allowed / "agent-7.key")
    running = collector(extra=("--key", str(keys.secret("collector")), "--agent-keys", str(allowed)))
    config = tmp_path / "agent.toml"
    config.write_text(f'[drift]\nagent_id = "agent-7"\ntester = "tester-7"\ncollector = "{running.endpoint}"\n'
                      f'window_parts = 600\nspool_dir = "{tmp_path / "spool"}"\n'
                      f'[security]\nkey = "{keys.secret("agent-a")}"\ncollector_key = "{keys.public("collector")}"\n'
                      f'trusted_keys = "{keys.trusted}"\n')
    endpoint = free_tcp_endpoint()
    agent = start_agent(drift_floor.registry.root, drift_floor.ref.name, endpoint, "--config", str(config),
                        log_path=tmp_path / "agent.log")

    readings = drift_floor.readings[:1200].copy()
    shifted = drift_floor.columns.index(SHIFTED_TEST)
    sites = 1 + np.arange(len(readings)) % 2
    sigma = np.nanstd(readings[:, shifted])
    readings[sites == 2, shifted] += 2.0 * sigma
    try:
        with AgentClient(endpoint, timeout_ms=REPLY_MS) as client:
            results = [client.score(row, {"lot": "L2", "head": 1, "site": int(site), "part_id": str(i)})
                       for i, (row, site) in enumerate(zip(readings, sites))]
            assert all(r.decided for r in results)
            assert client.health(timeout_ms=REPLY_MS)["drift"]["tester"] == "tester-7"
    finally:
        assert stop(agent) == 0
    deadline = time.monotonic() + 20
    while len(_windows(running.db).get("agent-7", [])) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    # Two full windows, then the window open at SIGTERM: shipped at shutdown although it holds no part.
    assert _windows(running.db)["agent-7"] == [1, 2, 3]
    with sqlite3.connect(running.db) as connection:
        connection.row_factory = sqlite3.Row
        assert tuple(connection.execute("SELECT closed_by, parts FROM windows WHERE seq = 3").fetchone()) == ("shutdown", 0)
        rows = connection.execute("SELECT w.closed_by, s.site, s.parts, s.psi FROM windows w "
                                  "JOIN site_windows s ON s.window_id = w.id ORDER BY w.seq, s.site").fetchall()
        alerts = connection.execute("SELECT * FROM alerts WHERE kind = 'psi'").fetchall()
    assert [(r["closed_by"], r["site"], r["parts"]) for r in rows] == [("parts", 1, 300), ("parts", 2, 300),
                                                                       ("parts", 1, 300), ("parts", 2, 300)]
    for row in rows:
        psi = msgpack.unpackb(row["psi"])
        if row["site"] == 2:
            assert psi[shifted] > 0.2
        assert max(p for t, p in enumerate(psi) if row["site"] == 1 or t != shifted) < 0.2
    assert {(a["tester"], a["site"], a["test"]) for a in alerts} == {("tester-7", 2, SHIFTED_TEST)}
