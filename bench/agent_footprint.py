"""The agent's start-up time and memory: process start to first score, VmRSS after load and after many parts.

Start-up: from just before ``edge-agent run`` is spawned until this process holds the first decided score
(interpreter start, imports, package verification and load, session warm-up, socket bind, one request).
Memory: VmRSS from ``/proc/<pid>/status`` of the agent process after that first score, and again after
``parts`` more parts sent with ``score_batch`` (1,000,000 in the full run), drift on as deployed; once more
after the first score of an agent started with ``--no-drift``.
"""
from __future__ import annotations

import itertools

import numpy as np

from bench.site import AgentSite, rss_mb, time_to_first_score
from bench.throughput import BATCH_PARTS
from edge_agent.client import AgentClient

FULL_PARTS = 1_000_000
QUICK_PARTS = 20_000


def run(site: AgentSite, quick: bool) -> dict:
    starts = 1 if quick else 3
    startup_s, rss_loaded, agent, endpoint = [], [], None, ""
    for _ in range(starts):
        if agent is not None:
            site.stop_agent(agent)
        agent, endpoint, seconds = time_to_first_score(site, "tcp", drift=True)
        startup_s.append(seconds)
        rss_loaded.append(rss_mb(agent.pid))
    # The same agent without drift statistics, for comparison: what the drift monitor and shipper hold.
    agent_off, _, _ = time_to_first_score(site, "tcp", drift=False)
    rss_drift_off = rss_mb(agent_off.pid)
    site.stop_agent(agent_off)
    parts = QUICK_PARTS if quick else FULL_PARTS
    batches = site.batches(BATCH_PARTS)
    sent, undecided = 0, 0
    try:
        with AgentClient(endpoint, timeout_ms=10_000.0) as client:
            for batch in itertools.cycle(batches):
                if sent >= parts:
                    break
                results = client.score_batch(batch)
                sent += len(results)
                undecided += sum(not r.decided for r in results)
        rss_after = rss_mb(agent.pid)
    finally:
        site.stop_agent(agent)
    return {"agent.startup_s": round(float(np.median(startup_s)), 3),
            "agent.startup_s_max": round(max(startup_s), 3), "agent.startup_runs": starts,
            "agent.rss_mb": round(float(np.median(rss_loaded)), 1),
            "agent.rss_mb_drift_off": round(rss_drift_off, 1),
            "agent.rss_after_parts_mb": round(rss_after, 1), "agent.rss_after_parts_count": sent,
            "agent.rss_growth_mb": round(rss_after - rss_loaded[-1], 1),
            "agent.rss_after_parts_no_decision": undecided}
