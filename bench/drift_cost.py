"""Cost of streaming drift per scored part, measured in process on the agent's own calls.

What the agent's drift hook does per part is ``DriftMonitor.update`` (the fused kernel) and
``maybe_close``; once per window, ``close`` copies the counts and ``Shipper.submit`` queues them. The
statistics and the message are built on the shipper's thread (``to_payload``), timed here apart. The
shipper runs as in the agent (its thread spools to disk; no collector listens, so every window stays
spooled), so its work competes for the machine as it would.

    python -m bench.drift_cost [--tests 200] [--sites 4] [--parts 50000] [--quick]

Figures in microseconds; ``timer_overhead_us`` (one perf_counter_ns pair) is included in every per-part
figure and not subtracted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import tempfile
import time

import msgpack
import numpy as np

from edge_agent.drift import DriftMonitor, DriftReference
from edge_agent.shipping import DiskSpool, Shipper
from trainer.reference import drift_reference

REFERENCE_ROWS = 5000
MISSING = 0.002


def run(tests: int = 200, sites: int = 4, parts: int | None = None, quick: bool = False,
        window_parts: int = 1000) -> dict:
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
    scores = rng.normal(0.1, 0.03, parts)
    heads_sites = [(1, 1 + i % sites) for i in range(parts)]

    spool_dir = tempfile.mkdtemp(prefix="edge-drift-bench-")
    shipper = Shipper(_unused_endpoint(), DiskSpool(spool_dir), agent_id="bench", tester="bench")
    shipper.start()
    monitor = DriftMonitor(reference, {"name": "bench", "version": "1", "checksum": "-"},
                           window_parts=window_parts, window_seconds=3600.0)
    update_ns = np.empty(parts, dtype=np.int64)
    hook_ns = np.empty(parts, dtype=np.int64)
    close_ns, windows = [], []
    clock = time.perf_counter_ns
    try:
        for i in range(parts):
            head, site = heads_sites[i]
            score = float(scores[i])
            start = clock()
            monitor.update(head, site, rows[i], score, score < threshold)
            updated = clock()
            window = monitor.maybe_close()
            if window is not None:
                shipper.submit(window)
                close_ns.append(clock() - updated)
                windows.append(window)
            hook_ns[i] = clock() - start
            update_ns[i] = updated - start
        build_ms, sizes = [], []
        for window in windows[:20]:
            start = time.perf_counter()
            payload = window.to_payload()
            build_ms.append((time.perf_counter() - start) * 1e3)
            sizes.append(len(msgpack.packb(payload, use_bin_type=True)))
    finally:
        shipper.stop(timeout_s=0.0)
        shutil.rmtree(spool_dir, ignore_errors=True)
    overhead = min(clock() - clock() for _ in range(1000))
    return {
        "drift.tests": tests, "drift.sites": sites, "drift.parts": parts, "drift.window_parts": window_parts,
        "drift.update_us_per_part": _summary(update_ns),
        "drift.hook_us_per_part": _summary(hook_ns),
        "drift.window_close_us": _summary(np.array(close_ns)) if close_ns else None,
        "drift.windows": len(close_ns),
        "drift.message_build_ms_off_path": round(float(np.mean(build_ms)), 2) if build_ms else None,
        "drift.message_bytes": int(np.mean(sizes)) if sizes else None,
        "timer_overhead_us": round(overhead / 1e3, 3),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }


def _summary(nanoseconds: np.ndarray) -> dict:
    us = nanoseconds / 1e3
    return {"p50": round(float(np.percentile(us, 50)), 2), "p99": round(float(np.percentile(us, 99)), 2),
            "mean": round(float(us.mean()), 2), "max": round(float(us.max()), 1)}


def _unused_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drift_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--parts", type=int, default=None)
    parser.add_argument("--window-parts", type=int, default=1000)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.tests, args.sites, args.parts, args.quick, args.window_parts), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
