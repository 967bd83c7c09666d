"""`edge-train demo`: the whole product on a synthetic floor, in one command.

1. a synthetic training lot -> validate -> train -> export -> publish, signed, into the registry -> production
2. the fleet collector and an edge agent start as their own processes with real keys (the agent follows
   production and serves only packages signed by the demo trainer key; drift windows travel over CURVE; reload
   and rollback only on its CURVE control socket)
3. a second lot with a drifting site and a cluster of latent outliers streams through the client library
4. the collector's incidents (the drifting site, diagnosed, and the retrain advice), what the agent found
   (outliers, PAT vs model, latency), and the fleet report
5. a canary: a version retrained on the second lot is deployed to one of two testers through the registry service
   (packages fetched over CURVE into each agent's cache, verified), a few hundred parts stream through both, the
   audit tells which version decided where, the gate judges the canary, and the group is rolled back
"""
from __future__ import annotations

import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from edge_agent.client import AgentClient
from edge_agent.collector.evidence import Thresholds, judge
from edge_agent.collector.lifecycle import where_version_ran
from edge_agent.collector.report import write_report
from edge_agent.keys import create_curve_pair, create_signing_key, load_signing_key, load_trusted_keys
from edge_agent.package.deployment import deploy, rollback_group
from edge_agent.package.registry import Registry
from edge_agent.package.signing import Trust
from edge_agent.processes import free_tcp_endpoint, start_agent, start_collector, start_registry_service, stop
from trainer.ingest import load_tables
from trainer.package import build_and_publish
from trainer.registry_cli import package_summary
from trainer.replay import feature_columns, plan_from_table, stream_lot
from trainer.synth import DATALOG_PATHOLOGIES, SynthConfig, write
from trainer.train import TrainConfig, fit

WINDOW_PARTS = 1000       # small windows so a demo lot of a few thousand parts yields several per site
SHOWN = 5
# Lots differ (lot speed, per-test lot offsets), so a model trained on one lot sees the next as drifted.
TRAINING_LOTS = 3


