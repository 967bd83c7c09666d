"""The fleet model lifecycle with real processes and real keys: a registry service, a collector and four agents, each
with its own CURVE key, package cache and spools.

- canary: a deployment moves two agents to version 2 while the others keep production; rolling the group back is
  instant (the previous version is in each agent's cache: nothing is fetched again);
- a package tampered with in transit (a proxy between one agent and the service flips bytes) is refused and the
  agent serves on;
- killing the registry service leaves every agent serving (offline), and an agent restarted meanwhile starts from
  its cache;
- shadow: a challenger identical to the champion passes the gate, a deliberately worse one fails it, and promote to
  production refuses the failing one unless forced;
- audit: a lot streamed through two agents with a model change in the middle and a collector restart: for every
  part, ``edge-collector audit`` names the version that decided it, as the reply said.

Tests run in file order and share the fleet (module fixture): each says where it leaves it.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from edge_agent.client import AgentClient
from edge_agent.collector import cli as collector_cli
from edge_agent.keys import create_curve_pair
from edge_agent.package.manifest import MANIFEST_FILE, OUTLIER_FILE, SIGNATURE_FILE
from edge_agent.package.registry import PackageRef, Registry
from edge_agent.processes import (free_tcp_endpoint, start_agent, start_collector, start_registry_service, stop)
from edge_agent.wire.links import connect_curve
from trainer.cli import main as edge_train
from trainer.package import build_and_publish
from trainer.train import TrainConfig, fit
from test_agent import REPLY_S, wait_for

AGENTS = ("agent-a", "agent-b", "agent-c", "agent-d")   # agent-d reaches the service through the tampering proxy
AGENT_TOML = """
[agent]
watch_interval_s = 0.5
[drift]
window_parts = 200
window_seconds = 1.0
ack_timeout_s = 2.0
[fleet]
poll_interval_s = 0.3
request_timeout_s = 1.0
chunk_bytes = 65536
[audit]
batch_parts = 50
batch_seconds = 0.3
"""


class TamperingProxy(threading.Thread):
    """Between one agent (plain, loopback) and the registry service (CURVE, with that agent's key): passes every
    message on, but flips bytes in the chunks of ``file`` of version ``version``: tampering in transit."""

    def __init__(self, front: str, back: str, curve, version: str, file: str):
        super().__init__(daemon=True)
        self.front, self.back, self.curve, self.version, self.file = front, back, curve, version, file
        self.tampered = 0
        self._halt = threading.Event()

    def run(self) -> None:
        context = zmq.Context()
        front, back = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
        front.bind(self.front)
        connect_curve(back, self.curve)
        back.connect(self.back)
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(back, zmq.POLLIN)
        waiting: list[bytes] = []   # the requesters, in order (the service answers in order)
        while not self._halt.is_set():
            events = dict(poller.poll(100))
            if front in events:
                identity, payload = front.recv_multipart()
                waiting.append(identity)
                back.send(payload)
            if back in events:
                reply = msgpack.unpackb(back.recv(), raw=False)
                if reply.get("type") == "chunk" and reply["version"] == self.version and reply["file"] == self.file:
                    reply["data"] = bytes(b ^ 0x5A for b in reply["data"])
                    self.tampered += 1
                front.send_multipart([waiting.pop(0), msgpack.packb(reply, use_bin_type=True)])
        front.close(0)
        back.close(0)
        context.term()

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def _republish(registry: Registry, model: str, version: str, signer) -> PackageRef:
    """An identical copy of ``version`` (same files, same scores) as a new signed version: a challenger that must
    agree with its champion on every part."""
    source = registry.package_dir(PackageRef(model, version))
    files = {p.name: p.read_bytes() for p in source.iterdir() if p.name not in (MANIFEST_FILE, SIGNATURE_FILE)}
    return registry.publish(model, files, registry.manifest(PackageRef(model, version)),
                            reason="test: identical challenger", signer=signer)


@pytest.fixture(scope="module")
def fleet(packages, keys, tmp_path_factory):
    """m/1 production, m/2 candidate (another lot), m/3 = m/1 republished, m/4 worse (flags 15 % of parts)."""
    folder = tmp_path_factory.mktemp("lifecycle")
    root = packages.copy(folder / "models")
    registry = Registry(root)
    _republish(registry, packages.model, "1", keys.signer)
    lot = packages.lot(21, 1500, "W")
    worse = fit(lot, TrainConfig(name=packages.model, n_trees=20, yield_trees=10, target_outlier_rate=0.15, seed=21),
                progress=lambda message: None)
    build_and_publish(worse, lot, {}, registry, [], signer=keys.signer)
    for name in AGENTS[2:]:
        create_curve_pair(keys.folder, name)
    allowed = keys.allow(folder / "agent-keys", *AGENTS)
    curve_server = ("--key", str(keys.secret("collector")), "--agent-keys", str(allowed))
    collector_endpoint, service_endpoint, proxy_endpoint = (free_tcp_endpoint() for _ in range(3))
    db = folder / "stats.sqlite"
    collector = start_collector(db, collector_endpoint, *curve_server, log_path=folder / "collector.log")
    service = start_registry_service(root, service_endpoint, *curve_server, log_path=folder / "service.log")
    proxy = TamperingProxy(proxy_endpoint, service_endpoint, keys.client("agent-d", "collector"), "2", OUTLIER_FILE)
    proxy.start()
    config = folder / "agent.toml"
    config.write_text(AGENT_TOML)
    agents = {}

    def launch(name: str) -> None:
        endpoint = agents[name]["endpoint"] if name in agents else free_tcp_endpoint()
        through = (("--registry-service", proxy_endpoint) if name == "agent-d" else
                   ("--registry-service", service_endpoint, "--service-key", str(keys.public("collector"))))
        process = start_agent(folder / f"cache-{name}", packages.model, endpoint, "--config", str(config),
                              "--agent-id", name, "--key", str(keys.secret(name)), "--collector", collector_endpoint,
                              "--collector-key", str(keys.public("collector")), *keys.trust_args, *through,
                              "--cache-dir", str(folder / f"cache-{name}"), log_path=folder / f"{name}.log")
        agents[name] = {"process": process, "endpoint": endpoint}

    for name in AGENTS:
        launch(name)
    state = {"root": root, "db": db, "folder": folder, "agents": agents, "launch": launch, "proxy": proxy,
             "collector": collector, "collector_start": lambda: start_collector(
                 db, collector_endpoint, *curve_server, log_path=folder / "collector.log"),
             "service": service, "model": packages.model, "stream": packages.stream}
    yield state
    proxy.stop()
    for agent in agents.values():
        stop(agent["process"])
    for name in ("service", "collector"):
        if state[name].poll() is None:
            stop(state[name])


def _health(fleet, name: str) -> dict:
    with AgentClient(fleet["agents"][name]["endpoint"]) as client:
        return client.health(timeout_ms=REPLY_S * 1000)


def _serving(fleet) -> dict[str, str]:
    return {name: _health(fleet, name)["model"]["version"] for name in AGENTS}


def _registry(fleet, *arguments: str) -> int:
    return edge_train(["registry", *arguments, "--registry", str(fleet["root"])])


def _score(fleet, name: str, rows: np.ndarray, **part) -> list:
    with AgentClient(fleet["agents"][name]["endpoint"], timeout_ms=REPLY_S * 1000) as client:
        return [client.score(row, {**part, "x": i}) for i, row in enumerate(rows)]


def test_every_agent_starts_on_production_fetched_from_the_registry_service_into_its_own_cache(fleet):
    assert _serving(fleet) == dict.fromkeys(AGENTS, "1")
    for name in AGENTS:
        status = _health(fleet, name)["lifecycle"]["fleet"]
        assert status["group"] == "production" and status["cached_versions"] == ["1"], status
        assert Path(status["cache"]) == fleet["folder"] / f"cache-{name}"


def test_a_canary_deployment_moves_two_agents_to_the_new_version_while_the_others_keep_production(fleet, keys):
    assert _registry(fleet, "deploy", fleet["model"], "2", "--group", "canary", "--agents", "agent-a,agent-b",
                     "--trusted-keys", str(keys.trusted), "--reason", "canary of the lot-12 model") == 0
    wait_for(lambda: [_serving(fleet)[n] for n in ("agent-a", "agent-b")] == ["2", "2"], "the canaries on v2")
    time.sleep(1.0)   # several polls later, the others still run production
    assert _serving(fleet) == {"agent-a": "2", "agent-b": "2", "agent-c": "1", "agent-d": "1"}
    history = Registry(fleet["root"]).history(fleet["model"])[-1]
    assert (history["action"], history["version"], history["to_stage"]) == ("deploy", "2", "canary")
    assert history["reason"] == "canary of the lot-12 model" and history["user"]
    assert all(r.decided and r.model["version"] == "2" for r in _score(fleet, "agent-a", fleet["stream"][:5]))


def test_a_package_tampered_with_in_transit_is_refused_and_the_agent_serves_on(fleet, keys):
    assert _registry(fleet, "deploy", fleet["model"], "2", "--group", "transit", "--agents", "agent-d",
                     "--trusted-keys", str(keys.trusted), "--reason", "test: through the tampering proxy") == 0
    status = wait_for(lambda: (s := _health(fleet, "agent-d")["lifecycle"]["fleet"])["refused_packages"] and s,
                      "agent-d's refusal")
    assert fleet["proxy"].tampered > 0
    assert OUTLIER_FILE in status["last_problem"] and "sha256" in status["last_problem"], status["last_problem"]
    assert status["cached_versions"] == ["1"], "the tampered package must not stay in the cache"
    assert _health(fleet, "agent-d")["model"]["version"] == "1"
    assert all(r.decided and r.model["version"] == "1" for r in _score(fleet, "agent-d", fleet["stream"][:5]))
    assert _registry(fleet, "rollback", fleet["model"], "--group", "transit", "--reason", "test done") == 0


def test_rolling_the_canary_group_back_is_instant_from_each_agents_cache(fleet):
    fetched = {n: _health(fleet, n)["lifecycle"]["fleet"]["fetched_bytes"] for n in ("agent-a", "agent-b")}
    start = time.monotonic()
    assert _registry(fleet, "rollback", fleet["model"], "--group", "canary", "--reason", "canary rejected") == 0
    wait_for(lambda: _serving(fleet) == dict.fromkeys(AGENTS, "1"), "every agent back on v1")
    seconds = time.monotonic() - start
    for name in ("agent-a", "agent-b"):
        status = _health(fleet, name)["lifecycle"]["fleet"]
        assert status["fetched_bytes"] == fetched[name], "a rollback fetches nothing: v1 is still cached"
        assert status["group"] == "production"
    print(f"canary rollback: every canary serving v1 again {seconds:.2f} s after the command")
    assert Registry(fleet["root"]).history(fleet["model"])[-1]["action"] == "undeploy"


def test_shadow_statistics_reach_the_collector_and_the_gate_passes_an_identical_challenger_fails_a_worse_one(
        fleet, keys, capsys):
    rows = fleet["stream"]
    for challenger in ("3", "4"):
        assert _registry(fleet, "shadow", fleet["model"], challenger, "--percent", "100", "--trusted-keys",
                         str(keys.trusted), "--reason", f"test: v{challenger} in shadow") == 0
        wait_for(lambda: all((_health(fleet, n)["lifecycle"]["shadow"]["challenger"] or {}).get("version")
                             == challenger for n in ("agent-a", "agent-b")), f"v{challenger} in shadow")
        for name in ("agent-a", "agent-b"):
            assert all(r.decided and r.model["version"] == "1" for r in _score(fleet, name, rows, lot="SH", site=1))

        def stored() -> int:
            with sqlite3.connect(fleet["db"]) as db:
                return db.execute("SELECT coalesce(sum(parts), 0) FROM shadow_sites WHERE challenger_version = ?",
                                  (challenger,)).fetchone()[0]
        wait_for(lambda: stored() >= 2 * len(rows), f"v{challenger}'s shadow counts at the collector")
    capsys.readouterr()
    gate = ["--fleet-db", str(fleet["db"]), "--min-parts", "500"]
    assert _registry(fleet, "gate", fleet["model"], "3", *gate) == 0
    passed = capsys.readouterr().out
    assert "gate PASSED" in passed and "agreement (same bin)" in passed and "1  (needs >= 0.98)" in passed, passed
    assert _registry(fleet, "gate", fleet["model"], "4", *gate) == 1
    failed = capsys.readouterr().out
    assert "gate FAILED" in failed and "FAIL  outlier rate difference vs champion" in failed, failed
    with pytest.raises(Exception, match="fleet gate failed"):
        from trainer.registry_cli import cli_promote
        cli_promote(Registry(fleet["root"]), fleet["model"], "4", "production", "test", fleet_db=str(fleet["db"]))
    assert Registry(fleet["root"]).stage_of(fleet["model"], "4") == "candidate"
    assert _registry(fleet, "shadow", fleet["model"], "--off", "--reason", "test done") == 0


def test_the_audit_names_for_every_part_the_version_that_decided_it_across_a_model_change_and_a_collector_restart(
        fleet, keys, capsys):
    rows = fleet["stream"][:200]
    replies: dict[str, str] = {}

    def stream(first: int) -> None:
        for i, row in enumerate(rows[:100], first):
            name = ("agent-a", "agent-b")[i % 2]
            part = f"AUD-{i:04d}"
            with AgentClient(fleet["agents"][name]["endpoint"], timeout_ms=REPLY_S * 1000) as client:
                result = client.score(row, {"lot": "LAUDIT", "wafer": 1 + i // 100, "x": i, "y": 0, "part_id": part})
            assert result.decided
            replies[part] = result.model["version"]

    stream(0)
    stop(fleet["collector"])                       # the collector goes away mid-lot ...
    assert _registry(fleet, "deploy", fleet["model"], "2", "--group", "canary", "--agents", "agent-a",
                     "--trusted-keys", str(keys.trusted), "--reason", "test: model change mid-lot") == 0
    wait_for(lambda: _serving(fleet)["agent-a"] == "2", "agent-a on v2")
    stream(100)
    fleet["collector"] = fleet["collector_start"]()   # ... and comes back: the spools deliver what waited
    assert set(replies.values()) == {"1", "2"}

    def audited() -> int:
        with sqlite3.connect(fleet["db"]) as db:
            return db.execute("SELECT count(*) FROM decisions WHERE lot = 'LAUDIT'").fetchone()[0]
    wait_for(lambda: audited() >= len(replies), "every decision of the lot at the collector")
    capsys.readouterr()
    assert collector_cli.main(["audit", "--db", str(fleet["db"]), "--lot", "LAUDIT"]) == 0
    table = capsys.readouterr().out.splitlines()
    header = table[0].split("\t")
    found = {}
    for line in table[1:]:
        row = dict(zip(header, line.split("\t")))
        assert row["part_id"] not in found, f"{row['part_id']} stored twice"
        found[row["part_id"]] = row["model_version"]
        assert row["model_checksum"] and row["digest"] and row["agent_id"] in ("agent-a", "agent-b")
    assert found == replies
    assert collector_cli.main(["audit", "--db", str(fleet["db"]), "--part", "AUD-0150"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split("\t")[12] == replies["AUD-0150"]
    assert collector_cli.main(["audit", "--db", str(fleet["db"]), "--model", fleet["model"], "--version", "2"]) == 0
    assert "agent-a" in capsys.readouterr().out
    assert _registry(fleet, "rollback", fleet["model"], "--group", "canary", "--reason", "test done") == 0


def test_killing_the_registry_service_leaves_every_agent_serving_and_a_restarted_agent_starts_from_its_cache(fleet):
    fleet["service"].kill()
    fleet["service"].wait()
    wait_for(lambda: all(_health(fleet, n)["lifecycle"]["fleet"]["state"] == "offline" for n in AGENTS[:3]),
             "the agents offline")
    for name in AGENTS:
        assert all(r.decided for r in _score(fleet, name, fleet["stream"][:5]))
    stop(fleet["agents"]["agent-c"]["process"])
    fleet["launch"]("agent-c")
    health = _health(fleet, "agent-c")
    assert health["model"]["version"] == "1" and health["lifecycle"]["fleet"]["state"] == "offline"
    assert all(r.decided for r in _score(fleet, "agent-c", fleet["stream"][:5]))


def test_a_forced_promotion_past_a_failing_fleet_gate_is_recorded_with_what_it_overrode(fleet):
    from trainer.registry_cli import cli_promote
    registry = Registry(fleet["root"])
    with pytest.raises(Exception, match="needs the fleet gate"):
        cli_promote(registry, fleet["model"], "4", "production", "no evidence given")
    cli_promote(registry, fleet["model"], "4", "production", "test: forced", force=True, fleet_db=str(fleet["db"]))
    line = registry.history(fleet["model"])[-1]
    assert (line["version"], line["to_stage"], line["reason"]) == ("4", "production", "test: forced")
    assert line["forced"].startswith("fleet gate failed: ") and "outlier rate difference" in line["forced"]


# ---- without the fleet: the audit spool's bounds, deployments' selection --------------------------------------------

def test_an_audit_spool_that_fills_up_counts_the_loss_and_the_collector_alerts_it(packages, tmp_path):
    from edge_agent.daemon.audit import AuditRecorder
    from edge_agent.daemon.binning import BinPolicy, decide_insufficient
    from edge_agent.daemon.config import AuditConfig, DriftConfig
    from edge_agent.daemon.lifecycle import Lifecycle
    from edge_agent.daemon.scoring import load_package
    from edge_agent.wire.score import Part
    registry = Registry(packages.root)
    model = load_package(registry, PackageRef(packages.model, "1"))
    endpoint = free_tcp_endpoint()
    drift = DriftConfig(collector=endpoint, spool_dir=str(tmp_path / "spool"), ack_timeout_s=1.0)
    audit = AuditRecorder(AuditConfig(batch_parts=10, spool_max_messages=3, log_max_bytes=1), drift, "agent-x", "tx")
    decision = decide_insufficient(BinPolicy(), present=0, tests=packages.n_tests, static=[])
    audit.start()   # no collector yet: batches wait in the spool, which holds 3
    for i in range(60):
        audit.decided(model, Part(lot="LOSS", part_id=f"L-{i}"), packages.stream[i], None, None, decision)
    wait_for(lambda: audit.shipper.spool.dropped_total == 3, "the 3 oldest of 6 batches dropped")
    collector = start_collector(tmp_path / "stats.sqlite", endpoint, log_path=tmp_path / "collector.log")
    try:
        wait_for(lambda: audit.shipper.spool.pending == 0, "the 3 batches left delivered")
        with sqlite3.connect(tmp_path / "stats.sqlite") as db:
            stored = db.execute("SELECT count(*) FROM decisions").fetchone()[0]
            alerts = db.execute("SELECT value, message FROM alerts WHERE kind = 'audit_loss'").fetchall()
        assert stored == 30
        # Each batch carries the loss as it stood when it was spooled (1, 2, then 3 dropped): every increase alerted.
        assert [value for value, _ in alerts] == [1, 1, 1] and "3 dropped from its full audit spool" in alerts[-1][1]
        assert len(list(audit.shipper.spool.log_dir.iterdir())) == 1, "the local log rotates down to its bound"
        exposed = _prometheus(model, Lifecycle(audit=audit))
        assert 'edge_agent_audit_batches_total{outcome="dropped"} 3.0' in exposed
        assert 'edge_agent_audit_batches_total{outcome="acked"} 3.0' in exposed
    finally:
        audit.stop(2.0)
        stop(collector)


def _prometheus(model, lifecycle) -> str:
    """What the agent's /metrics shows of ``lifecycle`` (the collector the agent registers, read in place)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from edge_agent.daemon.metrics import Metrics, PrometheusCollector
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PrometheusCollector(Metrics(), lambda: model.identity, lifecycle=lifecycle.status))
    return generate_latest(registry).decode()


