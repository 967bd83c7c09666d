"""A stand-in agent process for the collector tests: the real DriftMonitor, DiskSpool and Shipper over a real
model package, fed with parts of the package's product instead of score requests (the agent's request path is
not needed to prove shipping).

    python tests/drift_feeder.py --registry DIR --model NAME --feed FEED.npz --agent-id A
        --collector tcp://127.0.0.1:5560 --spool DIR --windows 5 --window-parts 400 [--sites 4]
        [--shift-test COLUMN --shift-site 2 --shift 1.5] [--score-shift -3] [--wait-acked-s 30] [--pace-s 0.1]
        [--key AGENT.key_secret --collector-key COLLECTOR.key]     # CURVE, as an agent with [security] keys

The package is the production version of ``--model``. ``--feed`` holds parts of its product that training held
out (``readings`` in the package's feature order and the outlier model's ``scores``, as tests/conftest.py writes
them); each window draws its parts from them at random. Shifts are in the shifted test's robust sigma from the
package's PAT limits, score shifts in the drift reference's score sigma. After the last window it spools every
window and sends until the spool is empty or ``--wait-acked-s`` passed, then prints one JSON line
{"agent_id", "last_seq", "pending", "acked", "resends", "dropped_total"} and exits.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script from a checkout, installed or not

from edge_agent.daemon.drift import DriftMonitor, DriftReference  # noqa: E402
from edge_agent.keys import load_curve_pair, load_curve_public  # noqa: E402
from edge_agent.package.registry import Registry  # noqa: E402
from edge_agent.daemon.shipping import DiskSpool, Shipper  # noqa: E402
from edge_agent.wire.links import CurveClient  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--registry", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--feed", required=True)
    parser.add_argument("--agent-id", required=True)
    parser.add_argument("--tester", default=None)
    parser.add_argument("--collector", required=True)
    parser.add_argument("--spool", required=True)
    parser.add_argument("--spool-max-messages", type=int, default=10_000)
    parser.add_argument("--windows", type=int, required=True)
    parser.add_argument("--window-parts", type=int, default=400)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shift-test", default=None)
    parser.add_argument("--shift-site", type=int, default=None)
    parser.add_argument("--shift", type=float, default=0.0, help="added to the shifted test's readings (sigmas)")
    parser.add_argument("--score-shift", type=float, default=0.0, help="added to every score (sigmas)")
    parser.add_argument("--ack-timeout-s", type=float, default=1.0)
    parser.add_argument("--wait-acked-s", type=float, default=60.0)
    parser.add_argument("--pace-s", type=float, default=0.0, help="pause after each window")
    parser.add_argument("--key", help="this agent's CURVE secret certificate (with --collector-key)")
    parser.add_argument("--collector-key", help="the collector's public certificate")
    args = parser.parse_args()

    registry = Registry(args.registry)
    ref = registry.resolve(args.model, "production")
    manifest = registry.manifest(ref)
    reference = DriftReference.from_manifest(manifest)
    threshold = manifest.models.outlier.threshold
    identity = {"name": ref.name, "version": ref.version, "checksum": registry.checksum(ref)}
    monitor = DriftMonitor(reference, identity, window_parts=args.window_parts, window_seconds=3600.0)
    curve = CurveClient(load_curve_pair(args.key), load_curve_public(args.collector_key)) if args.key else None
    shipper = Shipper(args.collector, DiskSpool(args.spool, max_messages=args.spool_max_messages),
                      agent_id=args.agent_id, tester=args.tester or args.agent_id, ack_timeout_s=args.ack_timeout_s,
                      curve=curve)
    shipper.start()
    shifted = reference.columns.index(args.shift_test) if args.shift_test else None
    shift = 0.0 if shifted is None else args.shift * manifest.pat.limits[shifted].robust_sigma
    with np.load(args.feed) as feed:
        readings, scores = feed["readings"], feed["scores"] + args.score_shift * reference.score_scale
    rng = np.random.default_rng(args.seed)
    for _ in range(args.windows):
        drawn = rng.integers(len(readings), size=args.window_parts)
        for i, part in enumerate(drawn):
            site = 1 + i % args.sites
            row = readings[part].copy()
            if shifted is not None and site == args.shift_site:
                row[shifted] += shift
            score = float(scores[part])
            monitor.update(1, site, row, score, score < threshold)
            window = monitor.maybe_close()
            if window is not None:
                shipper.submit(window)
        time.sleep(args.pace_s)
    shipper.stop(timeout_s=args.wait_acked_s)   # spools every window, then sends until acked or timed out
    print(json.dumps({"agent_id": args.agent_id, "last_seq": shipper.spool.last_seq,
                      "pending": shipper.spool.pending, "acked": shipper.acked, "resends": shipper.resends,
                      "dropped_total": shipper.spool.dropped_total}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
