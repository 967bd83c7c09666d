"""Cost of streaming drift per scored part: in process on the agent's own calls, and end to end.

``drift.update_us_per_part``: ``DriftMonitor.update`` (the fused kernel) alone. ``drift.hook_us_per_part``:
what the agent's drift hook does per part - ``update`` and ``maybe_close``, and once per window ``close``
(copies the counts) and ``Shipper.submit`` - with the shipper thread running as in the agent (it builds the
message, ``to_payload``, timed apart, and spools it to disk; no collector listens), parts paced at ``--rate``
so the shipper's work competes with the hook as often as it would on a fast tester.

End to end (``--end-to-end``): the real ``Agent`` serving a 200-test package (200-tree Isolation Forest,
100-tree random forest) in its own process, once without a drift hook and once with ``AgentDrift`` shipping
to a real collector process; this process is the test program (``AgentClient``, one part after the other).
Runs alternate off/on twice so that a drifting machine load hits both alike.

    python -m bench.drift_cost [--tests 200] [--sites 4] [--parts 50000] [--rate 5000] [--quick] [--end-to-end]

Figures in microseconds; ``timer_overhead_us`` (one perf_counter_ns pair) is included in every per-part
figure and not subtracted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np

from edge_agent.drift import DriftMonitor, DriftReference
from edge_agent.shipping import DiskSpool, Shipper
from edge_agent.upstream import DriftConfig
from trainer.reference import drift_reference

DEFAULT_WINDOW_PARTS = DriftConfig().window_parts
REFERENCE_ROWS = 5000
MISSING = 0.002


def run(tests: int = 200, sites: int = 4, parts: int | None = None, quick: bool = False,
        window_parts: int = DEFAULT_WINDOW_PARTS, rate: float = 5000.0) -> dict:
    """Two loops over the same parts: the kernel alone (``DriftMonitor.update``, as fast as it goes), then
    the agent's whole hook with the shipper running, paced at ``rate`` parts per second."""
    parts = parts or (5_000 if quick else 50_000)
    rng = np.random.default_rng(0)
    columns = [f"{1000 + i}:T{i}" for i in range(tests)]
    reference_scores = rng.normal(0.1, 0.03, REFERENCE_ROWS)
    threshold = float(np.quantile(reference_scores, 0.01))
    manifest = {"name": "bench", "version": "1", "features": [{"column": c} for c in columns],
                "drift_reference": drift_reference(rng.normal(size=(REFERENCE_ROWS, tests)), columns,
                                                   reference_scores, threshold)}
    reference = DriftReference.from_manifest(manifest)
    rows = rng.normal(size=(parts, tests)).astype(np.float32)
    rows[rng.random(rows.shape) < MISSING] = np.nan
    scores = rng.normal(0.1, 0.03, parts).tolist()
    sites_of = [1 + i % sites for i in range(parts)]
    model = {"name": "bench", "version": "1", "checksum": "-"}
    clock = time.perf_counter_ns

    monitor = DriftMonitor(reference, model, window_parts=parts + 1, window_seconds=3600.0)
    update_ns = np.empty(parts, dtype=np.int64)
    for i in range(parts):
        start = clock()
        monitor.update(1, sites_of[i], rows[i], scores[i], scores[i] < threshold)
        update_ns[i] = clock() - start

    spool_dir = tempfile.mkdtemp(prefix="edge-drift-bench-")
    shipper = Shipper(_unused_endpoint(), DiskSpool(spool_dir), agent_id="bench", tester="bench")
    shipper.start()
    monitor = DriftMonitor(reference, model, window_parts=window_parts, window_seconds=3600.0)
    hook_ns = np.empty(parts, dtype=np.int64)
    close_ns, last_window = [], None
    interval_ns, due = int(1e9 / rate), clock()
    try:
        for i in range(parts):
            due += interval_ns
            while clock() < due:     # a tester sends parts at its pace: spin, sleep() wakes too late
                pass
            start = clock()
            monitor.update(1, sites_of[i], rows[i], scores[i], scores[i] < threshold)
            updated = clock()
            window = monitor.maybe_close()
            if window is not None:
                shipper.submit(window)
                close_ns.append(clock() - updated)
                last_window = window
            hook_ns[i] = clock() - start
        build_ms, sizes = [], []
        for _ in range(5 if last_window is not None else 0):
            start = time.perf_counter()
            payload = last_window.to_payload()
            build_ms.append((time.perf_counter() - start) * 1e3)
            sizes.append(len(msgpack.packb(payload, use_bin_type=True)))
    finally:
        shipper.stop(timeout_s=0.0)
        shutil.rmtree(spool_dir, ignore_errors=True)
    overhead = min(_timer_pair(clock) for _ in range(1000))
    return {
        "drift.tests": tests, "drift.sites": sites, "drift.parts": parts, "drift.window_parts": window_parts,
        "drift.update_us_per_part": _summary(update_ns),
        "drift.hook_rate_parts_per_s": rate,
        "drift.hook_us_per_part": _summary(hook_ns),
        "drift.window_close_us": _summary(np.array(close_ns)) if close_ns else None,
        "drift.windows": len(close_ns),
        "drift.message_build_ms_off_path": round(float(np.mean(build_ms)), 2) if build_ms else None,
        "drift.message_bytes": int(np.mean(sizes)) if sizes else None,
        "timer_overhead_us": round(overhead / 1e3, 3),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_1min": round(os.getloadavg()[0], 2)},
    }