def test_a_canary_percentage_picks_agents_by_their_id_and_keeps_them_as_it_grows():
    from edge_agent.package.deployment import Deployment
    fleet_ids = [f"tester-{i:03d}" for i in range(400)]
    chosen = {}
    for percent in (5, 50, 100):
        deployment = Deployment("m", {"canary": {"version": "2", "agents": [], "percent": percent}})
        chosen[percent] = {a for a in fleet_ids if deployment.assign(a, a, "1").champion.version == "2"}
    assert chosen[5] < chosen[50] < chosen[100] == set(fleet_ids)
    assert 5 <= len(chosen[5]) <= 40 and 150 <= len(chosen[50]) <= 250   # about 5 % and 50 % of 400
    listed = Deployment("m", {"canary": {"version": "2", "agents": ["tester-b"], "percent": 0}},
                        {"version": "3", "agents": ["tester-a"], "percent": 0})
    assert listed.assign("agent-9", "tester-b", "1").champion.version == "2"     # listed by tester name
    given = listed.assign("tester-a", "tester-a", "1")
    assert (given.group, given.champion.version, given.challenger.version) == ("production", "1", "3")


def test_a_fetch_cut_off_midway_resumes_from_the_bytes_it_already_has(packages, keys, tmp_path):
    from edge_agent.fleet.follower import PackageCache, ServiceLink, Unreachable
    from edge_agent.fleet.service import RegistryService
    from edge_agent.keys import load_trusted_keys
    from edge_agent.package.signing import Trust
    from edge_agent.wire.packages import assignment_request
    endpoint = free_tcp_endpoint()
    service = RegistryService(Registry(packages.root), endpoint)
    thread = threading.Thread(target=service.serve, daemon=True)
    thread.start()
    link = ServiceLink(endpoint, REPLY_S, None)

    class CutOff:
        """The link, until the connection is lost after three chunks."""
        asked = 0

        def ask(self, request):
            self.asked += 1
            if self.asked > 3:
                raise Unreachable("test: connection lost")
            return link.ask(request)
    try:
        listing = link.ask(assignment_request("agent-a", "agent-a", packages.model))["champion"]
        cache = PackageCache(tmp_path / "cache", Trust(load_trusted_keys(keys.trusted), str(keys.trusted)), 3)
        with pytest.raises(Unreachable):
            cache.fetch(CutOff(), "agent-a", listing, 4096)
        ref, fetched = cache.fetch(link, "agent-a", listing, 4096)
    finally:
        link.close()
        service.request_stop()
        thread.join(5)
    assert fetched == sum(entry["size"] for entry in listing["files"]) - 3 * 4096
    assert ref.version == "1" and cache.registry.verify(ref).ok and cache.has(listing)
