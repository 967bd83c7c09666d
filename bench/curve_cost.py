"""What CURVE costs on the score round trip: the same package served by two agents on tcp loopback, one with a
plain score socket, one with a CURVE score socket (a key pair each side, every message encrypted and
authenticated by ZeroMQ's CurveZMQ). This process scores closed loop (each part sent when the previous reply is
in), alternating blocks of ``BLOCK`` parts between the two agents so that both see the same load on the machine.

Keys: ``curve.<socket>.round_trip.<pct>_us`` (``<socket>``: ``plain`` or ``curve``), ``curve.<socket>.agent.<pct>_us``
(the agent's own time, from its reply: CURVE runs in ZeroMQ's I/O threads, not on the serving path),
``curve.cost_p50_us`` and ``curve.cost_p99_us`` (curve minus plain), ``curve.parts`` (per socket),
``curve.no_decision``, ``curve.load_before`` and ``curve.load_after`` (1-minute load average).
"""
from __future__ import annotations

import gc

import numpy as np

from bench import machine
from bench.e2e_latency import WARM_UP_PARTS, _percentiles
from bench.site import AgentSite
from edge_agent.client import AgentClient

FULL_PARTS, QUICK_PARTS = 20_000, 2_000   # per socket
BLOCK = 250
TIMEOUT_MS = 1_000.0
SOCKETS = ("plain", "curve")


def run(site: AgentSite, quick: bool) -> dict:
    n = QUICK_PARTS if quick else FULL_PARTS
    endpoints = {name: site.endpoint("tcp") for name in SOCKETS}
    agents = [site.start_agent(endpoints[name], drift=False, curve=name == "curve") for name in SOCKETS]
    try:
        with AgentClient(endpoints["plain"], timeout_ms=TIMEOUT_MS) as plain, \
                AgentClient(endpoints["curve"], timeout_ms=TIMEOUT_MS, curve=site.keys.client) as curve:
            clients = {"plain": plain, "curve": curve}
            for client in clients.values():
                for i in range(WARM_UP_PARTS):
                    client.score(site.readings[i], site.identities[i])
            gc.collect()
            gc.freeze()   # this process trained the package: no full collection in the middle of a block
            load_before = machine.load_average()[0]
            measured = _alternating(clients, site, n)
            load_after = machine.load_average()[0]
    finally:
        for agent in agents:
            site.stop_agent(agent)
    figures = {"curve.parts": n, "curve.no_decision": {name: n - len(measured[name][0]) for name in SOCKETS},
               "curve.load_before": load_before, "curve.load_after": load_after}
    for name, (round_trip, agent_us) in measured.items():
        figures.update(_percentiles(f"curve.{name}.round_trip", round_trip))
        figures.update(_percentiles(f"curve.{name}.agent", agent_us))
    for pct in ("p50", "p99"):
        figures[f"curve.cost_{pct}_us"] = round(figures[f"curve.curve.round_trip.{pct}_us"]
                                                - figures[f"curve.plain.round_trip.{pct}_us"], 1)
    return figures


def _alternating(clients: dict[str, AgentClient], site: AgentSite, n: int) -> dict[str, tuple[np.ndarray, ...]]:
    """Per socket: (round trip, agent time) in us of every decided part, blocks of BLOCK parts in turn."""
    samples = {name: ([], []) for name in clients}
    stream = len(site.readings)
    for first in range(0, n, BLOCK):
        for name, client in clients.items():
            for i in range(first, min(first + BLOCK, n)):
                result = client.score(site.readings[i % stream], site.identities[i % stream])
                if result.decided:
                    samples[name][0].append(result.round_trip_us)
                    samples[name][1].append(result.agent_us)
    return {name: (np.array(round_trip), np.array(agent_us)) for name, (round_trip, agent_us) in samples.items()}
