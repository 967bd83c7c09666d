"""One benchmark site: the benchmark package in a registry, a stream of parts, a real collector, real agents.

Every section that talks to an agent (e2e latency, throughput, footprint, CURVE cost) shares one site, so the
package is trained once per run. Agents are started with ``edge_agent.processes`` exactly as an operator would
start them: trusting only the key that signed the package, drift on (shipping windows to this site's collector)
unless asked for ``--no-drift``, the score socket plain on loopback unless asked for CURVE.
"""
from __future__ import annotations

import itertools
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.e2e_latency import MODEL, WARM_UP_PARTS, build_bench_package, package_stream
from bench.keys import BenchKeys
from edge_agent.client import AgentClient
from edge_agent.processes import free_tcp_endpoint, start_agent, start_collector, stop


class AgentSite:
    """Context manager: ``with AgentSite(quick, parts) as site: agent = site.start_agent("tcp", drift=True)``."""

    def __init__(self, quick: bool, stream_parts: int, n_tests: int = 200, n_trees: int = 200,
                 yield_trees: int = 100, workdir: str | Path | None = None):
        self.quick, self.n_tests = quick, n_tests
        self.n_trees, self.yield_trees = n_trees, yield_trees
        self.stream_parts = stream_parts
        self._own_dir = workdir is None
        self.root = Path(tempfile.mkdtemp(prefix="edge-bench-", dir="/tmp") if workdir is None else workdir)
        self.registry_root = self.root / "models"
        self._names = itertools.count(1)
        self._agents: list[subprocess.Popen] = []
        self.collector: subprocess.Popen | None = None
        self.collector_endpoint = ""
        self.package: dict = {}
        self.readings = np.empty((0, 0), np.float32)
        self.identities: list[dict] = []
        self.keys: BenchKeys | None = None

    def __enter__(self) -> "AgentSite":
        self.root.mkdir(parents=True, exist_ok=True)
        self.keys = BenchKeys.create(self.root / "keys")
        self.package = build_bench_package(self.registry_root, self.quick, self.n_tests, self.n_trees,
                                           self.yield_trees, signer=self.keys.signer)
        self.readings, self.identities = package_stream(self.registry_root, self.stream_parts + WARM_UP_PARTS,
                                                        self.n_tests)
        self.collector_endpoint = free_tcp_endpoint()
        self.collector = start_collector(self.root / "stats.sqlite", self.collector_endpoint,
                                         log_path=self.root / "collector.log")
        return self

    def __exit__(self, *exc) -> None:
        for agent in self._agents:
            stop(agent)
        if self.collector is not None:
            stop(self.collector)
        if self._own_dir:
            shutil.rmtree(self.root, ignore_errors=True)

    def endpoint(self, transport: str) -> str:
        """A fresh endpoint of ``transport`` (tcp loopback or an ipc socket in the work folder)."""
        if transport == "tcp":
            return free_tcp_endpoint()
        if transport == "ipc":
            return f"ipc://{self.root}/agent-{next(self._names)}.sock"
        raise ValueError(f"transport must be 'tcp' or 'ipc', got {transport!r}")

    def start_agent(self, endpoint: str, *extra: str, drift: bool, curve: bool = False) -> subprocess.Popen:
        """``edge-agent run`` on the benchmark package (``extra``: more of its options; ``curve``: a CURVE score
        socket that lets in ``keys.client``); returns once it answers a health request."""
        name = f"agent-{next(self._names)}"
        drift_args = (["--collector", self.collector_endpoint, "--spool-dir", str(self.root / f"{name}.spool")]
                      if drift else ["--no-drift"])
        agent = start_agent(self.registry_root, MODEL, endpoint, *drift_args, "--log-level", "WARNING", *extra,
                            *self.keys.agent_args(curve=curve), log_path=self.root / f"{name}.log",
                            curve=self.keys.client if curve else None)
        self._agents.append(agent)
        return agent

    def stop_agent(self, agent: subprocess.Popen) -> int:
        self._agents.remove(agent)
        return stop(agent)

    def batches(self, size: int) -> list[list[tuple[dict, np.ndarray]]]:
        """The stream cut into ``score_batch`` requests of ``size`` parts."""
        parts = list(zip(self.identities, self.readings))
        return [parts[i:i + size] for i in range(0, len(parts) - size + 1, size)]

    def stored_windows(self) -> int:
        """Drift windows the collector has stored so far."""
        with sqlite3.connect(self.root / "stats.sqlite") as connection:
            return connection.execute("SELECT count(*) FROM windows").fetchone()[0]


def time_to_first_score(site: AgentSite, transport: str = "tcp", *, drift: bool = True
                        ) -> tuple[subprocess.Popen, str, float]:
    """Start an agent and score one part; (agent, endpoint, seconds from process start to the first decision)."""
    endpoint = site.endpoint(transport)
    start = time.perf_counter()
    agent = site.start_agent(endpoint, drift=drift)
    with AgentClient(endpoint, timeout_ms=5_000.0) as client:
        result = client.score(site.readings[0], site.identities[0])
    elapsed = time.perf_counter() - start
    if not result.decided:
        raise RuntimeError(f"the agent's first score gave no decision: {result.error_code} {result.error_message}")
    return agent, endpoint, elapsed


def rss_mb(pid: int) -> float:
    """Resident memory (VmRSS) of a process in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def pin(pid: int, cpus: set[int]) -> None:
    """Restrict every thread of ``pid`` to ``cpus`` (threads it starts later inherit their creator's set)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except ProcessLookupError:
            continue   # a thread that ended meanwhile