def run_demo(workdir: str | None, *, parts: int, tests: int, stream_parts: int, seed: int, registry_root: str,
             name: str) -> int:
    # Every configuration first: a bad --stream-parts must not wait for the training to fail.
    # Real datalogs' pathologies on (quantized tests, stop-on-fail, sampled datalogs, lot-to-lot spread, sublots):
    # what static PAT, the coverage rules and the explanations are for.
    training = SynthConfig(seed=seed, parts=parts, tests=tests, lots=TRAINING_LOTS, excursions=("latent_outliers",),
                           **DATALOG_PATHOLOGIES)
    # Same product and floor (seed), the next lot off the line: what the model sees after training.
    streamed = SynthConfig(seed=seed, parts=stream_parts, tests=tests, lots=1, first_lot_index=TRAINING_LOTS + 1,
                           excursions=("drifting_site", "latent_outliers"), **DATALOG_PATHOLOGIES)
    train = TrainConfig(name=name, seed=seed).check()
    work = Path(workdir or tempfile.mkdtemp(prefix="edge-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    keys = _demo_keys(work / "keys")
    trusted = keys / "demo-trainer.ed25519.pub"   # what the agent trusts; the summary below checks against it too
    registry = Registry(registry_root, Trust(load_trusted_keys(trusted), str(trusted)))

    _step(f"1/5 training data: {TRAINING_LOTS} lots, {parts:,} parts x {tests} tests, train, export, publish to "
          f"{registry.root}/{name}")
    training_lot = work / "training_lot.parquet"
    print(write(training, str(training_lot)).describe())
    table, report = load_tables([str(training_lot)])
    trained = fit(table, train)
    ref = build_and_publish(trained, table, report.to_dict(), registry, [str(training_lot)],
                            signer=load_signing_key(keys / "demo-trainer.ed25519"))
    registry.promote(ref.name, ref.version, "production", reason="edge-train demo")
    print(package_summary(registry, ref))

    _step(f"2/5 second lot ({stream_parts:,} parts, drifting site + latent outliers); collector and agent start")
    stream_path = work / "stream_lot.parquet"
    print(write(streamed, str(stream_path)).describe())
    # Every part goes to the agent, those without readings too: the agent, not the trainer, must handle them here.
    stream_table, _ = load_tables([str(stream_path)], keep_sparse_parts=True)
    db = work / "fleet.sqlite"
    collector_endpoint, agent_endpoint = free_tcp_endpoint(), free_tcp_endpoint()
    agent_config = work / "agent.toml"
    agent_config.write_text(f'[drift]\nagent_id = "demo-agent"\ntester = "demo-tester"\n'
                            f'collector = "{collector_endpoint}"\nwindow_parts = {WINDOW_PARTS}\n'
                            f'spool_dir = "{work / "spool"}"\n'
                            f'[security]\nkey = "{keys / "demo-agent.key_secret"}"\n'
                            f'collector_key = "{keys / "collector.key"}"\n'
                            f'trusted_keys = "{keys / "demo-trainer.ed25519.pub"}"\n'
                            f'control_bind = "{free_tcp_endpoint()}"\ncontrol_keys = "{keys / "operators"}"\n')
    collector = start_collector(db, collector_endpoint, "--key", str(keys / "collector.key_secret"), "--agent-keys",
                                str(keys / "agents"), log_path=work / "collector.log")
    try:
        agent = start_agent(registry.root, name, agent_endpoint, "--config", str(agent_config),
                            log_path=work / "agent.log")
        try:
            _step(f"3/5 streaming {len(stream_table):,} parts through edge_agent.client to {agent_endpoint}")
            with AgentClient(agent_endpoint, timeout_ms=50) as client:
                summary = stream_lot(client, stream_table, feature_columns(registry_root, name))
                health = client.health(timeout_ms=2000)
                agent_side = health["latency_us"]
            # Parts with too few readings stay out of the drift statistics. The full windows are stored before the
            # agent stops (what a stopping agent cannot ship within its stop timeout waits in its spool for its
            # next start); the last, partial one is shipped as it stops.
            counted = summary["decided"] - summary["insufficient_readings"]
            _wait_for_windows(db, expected=counted // WINDOW_PARTS, timeout_s=120.0)
        finally:
            stop(agent)
        _wait_for_windows(db, expected=-(-counted // WINDOW_PARTS))
    finally:
        stop(collector)

    _step("4/5 results")
    _print_incidents(db)
    _print_security(health)
    _print_findings(summary, agent_side, stream_table)
    html = work / "fleet_report.html"
    write_report(db, html)
    print(f"\nfleet report: {html}")

    _step("5/5 canary: a version retrained on the second lot, on one of two testers, through the registry service")
    _canary(registry, name, seed, stream_path, stream_table, keys, work, db)
    print(f"\nagent, collector and registry service logs, data, spools and caches: {work}")
    return 0


CANARY_PARTS = 600
CANARY_POLL_S = 1.0       # how often the demo's agents ask the registry service (default 10 s)
CANARY_AGENTS = ("demo-agent", "demo-agent-2")


def _canary(registry: Registry, name: str, seed: int, stream_path: Path, stream_table, keys: Path, work: Path,
            db: Path) -> None:
    """Publish a retrained version, deploy it to demo-agent-2 only (demo-agent stays on production), stream parts
    through both, then show the audit, the gate and an instant rollback of the canary group."""
    table, report = load_tables([str(stream_path)])
    retrained = fit(table, TrainConfig(name=name, seed=seed + 1, n_trees=100, yield_trees=50).check())
    ref = build_and_publish(retrained, table, report.to_dict(), registry, [str(stream_path)],
                            signer=load_signing_key(keys / "demo-trainer.ed25519"))
    print(f"published {ref} (retrained on the second lot), a candidate")
    collector_endpoint, service_endpoint = free_tcp_endpoint(), free_tcp_endpoint()
    curve_server = ("--key", str(keys / "collector.key_secret"), "--agent-keys", str(keys / "agents"))
    collector = start_collector(db, collector_endpoint, *curve_server, log_path=work / "collector.log")
    service = start_registry_service(registry.root, service_endpoint, *curve_server, log_path=work / "service.log")
    processes, endpoints = [], {}
    config = work / "canary-agent.toml"
    config.write_text(f"[fleet]\npoll_interval_s = {CANARY_POLL_S}\n[audit]\nbatch_seconds = 1.0\n")
    try:
        deploy(registry, name, "canary", ref.version, "demo: retrained on the drifted lot", agents=(CANARY_AGENTS[1],))
        for number, agent_id in enumerate(CANARY_AGENTS):
            endpoints[agent_id] = free_tcp_endpoint()
            processes.append(start_agent(
                work / f"cache-{agent_id}", name, endpoints[agent_id], "--agent-id", agent_id, "--tester",
                f"demo-tester-{'ab'[number]}", "--collector", collector_endpoint, "--registry-service",
                service_endpoint, "--service-key", str(keys / "collector.key"), "--cache-dir",
                str(work / f"cache-{agent_id}"), "--key", str(keys / f"{agent_id}.key_secret"), "--collector-key",
                str(keys / "collector.key"), "--trusted-keys", str(keys / "demo-trainer.ed25519.pub"),
                "--spool-dir", str(work / f"spool-{agent_id}"), "--config", str(config),
                log_path=work / f"{agent_id}.log"))
        rows = plan_from_table(stream_table, feature_columns(registry.root, name)).readings[:CANARY_PARTS]
        for i, row in enumerate(rows):
            agent_id = CANARY_AGENTS[i // 2 % 2]   # pairs: every other part of the sampled datalog has no readings
            with AgentClient(endpoints[agent_id], timeout_ms=2000) as client:
                client.score(row, {"lot": "CANARY", "wafer": 1, "x": i, "y": 0, "part_id": f"C-{i:04d}"})
        for agent_id in CANARY_AGENTS:
            with AgentClient(endpoints[agent_id]) as client:
                health = client.health(timeout_ms=2000)
            fleet = health["lifecycle"]["fleet"]
            print(f"{agent_id}: group {fleet['group']}, serving {name}/{health['model']['version']} fetched from the "
                  f"registry service ({fleet['fetched_bytes']:,} bytes, cache {fleet['cached_versions']})")
        _wait_for_rows(db, "SELECT count(*) FROM decisions WHERE lot = 'CANARY'", CANARY_PARTS)
        with sqlite3.connect(db) as connection:
            print("audit (edge-collector audit --model): where each version decided")
            for row in where_version_ran(connection, name, None):
                print(f"  {name}/{row[0]} on {row[1]} ({row[2]}): {row[3]} parts")
            _, lines = judge(connection, name, ref.version, Thresholds(min_parts=CANARY_PARTS // 6))
        print("\n".join(lines))
        start = time.monotonic()
        rollback_group(registry, name, "canary", "demo: rolled back after the gate")
        with AgentClient(endpoints[CANARY_AGENTS[1]]) as client:
            while client.health(timeout_ms=2000)["model"]["version"] == ref.version and time.monotonic() - start < 30:
                time.sleep(0.05)
        print(f"canary group rolled back: {CANARY_AGENTS[1]} serves production again after "
              f"{time.monotonic() - start:.2f} s (its next poll, at most {CANARY_POLL_S:g} s, then a load from its "
              "cache: nothing fetched)")
    finally:
        for process in processes:
            stop(process)
        stop(service)
        stop(collector)


def _wait_for_rows(db: Path, query: str, expected: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with sqlite3.connect(db) as connection:
            if connection.execute(query).fetchone()[0] >= expected:
                return
        time.sleep(0.2)


def _demo_keys(folder: Path) -> Path:
    """The demo floor's keys (docs/security.md): the trainer's signing key, the collector's and the agent's CURVE
    pairs (a second agent for the canary), an operator's control key; the collector's allow-list (which the registry
    service shares) binds each agent's key to its id."""
    create_signing_key(folder, "demo-trainer")
    for name in ("collector", *CANARY_AGENTS, "demo-operator"):
        create_curve_pair(folder, name)
    for allow_list, names in (("agents", CANARY_AGENTS), ("operators", ("demo-operator",))):
        (folder / allow_list).mkdir()
        for name in names:
            shutil.copy(folder / f"{name}.key", folder / allow_list / f"{name}.key")
    return folder


def _print_security(health: dict) -> None:
    signature, security = health["model"]["signature"], health["security"]
    print(f"security: {health['model']['name']}/{health['model']['version']} {signature['status']}, signed by key "
          f"{signature['key_id']}; drift windows over {security['upstream']}; control socket "
          f"{security['control_socket']} (CURVE, operator keys only); score socket {security['score_socket']}")


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _print_findings(summary: dict, agent_side: dict, table) -> None:
    decided = summary["decided"]
    print(f"parts scored: {decided:,} of {summary['parts']:,}; no decision: {summary['no_decision'] or 'none'}")
    print(f"bins recommended: {summary['bins']}")
    print(f"parts with readings for too few of the model's tests (sampled datalog, stop-on-fail): "
          f"{summary['insufficient_readings']:,}, binned insufficient_readings, never scored as a median part")
    frame = table.frame
    if "truth_excursion" in frame.columns:
        truth = frame["truth_excursion"].to_numpy(str)
        logged = frame[table.test_columns].notna().any(axis=1).to_numpy()
        latent = frame["part_id"].astype(str).to_numpy()[(truth == "latent_outliers") & logged]
        flagged_ids = {p["part_id"] for p in summary["ml_outlier_parts"]}
        found = sum(pid in flagged_ids for pid in latent)
        print(f"ground truth: {len(latent)} latent outliers with readings (inside every limit), {found} flagged by "
              f"the ML outlier model ({found / max(len(latent), 1):.0%})")
        drifting = frame.loc[truth == "drifting_site", ["head", "site"]].drop_duplicates().to_numpy()
        for head, site in drifting:
            print(f"ground truth: head {head} site {site} drifts late in the lot (the collector should point at it)")
    print("most anomalous parts (lowest outlier score):")
    for part in summary["most_anomalous"][:SHOWN]:
        print(f"  wafer {part.get('wafer')} x={part.get('x')} y={part.get('y')} site {part.get('site')} "
              f"part {part.get('part_id')}: score {part['outlier_score']:.4f}")
    print(f"PAT and the model: both flagged {summary['pat_and_ml_outlier']}, ML outlier only "
          f"{len(summary['ml_outlier_only'])} (inside every PAT limit), PAT only {len(summary['pat_only'])}")
    for part in summary["pat_only"][:SHOWN]:
        print(f"  PAT only: part {part.get('part_id')} site {part.get('site')} broke {', '.join(part['tests'][:4])}")
    for part in summary["ml_outlier_only"][:SHOWN]:
        print(f"  ML only: part {part.get('part_id')}: {part['why']}")
    rt = summary["round_trip_us"]
    print(f"latency per part, test program's view (round trip): p50 {rt['p50']:.0f} us, p99 {rt['p99']:.0f} us, "
          f"max {rt['max']:.0f} us; agent's own processing: p50 {agent_side['p50']:.0f} us, "
          f"p99 {agent_side['p99']:.0f} us")


def _wait_for_windows(db: Path, expected: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if db.exists():
            with sqlite3.connect(db) as connection:
                if connection.execute("SELECT COUNT(*) FROM windows").fetchone()[0] >= expected:
                    return
        time.sleep(0.2)


def _print_incidents(db: Path) -> None:
    """The collector's incidents (scope, diagnosis, what to do, retrain or not), then the raw alerts it folded
    into them: a new lot differs from the training lots on many tests at every site, which pages nobody."""
    with sqlite3.connect(db) as connection:
        windows = connection.execute("SELECT COUNT(*) FROM windows").fetchone()[0]
        incidents = connection.execute("SELECT id, status, summary, recommendation FROM incidents "
                                       "ORDER BY status DESC, id").fetchall()
        by_kind = connection.execute("SELECT kind, COUNT(*) FROM alerts GROUP BY kind ORDER BY 2 DESC").fetchall()
    print(f"collector: {len(incidents)} incident(s) from {windows} drift windows")
    for number, status, summary, recommendation in incidents:
        print(f"  #{number} ({status}) {summary}\n     {recommendation}")
    print("raw drift evidence and operational alerts stored beside them: "
          + (", ".join(f"{kind} {count}" for kind, count in by_kind) or "none"))
