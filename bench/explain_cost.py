"""Cost of explaining a flagged part, and of the agent's whole judging step, per part: in process, on the agent's own
objects (a loaded benchmark package, ``PartDecider.decide`` with dynamic PAT on and drift off).

``explain.us_per_explained_part``: what the agent adds for a part whose ML-outlier or PAT flag fired:
``Explainer.drivers`` (robust z of every test, the furthest three) and the drivers' wire form and words in
``why``. Timed on every part of the stream, flagged or not (the work does not depend on it). ``explain.judge_us_per_part``: ``PartDecider.decide`` per
part (coverage check, static and dynamic PAT, the explanation where a flag fired, bin and why), the agent's own
time after the models; ``explain.explained_share``: how many of those parts needed an explanation.

    python -m bench.explain_cost [--tests 200] [--parts 20000] [--quick]

Figures in microseconds; ``explain.timer_overhead_us`` (one perf_counter_ns pair) is included in every per-part
figure and not subtracted.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.drift_cost import summary_us, timer_pair_ns
from bench.e2e_latency import MODEL, build_bench_package, package_stream
from bench.keys import BenchKeys
from edge_agent.daemon.config import load_config
from edge_agent.package.registry import Registry
from edge_agent.daemon.scoring import load_package
from edge_agent.daemon.security import AgentSecurity
from edge_agent.daemon.server import Agent
from edge_agent.wire.score import Part


def run(tests: int = 200, parts: int | None = None, quick: bool = False) -> dict:
    parts = parts or (2_000 if quick else 20_000)
    root = Path(tempfile.mkdtemp(prefix="edge-bench-explain-", dir="/tmp"))
    try:
        # The forest's size does not change what is timed here (the scores are computed beforehand).
        keys = BenchKeys.create(root / "keys")
        build_bench_package(root / "models", quick, tests, n_trees=50, yield_trees=20, signer=keys.signer)
        rows, identities = package_stream(root / "models", parts, tests)
        config = load_config(None, {"model": MODEL, "metrics.port": 0, "security.trusted_keys": str(keys.trusted)})
        registry = Registry(root / "models", trust=AgentSecurity.load(config.security).trust)
        model = load_package(registry, registry.resolve(MODEL, stage="production"))
        agent = Agent(config, registry, model)
        scores, probabilities = model.score(rows)
        clock = time.perf_counter_ns
        explain_ns = np.empty(parts, np.int64)
        for i, row in enumerate(rows):
            start = clock()
            drivers = model.explainer.drivers(row)
            "; ".join(d.describe() for d in drivers)
            [d.to_wire() for d in drivers]
            explain_ns[i] = clock() - start
        judge_ns = np.empty(parts, np.int64)
        part_ids = [Part(**identity) for identity in identities]
        explained = 0
        for i, row in enumerate(rows):
            start = clock()
            reply, = agent.decider.decide(model, agent.models.dynamic, agent.path.live, (part_ids[i],), (row,),
                                           scores[i:i + 1], probabilities[i:i + 1])
            judge_ns[i] = clock() - start
            explained += bool(reply["drivers"])
        explained /= parts
        explain = summary_us(explain_ns)
        return {"explain.tests": tests, "explain.parts": parts,
                "explain.us_per_explained_part": explain,
                "explain.explained_share": round(explained, 4),
                "explain.us_per_part_amortized": round(explain["mean"] * explained, 3),
                "explain.judge_us_per_part": summary_us(judge_ns),
                "explain.timer_overhead_us": round(min(timer_pair_ns(clock) for _ in range(1000)) / 1e3, 3)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.explain_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--parts", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.tests, args.parts, args.quick), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