def end_to_end(parts: int | None = None, quick: bool = False, tests: int = 200,
               window_parts: int = DEFAULT_WINDOW_PARTS) -> dict:
    """Round-trip and in-agent latency per part with drift off and on (see the module docstring)."""
    from bench.e2e_latency import WARM_UP_PARTS, publish_package, stop_agent, synthetic_table
    from edge_agent.client import AgentClient
    from trainer.registry import PackageRef, Registry

    parts = parts or (2_000 if quick else 20_000)
    root = Path(tempfile.mkdtemp(prefix="edge-drift-e2e-"))
    collector = None
    try:
        registry = Registry(root / "models")
        ref, _ = publish_package(registry, "drift-bench", synthetic_table(2_000 if quick else 5_000, tests, seed=1),
                                 n_trees=200, yield_trees=100)
        registry.promote(ref.name, ref.version, "production", "drift benchmark")
        columns = [f["column"] for f in registry.manifest(PackageRef(ref.name, ref.version))["features"]]
        stream = synthetic_table(parts + WARM_UP_PARTS, tests, seed=2, lot="L2")
        readings = stream.readings(columns).astype(np.float32)
        identities = [{"lot": "L2", "head": 1, "site": 1 + i % 4} for i in range(len(readings))]
        collector_endpoint = _unused_endpoint()
        collector = subprocess.Popen([sys.executable, "-m", "edge_agent.collector.cli", "run", "--bind",
                                      collector_endpoint, "--db", str(root / "stats.sqlite"), "--metrics-port", "0"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        measured: dict[str, dict[str, list]] = {"off": {"round_trip": [], "agent": []},
                                                "on": {"round_trip": [], "agent": []}}
        half = parts // 2
        for run_number, drift in enumerate(("off", "on", "off", "on")):
            endpoint = _unused_endpoint()
            agent = _start_agent(endpoint, root / "agent.log", "--registry", str(root / "models"), "--model",
                                 ref.name, "--bind", endpoint, "--drift", drift, "--collector", collector_endpoint,
                                 "--spool", str(root / "spool"), "--window-parts", str(window_parts))
            try:
                with AgentClient(endpoint, timeout_ms=1000.0) as client:
                    for i in range(WARM_UP_PARTS):
                        client.score(readings[i], identities[i])
                    first = WARM_UP_PARTS + (run_number // 2) * half
                    for i in range(first, first + half):
                        result = client.score(readings[i], identities[i])
                        measured[drift]["round_trip"].append(result.round_trip_us)
                        measured[drift]["agent"].append(result.agent_us)
            finally:
                stop_agent(agent)
        windows = _stored_windows(root / "stats.sqlite")
    finally:
        if collector is not None:
            collector.send_signal(signal.SIGTERM)
            collector.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)
    figures = {"e2e.parts_per_setting": 2 * half, "e2e.tests": tests, "e2e.window_parts": window_parts,
               "e2e.windows_stored_by_collector": windows}
    for drift, series in measured.items():
        for name, values in series.items():
            values = np.array([v for v in values if v is not None], dtype=np.float64)
            figures[f"e2e.drift_{drift}.{name}_us"] = {
                "p50": round(float(np.percentile(values, 50)), 1), "p99": round(float(np.percentile(values, 99)), 1),
                "p99.9": round(float(np.percentile(values, 99.9)), 1), "max": round(float(values.max()), 1)}
    return figures


def _start_agent(endpoint: str, log_path: Path, *argv: str) -> subprocess.Popen:
    """``serve_agent`` in its own process, returned once it answers a health request."""
    from edge_agent.client import AgentClient, AgentUnavailable
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "bench.drift_cost", "serve-agent", *argv], stdout=log,
                                   stderr=subprocess.STDOUT)
    with AgentClient(endpoint) as client:
        for _ in range(600):
            if process.poll() is not None:
                raise RuntimeError(f"the agent exited ({process.returncode}): {log_path.read_text()[-3000:]}")
            try:
                client.health(timeout_ms=200)
                return process
            except AgentUnavailable:
                continue
    process.kill()
    raise RuntimeError(f"the agent did not answer; log {log_path}")


