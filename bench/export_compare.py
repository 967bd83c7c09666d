"""In-process comparison of the ways to serve the trained models, on the same rows.

Outlier model (imputer + Isolation Forest): scikit-learn ``decision_function``, skl2onnx's default graph and
the compact one-TreeEnsemble graph, the last two in sessions tuned as the agent tunes them. Yield models
(every kind in YIELD_KINDS: random forest, logistic, MLP, histogram gradient boosting): scikit-learn
``predict_proba`` and the exported float32 and int8 graphs.
Each engine: single-row latency (median, p99, one call per row, Python call included, as the agent pays it),
throughput on batches of 1000 rows, serialized size, and its largest difference from scikit-learn.

    python -m bench.export_compare            # 200 tests, 200 trees, prints a Markdown table
    python -m bench.export_compare --quick

Figures are a flat dict: ``inproc.sklearn.p50_us``, ``inproc.compact.p50_us``,
``inproc.ratio_sklearn_over_compact``, ``inproc.yield.mlp.int8.p50_us`` and so on.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import platform
import time
from typing import Callable

import numpy as np
import onnx
from skl2onnx import to_onnx

from bench.e2e_latency import synthetic_table
from edge_agent.package.runtime import make_session, warm_up
from trainer.export import isolation_forest_to_onnx, quantize_int8, supports_int8, yield_model_to_onnx
from trainer.train import YIELD_KINDS, TrainConfig, fit

BATCH_ROWS = 1000
# What skl2onnx 1.20 converts an IsolationForest with under onnx 1.23.
SKL2ONNX_OPSETS = {"": 17, "ai.onnx.ml": 3}


def run(n_trees: int = 200, n_tests: int = 200, rows: int | None = None, quick: bool = False,
        yield_trees: int = 100, timed_rows: int | None = None, seed: int = 0,
        yield_kinds: tuple[str, ...] = YIELD_KINDS) -> dict:
    """Train on ``rows`` synthetic parts of ``n_tests`` tests; time every engine on ``timed_rows`` other parts.
    ``yield_kinds``: the yield model types compared (the first one's outlier model is the one timed)."""
    rows = rows or (2_000 if quick else 5_000)
    timed_rows = timed_rows or (50 if quick else 300)
    table = synthetic_table(rows, n_tests, seed=1, product_seed=seed)
    measured = synthetic_table(max(timed_rows, BATCH_ROWS), n_tests, seed=2, product_seed=seed)
    X32 = measured.readings(table.test_columns).astype(np.float32)
    X64 = X32.astype(np.float64)   # scikit-learn gets exactly the values the graphs get
    batch32, batch64 = X32[:BATCH_ROWS], X64[:BATCH_ROWS]
    repeats = 3 if quick else 10

    trained = {}
    train_start = time.perf_counter()
    for kind in yield_kinds:
        config = TrainConfig(name="bench", n_trees=n_trees, yield_model=kind, yield_trees=yield_trees, seed=seed)
        trained[kind] = fit(table, config, progress=lambda message: None)
    figures: dict = {"inproc.n_tests": n_tests, "inproc.n_trees": n_trees, "inproc.yield_trees": yield_trees,
                     "inproc.train_rows": rows, "inproc.timed_rows": timed_rows, "inproc.batch_rows": BATCH_ROWS,
                     "inproc.train_s": round(time.perf_counter() - train_start, 1),
                     "machine.cpus": os.cpu_count(), "machine.python": platform.python_version(),
                     "machine.load_1min_before": round(os.getloadavg()[0], 2)}

    outlier = trained[yield_kinds[0]].outlier
    expected = outlier.decision_function(X64[:timed_rows])
    figures.update(_engine("inproc.sklearn", lambda x: outlier.decision_function(x), X64[:timed_rows], batch64,
                           repeats, size=len(pickle.dumps(outlier))))
    default = to_onnx(outlier, X32[:1], target_opset=SKL2ONNX_OPSETS)
    compact = isolation_forest_to_onnx(outlier)
    for key, model, output in (("inproc.skl2onnx", default, "scores"), ("inproc.compact", compact, "score")):
        figures.update(_onnx_engine(key, model, output, X32[:timed_rows], batch32, repeats, expected)[0])
    for numerator in ("sklearn", "skl2onnx"):
        for percentile, suffix in (("p50", ""), ("p99", "_p99")):
            figures[f"inproc.ratio_{numerator}_over_compact{suffix}"] = round(
                figures[f"inproc.{numerator}.{percentile}_us"] / figures[f"inproc.compact.{percentile}_us"], 1)
    figures["inproc.size_ratio_skl2onnx_over_compact"] = round(
        figures["inproc.skl2onnx.size_bytes"] / figures["inproc.compact.size_bytes"], 1)

    for kind in yield_kinds:
        model = trained[kind].yield_model
        key = f"inproc.yield.{kind}"
        expected = model.predict_proba(X64[:timed_rows])[:, 1]
        figures.update(_engine(f"{key}.sklearn", lambda x, m=model: m.predict_proba(x)[:, 1], X64[:timed_rows],
                               batch64, repeats, size=len(pickle.dumps(model))))
        float_graph = yield_model_to_onnx(model)
        figures.update(_onnx_engine(f"{key}.float32", float_graph, "pass_probability", X32[:timed_rows], batch32,
                                    repeats, expected)[0])
        if supports_int8(model)[0]:
            int8_figures, single = _onnx_engine(f"{key}.int8", quantize_int8(float_graph), "pass_probability",
                                                X32[:timed_rows], batch32, repeats, expected)
            threshold = trained[kind].yield_threshold
            int8_figures[f"{key}.int8.decision_agreement"] = float(np.mean((single >= threshold)
                                                                           == (expected >= threshold)))
            figures.update(int8_figures)
    # Other work on the machine shows as noise in every figure: record how busy it was.
    figures["machine.load_1min_after"] = round(os.getloadavg()[0], 2)
    return figures


def _onnx_engine(key: str, model: onnx.ModelProto, output: str, rows32: np.ndarray, batch32: np.ndarray,
                 repeats: int, expected: np.ndarray) -> tuple[dict, np.ndarray]:
    """Figures of a graph in a tuned session, and its single-row outputs."""
    data = model.SerializeToString()
    session = make_session(data)
    warm_up(session, rows32.shape[1])
    input_name = session.get_inputs()[0].name

    def score(x: np.ndarray) -> np.ndarray:
        return session.run([output], {input_name: x})[0].reshape(-1)

    figures = _engine(key, score, rows32, batch32, repeats, size=len(data))
    single = np.concatenate([score(rows32[i:i + 1]) for i in range(len(rows32))])
    figures[f"{key}.nodes"] = len(model.graph.node)
    figures[f"{key}.max_abs_diff"] = float(np.max(np.abs(single - expected)))
    return figures, single


def _engine(key: str, score: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, batch: np.ndarray,
            repeats: int, *, size: int) -> dict:
    """Single-row latency percentiles (one call per row) and batch throughput of ``score``."""
    singles = [np.ascontiguousarray(rows[i:i + 1]) for i in range(len(rows))]
    for row in singles[:10]:
        score(row)
    latencies = _timed(score, singles)
    batch_s = np.median(_timed(score, [batch] * repeats)) / 1e6
    return {f"{key}.p50_us": round(float(np.percentile(latencies, 50)), 1),
            f"{key}.p99_us": round(float(np.percentile(latencies, 99)), 1),
            f"{key}.batch_rows_per_s": round(len(batch) / batch_s),
            f"{key}.size_bytes": size}


def _timed(score: Callable[[np.ndarray], np.ndarray], inputs: list[np.ndarray]) -> np.ndarray:
    """Microseconds of each call."""
    gc.collect()
    times = np.empty(len(inputs))
    for i, x in enumerate(inputs):
        start = time.perf_counter_ns()
        score(x)
        times[i] = (time.perf_counter_ns() - start) / 1e3
    return times


def markdown(figures: dict) -> str:
    """The figures as a Markdown table, one row per engine."""
    engines = [("outlier: scikit-learn decision_function", "inproc.sklearn"),
               ("outlier: skl2onnx default graph", "inproc.skl2onnx"),
               ("outlier: compact TreeEnsemble graph", "inproc.compact")]
    for kind in YIELD_KINDS:
        engines += [(f"yield {kind}: scikit-learn predict_proba", f"inproc.yield.{kind}.sklearn"),
                    (f"yield {kind}: float32 graph", f"inproc.yield.{kind}.float32"),
                    (f"yield {kind}: int8 graph", f"inproc.yield.{kind}.int8")]
    lines = [f"{figures['inproc.n_tests']} tests, {figures['inproc.n_trees']}-tree Isolation Forest, "
             f"{figures['inproc.yield_trees']}-tree yield forest; {figures['inproc.timed_rows']} rows timed one "
             f"call each, batches of {figures['inproc.batch_rows']}; {figures['machine.cpus']} CPUs, load average "
             f"{figures['machine.load_1min_before']} before / {figures['machine.load_1min_after']} after",
             "",
             "| engine | 1-row p50 us | 1-row p99 us | batch rows/s | bytes | graph nodes | max abs diff vs sklearn |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, key in engines:
        if f"{key}.p50_us" not in figures:
            continue
        cells = [figures[f"{key}.p50_us"], figures[f"{key}.p99_us"], f"{figures[f'{key}.batch_rows_per_s']:,}",
                 f"{figures[f'{key}.size_bytes']:,}", figures.get(f"{key}.nodes", ""),
                 f"{figures[f'{key}.max_abs_diff']:.2g}" if f"{key}.max_abs_diff" in figures else ""]
        lines.append(f"| {label} | " + " | ".join(str(c) for c in cells) + " |")
    lines += ["",
              f"single-row median: scikit-learn / compact = {figures['inproc.ratio_sklearn_over_compact']}x, "
              f"skl2onnx / compact = {figures['inproc.ratio_skl2onnx_over_compact']}x; "
              f"size skl2onnx / compact = {figures['inproc.size_ratio_skl2onnx_over_compact']}x"]
    for kind in YIELD_KINDS:
        if f"inproc.yield.{kind}.int8.decision_agreement" in figures:
            lines.append(f"yield {kind} int8: pass/fail decisions agree with scikit-learn on "
                         f"{figures[f'inproc.yield.{kind}.int8.decision_agreement']:.2%} of the timed rows")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", type=int, default=200, help="Isolation Forest trees")
    parser.add_argument("--tests", type=int, default=200, help="parametric tests (model inputs)")
    parser.add_argument("--rows", type=int, default=None, help="training parts (default 5000, quick 2000)")
    parser.add_argument("--timed-rows", type=int, default=None, help="rows timed one call each (default 300)")
    parser.add_argument("--quick", action="store_true", help="smaller run for a smoke check")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    figures = run(n_trees=args.trees, n_tests=args.tests, rows=args.rows, quick=args.quick,
                  timed_rows=args.timed_rows)
    print(markdown(figures))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
