"""Cost of streaming drift per scored part: in process on the agent's own calls, and end to end.

``drift.update_us_per_part``: ``DriftMonitor.update`` (the fused kernel) alone. ``drift.hook_us_per_part``:
what the agent's drift hook does per part - ``update`` and ``maybe_close``, and once per window ``close``
(copies the counts) and ``Shipper.submit`` - with the shipper thread running as in the agent (it builds the
message, ``to_payload``, timed apart, and spools it to disk; no collector listens), parts paced at ``--rate``
so the shipper's work competes with the hook as often as it would on a fast tester.

End to end (``--end-to-end``): the real agent (``edge-agent run`` via ``edge_agent.processes``) serving a
200-test package (200-tree Isolation Forest, 100-tree random forest), once with ``--no-drift`` and once with
drift on, shipping windows to a real collector process; this process is the test program, sending 1,000
parts/s open loop (``bench.latency_suite``; keys ``e2e.tcp.rate_1000[.drift_off].*``).

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
import tempfile
import time

import msgpack
import numpy as np

from edge_agent.daemon.drift import DriftMonitor, DriftReference
from edge_agent.processes import free_tcp_endpoint
from edge_agent.daemon.shipping import DiskSpool, Shipper
from edge_agent.daemon.upstream import DriftConfig
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
    reference = DriftReference.from_bins(columns, drift_reference(rng.normal(size=(REFERENCE_ROWS, tests)), columns,
                                                                  reference_scores, threshold))
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
    shipper = Shipper(free_tcp_endpoint(), DiskSpool(spool_dir), agent_id="bench", tester="bench")
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
    overhead = min(timer_pair_ns(clock) for _ in range(1000))
    return {
        "drift.tests": tests, "drift.sites": sites, "drift.parts": parts, "drift.window_parts": window_parts,
        "drift.update_us_per_part": summary_us(update_ns),
        "drift.hook_rate_parts_per_s": rate,
        "drift.hook_us_per_part": summary_us(hook_ns),
        "drift.window_close_us": summary_us(np.array(close_ns)) if close_ns else None,
        "drift.windows": len(close_ns),
        "drift.message_build_ms_off_path": round(float(np.mean(build_ms)), 2) if build_ms else None,
        "drift.message_bytes": int(np.mean(sizes)) if sizes else None,
        "timer_overhead_us": round(overhead / 1e3, 3),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_1min": round(os.getloadavg()[0], 2)},
    }


def end_to_end(quick: bool = False) -> dict:
    """Open-loop latency at 1,000 parts/s over tcp of the real agent (``edge-agent run``) with drift on, shipping
    to a real collector process, and with ``--no-drift``: the ``bench.latency_suite`` figures of those two runs."""
    from bench.latency_suite import run as latency_runs
    from bench.latency_suite import stream_parts
    from bench.site import AgentSite

    with AgentSite(quick, stream_parts(quick)) as site:
        figures, _ = latency_runs(site, quick, runs=[("tcp", False, (1_000,)), ("tcp", True, (1_000,))])
    return figures


def timer_pair_ns(clock) -> int:
    start = clock()
    return clock() - start


def summary_us(nanoseconds: np.ndarray) -> dict:
    us = nanoseconds / 1e3
    return {"p50": round(float(np.percentile(us, 50)), 2), "p99": round(float(np.percentile(us, 99)), 2),
            "mean": round(float(us.mean()), 2), "max": round(float(us.max()), 1)}


def main(argv: list[str] | None = None) -> int:
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
        figures.update(end_to_end(args.quick))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
