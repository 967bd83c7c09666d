"""A well-behaved test program for tests/test_hostile.py: the reference fail-open client scoring parts at a steady
rate, in a process of its own (as a test program is), phase by phase as stdin asks.

    python tests/steady_client.py --connect tcp://127.0.0.1:5555 --readings rows.npy --rate 200 --timeout-ms 20

Each stdin line "SECONDS" runs one phase and prints one JSON line: [[seconds into the phase, decided], ...] and
the client's no-decision counts. End of input ends it.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script from a checkout, installed or not

from edge_agent.client import AgentClient  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connect", required=True)
    parser.add_argument("--readings", required=True, help=".npy of float32 rows in the model's feature order")
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--timeout-ms", type=float, default=20.0)
    args = parser.parse_args()
    rows = np.load(args.readings)
    client = AgentClient(args.connect, timeout_ms=args.timeout_ms)
    gc.collect()
    gc.freeze()   # a test program's own garbage collection must not be what makes it miss decisions
    for line in sys.stdin:
        start, parts = time.perf_counter(), []
        while (now := time.perf_counter() - start) < float(line):
            time.sleep(max(0.0, len(parts) / args.rate - now))
            result = client.score(rows[len(parts) % len(rows)], {"lot": "steady", "site": 1})
            parts.append((round(time.perf_counter() - start, 4), result.decided))
        print(json.dumps({"parts": parts, "no_decision": dict(client.no_decision)}), flush=True)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
