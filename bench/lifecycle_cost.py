"""Cost of the model lifecycle per part on the serving thread, and of moving a package to a controller: in process,
on the agent's own objects (a loaded benchmark package, ``ScorePath.score``-like steps: the models, then
``PartDecider.decide`` with dynamic PAT on and drift off).

- audit: ``PartDecider.decide`` with and without the audit recorder (``edge_agent.daemon.audit``; its shipper thread
  running and spooling to disk, no collector listening), and ``AuditRecorder.decided`` alone;
- shadow: the models and the decision per part, paced at ``--rate`` parts/s (sleeping between parts, as the serving
  loop waits in its poll), in alternating blocks of 500 parts without and with a shadow challenger (the same
  package; ``edge_agent.daemon.shadow``) scored on its own thread meanwhile: what the serving thread pays, the CPU and the
  GIL shared with the shadow thread included; and ``ShadowScorer.record`` alone;
- fetch: the package fetched from a real registry service (``edge_agent.fleet.service``, on a thread, plain
  loopback) into an empty cache and verified, in chunks of 256 KiB.

    python -m bench.lifecycle_cost [--tests 200] [--parts 20000] [--rate 2000] [--quick]

Figures in microseconds unless named otherwise; one timer pair (``lifecycle.timer_overhead_us``) is included in
every per-part figure and not subtracted.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.drift_cost import summary_us, timer_pair_ns
from bench.e2e_latency import MODEL, build_bench_package, package_stream
from bench.keys import BenchKeys
from edge_agent.daemon.audit import AuditRecorder
from edge_agent.daemon.config import load_config
from edge_agent.fleet.follower import PackageCache, ServiceLink
from edge_agent.fleet.service import RegistryService
from edge_agent.daemon.lifecycle import Lifecycle
from edge_agent.package.registry import Registry
from edge_agent.processes import free_tcp_endpoint
from edge_agent.daemon.scoring import load_package
from edge_agent.daemon.security import AgentSecurity
from edge_agent.daemon.server import GIL_SWITCH_INTERVAL_S, Agent
from edge_agent.daemon.shadow import ShadowScorer
from edge_agent.wire.packages import assignment_request
from edge_agent.wire.score import Part

FETCH_CHUNK_BYTES = 256 << 10
SHADOW_BLOCK = 500        # parts per block; blocks alternate without and with the challenger


def run(tests: int = 200, parts: int | None = None, quick: bool = False, rate: float = 2000.0) -> dict:
    parts = parts or (2_000 if quick else 20_000)
    root = Path(tempfile.mkdtemp(prefix="edge-bench-lifecycle-", dir="/tmp"))
    try:
        keys = BenchKeys.create(root / "keys")
        build_bench_package(root / "models", quick, tests, signer=keys.signer)
        rows, identities = package_stream(root / "models", parts, tests)
        part_ids = [Part(**identity) for identity in identities]
        config = load_config(None, {"model": MODEL, "metrics.port": 0, "security.trusted_keys": str(keys.trusted),
                                    "drift.collector": free_tcp_endpoint(),
                                    "drift.spool_dir": str(root / "spool")})
        trust = AgentSecurity.load(config.security).trust
        registry = Registry(root / "models", trust=trust)
        ref = registry.resolve(MODEL, stage="production")
        model = load_package(registry, ref)
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)   # as the agent's serving loop runs
        figures = {"lifecycle.tests": tests, "lifecycle.parts": parts, "lifecycle.rate": rate}
        figures.update(_audit(config, registry, model, rows, part_ids))
        figures.update(_shadow(config, registry, model, rows, part_ids, rate))
        figures.update(_fetch(registry, ref, root / "cache", trust))
        figures["lifecycle.timer_overhead_us"] = round(min(timer_pair_ns(time.perf_counter_ns)
                                                           for _ in range(1000)) / 1e3, 3)
        return figures
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _judge_loop(agent: Agent, model, rows, part_ids) -> np.ndarray:
    scores, probabilities = model.score(rows)
    clock, ns = time.perf_counter_ns, np.empty(len(rows), np.int64)
    for i, row in enumerate(rows):
        start = clock()
        agent.decider.decide(model, agent.models.dynamic, agent.path.live, (part_ids[i],), (row,), scores[i:i + 1],
                             probabilities[i:i + 1])
        ns[i] = clock() - start
    return ns


def _audit(config, registry, model, rows, part_ids) -> dict:
    _judge_loop(Agent(config, registry, model), model, rows, part_ids)   # warm-up: caches, allocator, CPU clock
    without = _judge_loop(Agent(config, registry, model), model, rows, part_ids)
    audit = AuditRecorder(config.audit, config.drift, "bench", "bench")
    audit.start()
    try:
        with_audit = _judge_loop(Agent(config, registry, model, lifecycle=Lifecycle(audit=audit)), model, rows,
                                 part_ids)
        judging = Agent(config, registry, model)   # one decision to record again and again
        scores, probabilities = model.score(rows[:1])
        reply, = judging.decider.decide(model, judging.models.dynamic, judging.path.live, (part_ids[0],),
                                        (rows[0],), scores[:1], probabilities[:1])
        record_ns = _record_loop(lambda i: audit.decided(model, part_ids[i], rows[i], 0.1, 0.9, _Decided(reply)),
                                 len(rows))
    finally:
        audit.stop(2.0)
    spool = audit.shipper.spool
    stored = spool.bytes + spool.log_bytes
    return {"lifecycle.judge_us_per_part": summary_us(without),
            "lifecycle.judge_with_audit_us_per_part": summary_us(with_audit),
            "lifecycle.audit_us_per_part_added": _added(with_audit, without),
            "lifecycle.audit_record_us_per_part": summary_us(record_ns),
            "lifecycle.audit_spool_bytes_per_part": round(stored / (2 * len(rows)), 1)}


def _shadow(config, registry, model, rows, part_ids, rate: float) -> dict:
    """The models and decide per part at ``rate``, in alternating blocks without and with a challenger scored on the
    shadow thread (the machine's other load then falls on both alike); the queue is drained between blocks."""
    shadow = ShadowScorer(config.binning.policy())
    shadow.start()
    challenger = load_package(registry, model.ref)
    agent = Agent(config, registry, model, lifecycle=Lifecycle(shadow=shadow))
    scores, probabilities = model.score(rows)   # warm-up of the sessions on this stream
    clock, ns, on = time.perf_counter_ns, np.empty(len(rows), np.int64), np.zeros(len(rows), bool)
    interval = int(1e9 / rate)
    for first in range(0, len(rows), SHADOW_BLOCK):
        on[first:first + SHADOW_BLOCK] = (first // SHADOW_BLOCK) % 2 == 1
        shadow.offer(challenger if on[first] else None)
        deadline = time.monotonic() + 30
        while shadow.status()["queued"] and time.monotonic() < deadline:
            time.sleep(0.01)
        due = clock()
        for i in range(first, min(first + SHADOW_BLOCK, len(rows))):
            due += interval
            wait = due - clock()
            if wait > 0:   # idle between parts as the serving loop is in its poll: the GIL released, no CPU used
                time.sleep(wait / 1e9)
            start = clock()
            scores, probabilities = model.score(rows[i][None, :])
            agent.decider.decide(model, agent.models.dynamic, agent.path.live, (part_ids[i],), (rows[i],), scores[:1],
                                 probabilities[:1])
            agent.lifecycle.tick()
            ns[i] = clock() - start
    deadline = time.monotonic() + 30
    while shadow.status()["queued"] and time.monotonic() < deadline:
        time.sleep(0.05)
    status = shadow.status()
    blocks = shadow.take()
    agreement = sum(s["agree"] for b in blocks for s in b["sites"]) / max(1, sum(s["parts"] for b in blocks
                                                                                for s in b["sites"]))
    judging = Agent(config, registry, model)
    reply, = judging.decider.decide(model, judging.models.dynamic, judging.path.live, (part_ids[0],), (rows[0],),
                                     scores[:1], probabilities[:1])
    shadow.offer(challenger)
    shadow.queue_parts = len(rows) + 1
    record_ns = _record_loop(lambda i: shadow.record(model, part_ids[i], rows[i], 0.1, 0.9, _Decided(reply)),
                             len(rows))
    shadow.stop()
    return {"lifecycle.score_judge_us_per_part": summary_us(ns[~on]),
            "lifecycle.score_judge_with_shadow_us_per_part": summary_us(ns[on]),
            "lifecycle.shadow_us_per_part_added": _added(ns[on], ns[~on]),
            "lifecycle.shadow_record_us_per_part": summary_us(record_ns),
            "lifecycle.shadow_scored": status["scored"], "lifecycle.shadow_skipped": int(on.sum()) - status["scored"],
            "lifecycle.shadow_agreement_same_package": round(agreement, 4)}


def _fetch(registry: Registry, ref, cache_dir: Path, trust) -> dict:
    endpoint = free_tcp_endpoint()
    service = RegistryService(registry, endpoint)
    thread = threading.Thread(target=service.serve, daemon=True)
    thread.start()
    link = ServiceLink(endpoint, 10.0, None)
    try:
        listing = link.ask(assignment_request("bench", "bench", ref.name))["champion"]
        cache = PackageCache(cache_dir, trust, 3)
        start = time.perf_counter()
        _, fetched = cache.fetch(link, "bench", listing, FETCH_CHUNK_BYTES)
        seconds = time.perf_counter() - start
    finally:
        link.close()
        service.request_stop()
        thread.join(5)
    return {"lifecycle.fetch_bytes": fetched, "lifecycle.fetch_s": round(seconds, 3),
            "lifecycle.fetch_mb_per_s": round(fetched / seconds / 1e6, 1), "lifecycle.fetch_chunk_bytes":
            FETCH_CHUNK_BYTES, "lifecycle.fetch_requests": 1 + sum(-(-f["size"] // FETCH_CHUNK_BYTES)
                                                                   for f in listing["files"])}


def _added(with_ns: np.ndarray, without_ns: np.ndarray) -> dict:
    """What the step added per part: the difference of the medians and of the means (two runs one after the other:
    on a shared machine the means carry the other load's stalls, the medians less so)."""
    return {"p50": round(float(np.median(with_ns) - np.median(without_ns)) / 1e3, 2),
            "mean": round(float(with_ns.mean() - without_ns.mean()) / 1e3, 2)}


class _Decided:
    """A decision as the serving loop hands it to the lifecycle hook (bin and flags of a real reply)."""

    __slots__ = ("bin", "flags")

    def __init__(self, reply: dict):
        self.bin, self.flags = reply["bin"], reply["flags"]


def _record_loop(call, n: int) -> np.ndarray:
    clock, ns = time.perf_counter_ns, np.empty(n, np.int64)
    for i in range(n):
        start = clock()
        call(i)
        ns[i] = clock() - start
    return ns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lifecycle_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--parts", type=int, default=None)
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.tests, args.parts, args.quick, args.rate), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
