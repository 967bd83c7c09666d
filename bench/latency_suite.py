"""End-to-end latency over transports, offered rates and drift on/off, against real agent processes.

This process is the test program; each agent is ``edge-agent run`` in its own process (``bench.site``), with
drift on (windows shipped to a real collector process) or ``--no-drift``. One agent per (transport, drift)
serves every rate in turn. Parts are sent open loop (``bench.e2e_latency.measure_pipelined``): part i is sent at
its scheduled time whether or not earlier replies came back, and its latency counts from that scheduled time to
its reply, so a stall shows in every part it delays (no coordinated omission) and the offered rate holds.

Keys: ``e2e.<transport>.rate_<rate>.<figure>`` with drift on (as deployed), ``...rate_<rate>.drift_off.<figure>``
with ``--no-drift``; see bench/KEYS.md.
"""
from __future__ import annotations

import numpy as np

from bench.e2e_latency import WARM_UP_PARTS, measure_pipelined, open_loop_figures
from bench.site import AgentSite
from edge_agent.client import AgentClient

RATES = (100, 1_000, 5_000)
# Parts measured per rate: about 10-20 s each in the full run, 1-2 s in the quick one.
FULL_PARTS = {100: 1_500, 1_000: 20_000, 5_000: 50_000}
QUICK_PARTS = {100: 100, 1_000: 1_000, 5_000: 5_000}
CLIENT_TIMEOUT_MS = 100.0


def plan(quick: bool) -> list[tuple[str, bool, tuple[int, ...]]]:
    """(transport, drift, rates) runs: everything in the full run; in the quick one tcp with drift on at every
    rate, ipc with drift on and tcp with drift off at 1,000 parts/s."""
    if quick:
        return [("tcp", True, RATES), ("ipc", True, (1_000,)), ("tcp", False, (1_000,))]
    return [(transport, drift, RATES) for drift in (True, False) for transport in ("tcp", "ipc")]


def stream_parts(quick: bool) -> int:
    """Parts the site's stream must hold for the longest run."""
    return max((QUICK_PARTS if quick else FULL_PARTS).values())


def key_of(transport: str, rate: int, drift: bool) -> str:
    return f"e2e.{transport}.rate_{rate}" + ("" if drift else ".drift_off")


def run(site: AgentSite, quick: bool, runs: list[tuple[str, bool, tuple[int, ...]]] | None = None
        ) -> tuple[dict, dict[str, np.ndarray]]:
    """(figures, latency from the due time in us per run key, for the plots). ``runs``: default ``plan(quick)``."""
    parts_of = QUICK_PARTS if quick else FULL_PARTS
    figures: dict = {}
    samples: dict[str, np.ndarray] = {}
    for transport, drift, rates in runs or plan(quick):
        endpoint = site.endpoint(transport)
        agent = site.start_agent(endpoint, drift=drift)
        try:
            with AgentClient(endpoint, timeout_ms=CLIENT_TIMEOUT_MS) as client:
                for rate in rates:
                    n = WARM_UP_PARTS + parts_of[rate]
                    measured = measure_pipelined(client, site.readings[:n], site.identities[:n], float(rate))
                    key = key_of(transport, rate, drift)
                    figures.update(open_loop_figures(key, measured))
                    samples[key] = measured["from_due_us"]
        finally:
            figures[f"e2e.{transport}{'' if drift else '.drift_off'}.agent_exit_status"] = site.stop_agent(agent)
    on, off = key_of("tcp", 1_000, True), key_of("tcp", 1_000, False)
    if f"{on}.p50_us" in figures and f"{off}.p50_us" in figures:
        for figure in ("p50", "p99"):
            figures[f"e2e.tcp.rate_1000.drift_cost_{figure}_us"] = round(
                figures[f"{on}.{figure}_us"] - figures[f"{off}.{figure}_us"], 1)
    figures["e2e.client_timeout_ms"] = CLIENT_TIMEOUT_MS
    figures["e2e.warm_up_parts"] = WARM_UP_PARTS
    if any(drift for _, drift, _ in runs or plan(quick)):
        figures["e2e.drift_windows_stored_by_collector"] = site.stored_windows()
    return figures, samples
