"""Scaling curves: single-row latency of the served outlier graph against model size.

Each point fits an Isolation Forest pipeline (median imputer + forest, as the trainer builds it), exports the
compact graph and times it in a session tuned as the agent tunes it (one thread, warmed), one call per row,
in this process: the model's share of the agent's latency, without transport. Three sweeps around the
default (200 trees, 200 tests, max_samples 256): trees, tests, and max_samples, which sets the forest's
depth (each tree grows to at most ceil(log2(max_samples)) levels).
"""
from __future__ import annotations

import math

import numpy as np
from sklearn.ensemble import IsolationForest
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline

from bench.e2e_latency import synthetic_table
from bench.export_compare import _timed
from edge_agent.package.runtime import make_session, warm_up
from trainer.export import isolation_forest_to_onnx

DEFAULTS = {"trees": 200, "tests": 200, "max_samples": 256}
FULL = {"trees": (50, 100, 200, 400, 800), "tests": (20, 50, 100, 200, 500, 1000, 2000),
        "max_samples": (64, 128, 256, 512, 1024, 2048, 4096)}
QUICK = {"trees": (50, 200, 800), "tests": (20, 200, 2000), "max_samples": (64, 256, 4096)}
TRAIN_ROWS = 4096   # max_samples cannot exceed the training rows


def run(quick: bool) -> tuple[dict, dict[str, list[tuple[int, float, float]]]]:
    """(figures, sweep -> [(value, p50 us, p99 us)] for the plots)."""
    timed_rows = 200 if quick else 1000
    sweeps = QUICK if quick else FULL
    figures: dict = {"scaling.timed_rows": timed_rows, "scaling.train_rows": TRAIN_ROWS,
                     **{f"scaling.default.{k}": v for k, v in DEFAULTS.items()}}
    curves: dict[str, list[tuple[int, float, float]]] = {}
    tables = {}
    for sweep, values in sweeps.items():
        curves[sweep] = []
        for value in values:
            point = {**DEFAULTS, sweep: value}
            if point["tests"] not in tables:
                train = synthetic_table(TRAIN_ROWS, point["tests"], seed=1)
                timed = synthetic_table(timed_rows, point["tests"], seed=2, lot="L2")
                tables[point["tests"]] = (train.readings(), timed.readings().astype(np.float32))
            X, rows = tables[point["tests"]]
            p50, p99 = _latency(X, rows, point["trees"], point["max_samples"])
            key = f"scaling.{sweep}.{value}"
            figures[f"{key}.p50_us"], figures[f"{key}.p99_us"] = p50, p99
            if sweep == "max_samples":
                figures[f"{key}.max_depth"] = math.ceil(math.log2(value))
            curves[sweep].append((value, p50, p99))
    return figures, curves


def _latency(X: np.ndarray, rows: np.ndarray, trees: int, max_samples: int) -> tuple[float, float]:
    pipeline = Pipeline([("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
                         ("forest", IsolationForest(n_estimators=trees, max_samples=max_samples, random_state=0))])
    pipeline.fit(X)
    session = make_session(isolation_forest_to_onnx(pipeline).SerializeToString())
    warm_up(session, rows.shape[1])
    name = session.get_inputs()[0].name
    singles = [rows[i:i + 1] for i in range(len(rows))]
    latencies = _timed(lambda x: session.run(None, {name: x}), singles)
    return round(float(np.percentile(latencies, 50)), 1), round(float(np.percentile(latencies, 99)), 1)
