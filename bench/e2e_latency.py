"""End-to-end latency of one part: test program (client) -> edge agent (its own process) -> reply.

The agent serves a package of 200 tests with a 200-tree Isolation Forest and a 100-tree random-forest yield
model. This process is the test program: it calls ``AgentClient.score`` once per part, open loop. Part i is
due at ``start + i / rate``; a call starts at its due time, or at once when the previous call ran late, and
its latency counts from the due time, so one stall shows in every part it delays (no coordinated omission).

    python -m bench.e2e_latency --rate 1000 --parts 20000 --transport tcp
    python -m bench.e2e_latency --quick

``measure_open_loop`` is one test program waiting for each decision (a part due while the previous call is
still out starts late, and that lateness counts); ``measure_pipelined`` sends every part at its due time
whatever is still in flight (parts of several sites or testers), so the offered rate holds: edge-bench's e2e
section (``bench.latency_suite``) uses it.

Figures: ``e2e.<transport>.rate_<rate>.p50_us`` etc. (from the due time), ``...round_trip.p50_us`` (send to
reply, what one call costs), ``...agent.p50_us`` (the agent's own processing time, in its reply) and
``...late_start.p50_us`` (how late calls started: a slow previous call, or this process not scheduled).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from bench.keys import BenchKeys
from bench.open_loop import dealer, scheduled_figures, send_on_schedule
from edge_agent.client import AgentClient
from edge_agent.keys import SigningKey
from edge_agent.package.registry import PackageRef, Registry
from edge_agent.processes import free_tcp_endpoint, start_agent, stop
from edge_agent.wire.score import PROTOCOL_VERSION, SCORE
from trainer.table import ParametricTable, TestMeta, test_column_name

MODEL = "bench"
TARGET_P99_US = 1000.0
WARM_UP_PARTS = 500
SPIN_BEFORE_DUE_S = 100e-6   # sleep until this long before a part is due, then spin: sleep() wakes late


def synthetic_table(n_parts: int, n_tests: int, seed: int, lot: str = "L1", product_seed: int = 0) -> ParametricTable:
    """Parts with correlated normal readings (a few latent factors), limits, pass/fail and a yield label.

    ``product_seed`` fixes the product (test centres, spreads, correlations, limits); ``seed`` draws its parts,
    so tables with one product seed are lots of the same product.
    """
    product = np.random.default_rng(product_seed)
    loadings = product.normal(scale=0.7, size=(4, n_tests))
    centre, spread = product.uniform(0.5, 5.0, n_tests), product.uniform(0.01, 0.2, n_tests)
    scale = np.sqrt(np.sum(loadings ** 2, axis=0) + 1.0)   # standard deviation of each test's z below
    rng = np.random.default_rng([product_seed, seed])
    factors = rng.normal(size=(n_parts, 4))
    z = (factors @ loadings + rng.normal(size=(n_parts, n_tests))) / scale
    values = centre + spread * z
    values[rng.random(values.shape) < 0.002] = np.nan   # a test that did not run
    low, high = centre - 3.7 * spread, centre + 3.7 * spread
    with np.errstate(invalid="ignore"):
        passed = ~np.any((values < low) | (values > high), axis=1)
    fail_risk = 1.0 / (1.0 + np.exp(-(factors[:, 0] + factors[:, 1] - 3.0)))
    final_pass = passed & (rng.random(n_parts) > fail_risk)
    tests = [TestMeta(column=test_column_name(1000 + i, f"T{i}"), name=f"T{i}", number=1000 + i, units="V",
                      low=float(low[i]), high=float(high[i])) for i in range(n_tests)]
    identity = pd.DataFrame({
        "lot": lot, "wafer": "1", "x": np.arange(n_parts) % 40, "y": np.arange(n_parts) // 40, "head": 1,
        "site": 1 + np.arange(n_parts) % 4, "part_id": [str(i + 1) for i in range(n_parts)],
        "passed": passed, "final_pass": final_pass})
    readings = pd.DataFrame(values, columns=[t.column for t in tests])
    return ParametricTable(pd.concat([identity, readings], axis=1), tests, [f"synthetic seed {seed}"])


def publish_package(registry: Registry, name: str, table: ParametricTable, *, n_trees: int, yield_trees: int,
                    seed: int = 0, signer: SigningKey | None = None):
    """Train both models on ``table``, build the package and publish it (signed by ``signer``); returns (ref,
    trained models)."""
    from trainer.package import build_package
    from trainer.train import TrainConfig, fit
    config = TrainConfig(name=name, n_trees=n_trees, yield_trees=yield_trees, seed=seed)
    trained = fit(table, config, progress=lambda message: None)
    files, manifest = build_package(trained, table, {}, [])
    return registry.publish(name, files, manifest, reason="benchmark / test package", signer=signer), trained


def build_bench_package(registry_root: Path, quick: bool, n_tests: int = 200, n_trees: int = 200,
                        yield_trees: int = 100, signer: SigningKey | None = None) -> dict:
    """Train and publish the benchmark package ``MODEL`` (signed by ``signer``, promoted to production); what it
    holds."""
    registry = Registry(registry_root)
    build_start = time.perf_counter()
    train = synthetic_table(2_000 if quick else 5_000, n_tests, seed=1)
    ref, _ = publish_package(registry, MODEL, train, n_trees=n_trees, yield_trees=yield_trees, signer=signer)
    registry.promote(MODEL, ref.version, "production", "benchmark")
    return {"tests": n_tests, "outlier_trees": n_trees, "yield_trees": yield_trees, "train_parts": len(train),
            "build_s": round(time.perf_counter() - build_start, 1)}


def package_stream(registry_root: Path, n_parts: int, n_tests: int = 200) -> tuple[np.ndarray, list[dict]]:
    """``n_parts`` parts of another lot of the product, in the feature order of ``MODEL``'s production version,
    with their identities."""
    registry = Registry(registry_root)
    ref = registry.resolve(MODEL, stage="production")
    stream = synthetic_table(n_parts, n_tests, seed=2, lot="L2")
    columns = registry.manifest(PackageRef(MODEL, ref.version)).columns
    readings = stream.readings(columns).astype(np.float32)
    identities = [{"lot": "L2", "wafer": "1", "x": i % 40, "y": i // 40, "head": 1, "site": 1 + i % 4,
                   "part_id": str(i)} for i in range(len(readings))]
    return readings, identities


def run(rate: float = 1000.0, parts: int | None = None, transport: str = "tcp", quick: bool = False,
        n_tests: int = 200, n_trees: int = 200, yield_trees: int = 100, workdir: str | None = None,
        reload_every_s: float | None = None) -> dict:
    """Build the package, start the agent, stream ``parts`` parts at ``rate`` per second; latency figures.

    ``reload_every_s``: meanwhile the agent is asked for a reload (SIGHUP) this often, so it verifies and loads
    the package again in its background thread (keys then end in ``.with_reloads``).
    """
    parts = parts or (3_000 if quick else 20_000)
    own_dir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="edge-bench-", dir="/tmp") if own_dir else workdir)
    try:
        return _run(root, rate, parts, transport, quick, n_tests, n_trees, yield_trees, reload_every_s)
    finally:
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)


def _run(root: Path, rate: float, parts: int, transport: str, quick: bool, n_tests: int, n_trees: int,
         yield_trees: int, reload_every_s: float | None) -> dict:
    keys = BenchKeys.create(root / "keys")
    package = build_bench_package(root / "models", quick, n_tests, n_trees, yield_trees, signer=keys.signer)
    readings, identities = package_stream(root / "models", parts + WARM_UP_PARTS, n_tests)

    if transport == "tcp":
        endpoint = free_tcp_endpoint()
    elif transport == "ipc":
        endpoint = f"ipc://{root}/agent.sock"
    else:
        raise ValueError(f"transport must be 'tcp' or 'ipc', got {transport!r}")
    agent = start_agent(root / "models", MODEL, endpoint, "--log-level", "WARNING", *keys.agent_args(curve=False),
                        log_path=root / "agent.log")
    try:
        with AgentClient(endpoint, timeout_ms=100.0) as client:
            load_before = os.getloadavg()[0]
            reloader = _Reloader(agent, reload_every_s) if reload_every_s else None
            measured = measure_open_loop(client, readings, identities, rate)
            if reloader is not None:
                reloader.finish()
            load_after = os.getloadavg()[0]
            health = client.health(timeout_ms=10_000)
    finally:
        status = stop(agent)
    key = f"e2e.{transport}.rate_{rate:g}" + (".with_reloads" if reload_every_s else "")
    figures = {
        **open_loop_figures(key, measured),
        **({f"{key}.reloads": health["reloads"]} if reload_every_s else {}),
        "agent.health_latency_us": {k: v for k, v in health["latency_us"].items() if k != "buckets"},
        "agent.exit_status": status,
        "package": package,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    # Other work on the machine shows in the tail: judge the figures with the load beside them.
                    "load_average_1min_before": round(load_before, 2), "load_average_1min_after": round(load_after, 2)},
    }
    return figures


def measure_open_loop(client: AgentClient, readings: np.ndarray, identities: list[dict], rate: float) -> dict:
    """Score the first ``WARM_UP_PARTS`` rows unmeasured, then the rest open loop at ``rate`` (see the module
    docstring); the raw per-part arrays, for ``open_loop_figures`` and for plots."""
    for i in range(WARM_UP_PARTS):
        client.score(readings[i], identities[i])
    # This process trained the models: a full collection of its heap would stall the "test program"
    # for tens of ms. A real test program is small; freeze what exists so only new objects are collected.
    gc.collect()
    gc.freeze()
    return _open_loop(client, readings[WARM_UP_PARTS:], identities[WARM_UP_PARTS:], rate)


def measure_pipelined(client: AgentClient, readings: np.ndarray, identities: list[dict], rate: float,
                      drain_timeout_s: float = 2.0) -> dict:
    """Like ``measure_open_loop``, but part i is sent at its due time whether or not earlier replies arrived
    (requests in flight overlap, as parts from several sites or testers do): the offered rate holds even above
    what one waiting caller achieves. Replies are matched by request id; an error reply (a saturated agent sheds
    load: overloaded, deadline_exceeded) counts under its code, a part without a reply ``drain_timeout_s`` after
    the last send under ``no_decision["timeout"]``; latency figures are of scored parts. Same figures."""
    for i in range(WARM_UP_PARTS):
        client.score(readings[i], identities[i])
    gc.collect()
    gc.freeze()
    readings, identities = readings[WARM_UP_PARTS:], identities[WARM_UP_PARTS:]
    n = len(readings)
    socket = dealer(client.endpoint)
    try:
        sent = send_on_schedule([socket], np.arange(n) / rate, np.zeros(n, dtype=int),
                                lambda i, rid: score_message(rid, readings[i], identities[i]), drain_timeout_s)
    finally:
        socket.close(linger=0)
    return scheduled_figures(sent)


def score_message(rid: int, readings: np.ndarray, part: dict) -> dict:
    """A score request as the client library sends it: readings as little-endian float32 bytes (PROTOCOL.md)."""
    return {"v": PROTOCOL_VERSION, "type": SCORE, "id": rid, "readings": np.asarray(readings, "<f4").tobytes(),
            "part": part}


def open_loop_figures(key: str, measured: dict) -> dict:
    """The figures of one ``measure_open_loop`` run under ``key`` (e.g. ``e2e.tcp.rate_1000``)."""
    e2e, round_trip, agent_us = measured["from_due_us"], measured["round_trip_us"], measured["agent_us"]
    return {
        f"{key}.parts": len(e2e),
        f"{key}.achieved_rate": round(measured["achieved_rate"], 1),
        **_percentiles(f"{key}", e2e),
        **_percentiles(f"{key}.round_trip", round_trip),
        **_percentiles(f"{key}.agent", agent_us),
        # How late calls started (a slow previous call, or this process not scheduled in time).
        **_percentiles(f"{key}.late_start", e2e - round_trip),
        f"{key}.no_decision": measured["no_decision"],
        f"{key}.meets_target_p99_under_1ms": bool(np.percentile(e2e, 99) < TARGET_P99_US),
    }


def _open_loop(client: AgentClient, readings: np.ndarray, identities: list[dict], rate: float) -> dict:
    n = len(readings)
    from_due = np.empty(n)
    round_trip = np.empty(n)
    agent_us = np.full(n, np.nan)
    no_decision: Counter[str] = Counter()
    interval = 1.0 / rate
    start = time.perf_counter() + 0.01
    for i in range(n):
        due = start + i * interval
        now = time.perf_counter()
        if due - now > SPIN_BEFORE_DUE_S:
            time.sleep(due - now - SPIN_BEFORE_DUE_S)
        while time.perf_counter() < due:
            pass
        sent = time.perf_counter()
        result = client.score(readings[i], identities[i])
        done = time.perf_counter()
        from_due[i] = (done - due) * 1e6
        round_trip[i] = (done - sent) * 1e6
        if result.decided:
            agent_us[i] = result.agent_us
        else:
            no_decision[result.error_code] += 1
    elapsed = time.perf_counter() - start
    return {"from_due_us": from_due, "round_trip_us": round_trip, "agent_us": agent_us[~np.isnan(agent_us)],
            "no_decision": dict(no_decision), "achieved_rate": n / elapsed}


class _Reloader(threading.Thread):
    """Asks the agent for a reload (SIGHUP, as systemctl reload does) every ``interval_s`` until ``finish``."""

    def __init__(self, agent, interval_s: float):
        super().__init__(daemon=True)
        self.agent, self.interval_s = agent, interval_s
        self._done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._done.wait(self.interval_s):
            self.agent.send_signal(signal.SIGHUP)

    def finish(self) -> None:
        self._done.set()
        self.join()


def _percentiles(prefix: str, values: np.ndarray, points: tuple[float, ...] = (50, 90, 95, 99, 99.9)) -> dict:
    """``<prefix>.p50_us`` (p99.9: ``p999_us``) ... of ``points`` and ``<prefix>.max_us``; {} without values."""
    if len(values) == 0:
        return {}
    at = np.percentile(values, points)
    return {**{f"{prefix}.p{str(point).replace('.', '')}_us": round(float(v), 1) for point, v in zip(points, at)},
            f"{prefix}.max_us": round(float(np.max(values)), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e_latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=1000.0, help="parts per second (default 1000)")
    parser.add_argument("--parts", type=int, default=None, help="parts measured (default 20000, quick 3000)")
    parser.add_argument("--transport", choices=("tcp", "ipc"), default="tcp")
    parser.add_argument("--quick", action="store_true", help="smaller training set and fewer parts")
    parser.add_argument("--workdir", help="keep the registry and the agent's log here")
    parser.add_argument("--reload-every-s", type=float, help="meanwhile ask the agent for a reload this often")
    args = parser.parse_args(argv)
    figures = run(args.rate, args.parts, args.transport, args.quick, workdir=args.workdir,
                  reload_every_s=args.reload_every_s)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
