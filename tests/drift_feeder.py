"""A stand-in agent process for the collector tests: the real DriftMonitor, DiskSpool and Shipper, fed with
synthetic parts instead of score requests (the agent's request path is not needed to prove shipping).

    python tests/drift_feeder.py --tests 12 --agent-id A --collector tcp://127.0.0.1:5560 --spool DIR
        --windows 5 --window-parts 400 [--sites 4] [--shift-test COLUMN --shift-site 2 --shift 1.5]
        [--wait-acked-s 30] [--pace-s 0.1]

The model is ``make_drift_model(n_tests=TESTS)``, built again in each feeder (same arguments, same model and
checksum). Readings are standard normal (as the reference's), scores normal(SCORE_MEAN, SCORE_SD).
After the last window it spools every window and sends until the spool is empty or ``--wait-acked-s`` passed,
then prints one JSON line {"agent_id", "last_seq", "pending", "acked", "dropped_total"} and exits.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.drift import DriftMonitor, DriftReference  # noqa: E402
from edge_agent.package.manifest import ReferenceBins  # noqa: E402
from edge_agent.shipping import DiskSpool, Shipper  # noqa: E402
from trainer.reference import drift_reference  # noqa: E402

SCORE_MEAN, SCORE_SD = 0.10, 0.03
REFERENCE_OUTLIER_RATE = 0.01


@dataclass(frozen=True)
class DriftModel:
    """What the drift side reads of a model package: feature order, drift reference bins, outlier threshold."""

    columns: list[str]
    bins: ReferenceBins
    threshold: float
    identity: dict   # {"name", "version", "checksum"}, as an agent reports its model

    def reference(self) -> DriftReference:
        return DriftReference.from_bins(self.columns, self.bins, f"{self.identity['name']}/{self.identity['version']}")


def make_drift_model(n_tests: int = 12, rows: int = 4000, seed: int = 1) -> DriftModel:
    """The trainer's own drift reference built from standard normal readings (0.5 % missing) and normal scores,
    with the outlier threshold at their 1 % quantile; the same arguments give the same model and checksum."""
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(rows, n_tests))
    values[rng.random(values.shape) < 0.005] = np.nan
    scores = rng.normal(SCORE_MEAN, SCORE_SD, rows)
    threshold = float(np.quantile(scores, REFERENCE_OUTLIER_RATE))
    columns = [f"{1000 + i}:T{i}" for i in range(n_tests)]
    checksum = hashlib.sha256(f"drift-demo tests={n_tests} rows={rows} seed={seed}".encode()).hexdigest()
    return DriftModel(columns, drift_reference(values, columns, scores, threshold), threshold,
                      {"name": "drift-demo", "version": "1", "checksum": checksum})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tests", type=int, required=True, help="the model: make_drift_model(n_tests=TESTS)")
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
    parser.add_argument("--score-shift", type=float, default=0.0, help="added to every score (outlier bursts)")
    parser.add_argument("--ack-timeout-s", type=float, default=1.0)
    parser.add_argument("--wait-acked-s", type=float, default=60.0)
    parser.add_argument("--pace-s", type=float, default=0.0, help="pause after each window")
    args = parser.parse_args()

    model = make_drift_model(n_tests=args.tests)
    reference, threshold = model.reference(), model.threshold
    monitor = DriftMonitor(reference, model.identity, window_parts=args.window_parts, window_seconds=3600.0)
    shipper = Shipper(args.collector, DiskSpool(args.spool, max_messages=args.spool_max_messages),
                      agent_id=args.agent_id, tester=args.tester or args.agent_id, ack_timeout_s=args.ack_timeout_s)
    shipper.start()
    shifted = reference.columns.index(args.shift_test) if args.shift_test else None
    rng = np.random.default_rng(args.seed)
    for _ in range(args.windows):
        rows = rng.normal(size=(args.window_parts, reference.n_tests)).astype(np.float32)
        scores = rng.normal(SCORE_MEAN, SCORE_SD, args.window_parts) + args.score_shift
        for i in range(args.window_parts):
            site = 1 + i % args.sites
            if shifted is not None and site == args.shift_site:
                rows[i, shifted] += args.shift
            monitor.update(1, site, rows[i], float(scores[i]), bool(scores[i] < threshold))
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