def _stored_windows(db: Path) -> int:
    import sqlite3
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT count(*) FROM windows").fetchone()[0]


def serve_agent(argv: list[str]) -> int:
    """The agent process of ``end_to_end``: the real Agent, with or without the drift hook wired in."""
    from edge_agent.config import load_config
    from edge_agent.scoring import load_package
    from edge_agent.server import Agent
    from edge_agent.upstream import AgentDrift, DriftConfig
    from trainer.registry import Registry

    parser = argparse.ArgumentParser()
    for option in ("--registry", "--model", "--bind", "--drift", "--collector", "--spool", "--window-parts"):
        parser.add_argument(option, required=True)
    args = parser.parse_args(argv)
    config = load_config(None, {"registry": args.registry, "model": args.model, "bind": args.bind,
                                "metrics.port": 0})
    registry = Registry(config.registry)
    model = load_package(registry, registry.resolve(config.model, stage=config.stage))
    drift = None
    if args.drift == "on":
        drift = AgentDrift(DriftConfig(agent_id="bench-agent", collector=args.collector, spool_dir=args.spool,
                                       window_parts=int(args.window_parts)))
        drift.start(model)
    agent = Agent(config, registry, model, drift=drift)
    signal.signal(signal.SIGTERM, agent.request_stop)
    try:
        agent.serve()
    finally:
        if drift is not None:
            drift.stop(timeout_s=5.0)
    return 0


def _timer_pair(clock) -> int:
    start = clock()
    return clock() - start


def _summary(nanoseconds: np.ndarray) -> dict:
    us = nanoseconds / 1e3
    return {"p50": round(float(np.percentile(us, 50)), 2), "p99": round(float(np.percentile(us, 99)), 2),
            "mean": round(float(us.mean()), 2), "max": round(float(us.max()), 1)}


def _unused_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-agent"]:
        return serve_agent(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.drift_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--parts", type=int, default=None)
    parser.add_argument("--window-parts", type=int, default=DEFAULT_WINDOW_PARTS)
    parser.add_argument("--rate", type=float, default=5000.0, help="parts per second for the hook loop")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--end-to-end", action="store_true", help="also measure the agent with drift off and on")
    args = parser.parse_args(argv)
    figures = run(args.tests, args.sites, args.parts, args.quick, args.window_parts, args.rate)
    if args.end_to_end:
        figures.update(end_to_end(None, args.quick, args.tests, args.window_parts))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
