"""Start and stop the agent and the collector as their own processes (the demo, the benchmark and the tests).

Both are started with ``python -m`` so that no installed console script is needed, and both are waited for
until they answer: the agent a health request, the collector its "collecting on" log line. A process started
here does not outlive the Python process that started it: whatever is still running at exit is killed (a
failed test or an interrupted demo leaves no daemon behind).
"""
from __future__ import annotations

import atexit
import socket
import subprocess
import sys
import time
from pathlib import Path

from .client import AgentClient, AgentUnavailable
from .wire.links import CurveClient

STARTUP_TIMEOUT_S = 120.0
_started: list[subprocess.Popen] = []


@atexit.register
def _kill_leftovers() -> None:
    for process in _started:
        if process.poll() is None:
            process.kill()
            process.wait()


def _spawn(command: list[str], log_path: str | Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    _started[:] = [p for p in _started if p.poll() is None] + [process]
    return process


def free_tcp_endpoint() -> str:
    """A loopback endpoint on a port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def start_agent(registry_root: str | Path, model: str, endpoint: str, *extra: str, log_path: str | Path,
                timeout_s: float = STARTUP_TIMEOUT_S, curve: CurveClient | None = None) -> subprocess.Popen:
    """Start ``edge-agent run`` and return once it answers a health request (over CURVE with ``curve``, for an
    agent whose score socket is a CURVE server)."""
    # Drift windows that no collector acknowledges wait in a spool beside the log, not in the working folder.
    spool = [] if "--spool-dir" in extra else ["--spool-dir", str(Path(log_path).with_suffix(".spool"))]
    command = [sys.executable, "-m", "edge_agent.daemon.cli", "run", "--registry", str(registry_root), "--model", model,
               "--bind", endpoint, "--metrics-port", "0", *spool, *extra]
    process = _spawn(command, log_path)
    deadline = time.monotonic() + timeout_s
    with AgentClient(endpoint, curve=curve) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the agent exited with status {process.returncode} before it answered; "
                                   f"log {log_path}:\n{Path(log_path).read_text()[-3000:]}")
            try:
                client.health(timeout_ms=200)
                return process
            except AgentUnavailable:
                continue
    process.kill()
    raise RuntimeError(f"the agent did not answer within {timeout_s:.0f} s; log {log_path}")


def start_collector(db: str | Path, endpoint: str, *extra: str, log_path: str | Path,
                    timeout_s: float = STARTUP_TIMEOUT_S) -> subprocess.Popen:
    """Start ``edge-collector run`` and return once it listens."""
    command = [sys.executable, "-m", "edge_agent.collector.cli", "run", "--bind", endpoint, "--db", str(db),
               "--metrics-port", "0", *extra]
    return _started_when(command, log_path, "collecting on", "the collector", timeout_s)


def start_registry_service(registry_root: str | Path, endpoint: str, *extra: str, log_path: str | Path,
                           timeout_s: float = STARTUP_TIMEOUT_S) -> subprocess.Popen:
    """Start ``edge-collector registry-serve`` and return once it listens."""
    command = [sys.executable, "-m", "edge_agent.collector.cli", "registry-serve", "--registry", str(registry_root),
               "--bind", endpoint, *extra]
    return _started_when(command, log_path, "serving packages of", "the registry service", timeout_s)


def _started_when(command: list[str], log_path: str | Path, line: str, what: str, timeout_s: float
                  ) -> subprocess.Popen:
    """Spawn ``command`` and return once its log holds ``line`` (the log grows: only the new part is read)."""
    log = Path(log_path)
    start = log.stat().st_size if log.exists() else 0
    process = _spawn(command, log)
    deadline = time.monotonic() + timeout_s
    while line not in log.read_text(errors="replace")[start:]:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{what} did not start; log {log}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    return process


def stop(process: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGTERM, then wait for the process to drain and exit; returns its exit status."""
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()
