"""Batched throughput: the most parts per second one agent scores with ``score_batch`` requests.

"One core" means every thread of the agent process (its server loop, ZeroMQ I/O thread, onnxruntime, drift
shipper) is restricted with ``sched_setaffinity`` to CPU 0, and this process (the client) to another CPU when
the machine has one. "Two cores": the agent may use CPUs 0 and 1; the client gets a third CPU if there is
one, else it shares those two with the agent (as on a 2-core controller, where the test program competes
too). The agent runs as deployed, drift on, shipping windows to the site's collector.

``CLIENTS`` client threads, each with its own socket, keep a request in flight while another is encoded, so
the agent is not idle while the client works; requests are ``BATCH_PARTS`` parts, the agent's ``max_batch``.
"""
from __future__ import annotations

import os
import threading
import time

from bench.site import AgentSite, pin
from edge_agent.client import AgentClient
from edge_agent.daemon.config import AgentConfig

BATCH_PARTS = AgentConfig().max_batch
CLIENTS = 2
WARM_UP_REQUESTS = 5


def core_plans() -> dict[str, tuple[set[int], set[int]]]:
    """name -> (agent CPUs, client CPUs), from the CPUs this process may use."""
    cpus = sorted(os.sched_getaffinity(0))
    plans = {}
    for name, n in (("one_core", 1), ("two_cores", 2)):
        if len(cpus) < n:
            continue
        agent = set(cpus[:n])
        rest = set(cpus[n:])
        plans[name] = (agent, rest or set(cpus))
    return plans


def run(site: AgentSite, quick: bool) -> dict:
    seconds = 1.0 if quick else 10.0
    batches = site.batches(BATCH_PARTS)
    own_cpus = os.sched_getaffinity(0)
    figures: dict = {"throughput.batch_parts": BATCH_PARTS, "throughput.clients": CLIENTS,
                     "throughput.seconds": seconds}
    for name, (agent_cpus, client_cpus) in core_plans().items():
        endpoint = site.endpoint("tcp")
        agent = site.start_agent(endpoint, drift=True)
        try:
            pin(agent.pid, agent_cpus)
            pin(os.getpid(), client_cpus)
            parts, failed, elapsed = _saturate(endpoint, batches, seconds)
        finally:
            pin(os.getpid(), own_cpus)
            site.stop_agent(agent)
        figures[f"throughput.{name}.parts_per_s"] = round(parts / elapsed)
        figures[f"throughput.{name}.no_decision"] = failed
        figures[f"throughput.{name}.agent_cpus"] = sorted(agent_cpus)
        figures[f"throughput.{name}.client_cpus"] = sorted(client_cpus)
    if "throughput.one_core.parts_per_s" in figures:
        figures["throughput.batched_parts_per_s"] = figures["throughput.one_core.parts_per_s"]
    return figures


def _saturate(endpoint: str, batches: list, seconds: float) -> tuple[int, int, float]:
    """(parts decided, parts without a decision, seconds taken) by ``CLIENTS`` closed-loop client threads that
    stop sending after ``seconds``."""
    counts = [[0, 0] for _ in range(CLIENTS)]
    start_line = threading.Barrier(CLIENTS + 1)
    stop_at = [float("inf")]

    def client(index: int) -> None:
        with AgentClient(endpoint, timeout_ms=10_000.0) as agent_client:
            for i in range(WARM_UP_REQUESTS):
                agent_client.score_batch(batches[i % len(batches)])
            start_line.wait()
            i = index
            while time.perf_counter() < stop_at[0]:
                results = agent_client.score_batch(batches[i % len(batches)])
                decided = sum(r.decided for r in results)
                counts[index][0] += decided
                counts[index][1] += len(results) - decided
                i += CLIENTS

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    start_line.wait()
    start = time.perf_counter()
    stop_at[0] = start + seconds
    for thread in threads:
        thread.join()
    return sum(c[0] for c in counts), sum(c[1] for c in counts), time.perf_counter() - start
