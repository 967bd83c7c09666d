"""Stream a lot through a running agent the way a test program would, and summarise what it decided.

    from edge_agent.client import AgentClient
    from edge_agent.demo import feature_columns, stream_lot
    with AgentClient("tcp://127.0.0.1:5555", timeout_ms=50) as client:
        summary = stream_lot(client, table, feature_columns("models", "demo"))
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

from trainer.registry import Registry
from trainer.table import ParametricTable

from .client import AgentClient

PART_IDENTITY = ("lot", "wafer", "x", "y", "head", "site", "part_id")
TOP_OUTLIERS = 10


def feature_columns(registry_root: str, name: str, stage: str = "production") -> list[str]:
    """The model's feature order (manifest), which the readings sent to the agent follow."""
    registry = Registry(registry_root)
    return [f["column"] for f in registry.manifest(registry.resolve(name, stage))["features"]]


def stream_lot(client: AgentClient, table: ParametricTable, columns: list[str], *,
               limit: int | None = None) -> dict:
    """Score every part of ``table`` (in table order) one call at a time; summary of the decisions.

    Tests of the model that the table lacks are sent as NaN (not run). The summary holds counts of bins and
    flags, the parts where PAT and the ML outlier model disagree, the most anomalous parts, no-decision
    reasons, the model versions that decided, and the round trip latency seen by the caller.
    """
    frame = table.frame if limit is None else table.frame.iloc[:limit]
    present = [c for c in columns if c in frame.columns]
    readings = np.full((len(frame), len(columns)), np.nan, dtype=np.float32)
    readings[:, [columns.index(c) for c in present]] = frame[present].to_numpy(np.float32, na_value=np.nan)
    identities = _identities(frame)

    bins, flags, versions, no_decision = Counter(), Counter(), Counter(), Counter()
    ml_only, pat_only, both = [], [], 0
    scored: list[tuple[float, dict]] = []
    round_trips = []
    for row, part in zip(readings, identities):
        result = client.score(row, part)
        if result.round_trip_us is not None:
            round_trips.append(result.round_trip_us)
        if not result.decided:
            no_decision[result.error_code] += 1
            continue
        bins[result.bin_name] += 1
        flags.update(result.flags)
        versions[result.model["version"]] += 1
        ml = "ml_outlier" in result.flags
        pat = "static_pat" in result.flags or "dynamic_pat" in result.flags
        if ml and pat:
            both += 1
        elif ml:
            ml_only.append(part)
        elif pat:
            pat_only.append({**part, "tests": sorted({b["test"] for b in result.pat})})
        scored.append((result.outlier_score, part))

    scored.sort(key=lambda item: item[0])
    latency = np.asarray(round_trips) if round_trips else np.full(1, np.nan)
    return {
        "parts": len(frame), "decided": sum(bins.values()), "no_decision": dict(no_decision),
        "tests_missing_from_table": [c for c in columns if c not in frame.columns],
        "bins": dict(bins), "flags": dict(flags), "model_versions": dict(versions),
        "pat_and_ml_outlier": both, "ml_outlier_only": ml_only, "pat_only": pat_only,
        "most_anomalous": [{**part, "outlier_score": score} for score, part in scored[:TOP_OUTLIERS]],
        "round_trip_us": {"p50": float(np.percentile(latency, 50)), "p99": float(np.percentile(latency, 99)),
                          "max": float(np.max(latency))},
    }


def _identities(frame: pd.DataFrame) -> list[dict]:
    """Part identity maps with plain Python values (msgpack does not pack numpy scalars); unknowns left out."""
    fields = [f for f in PART_IDENTITY if f in frame.columns]
    records = frame[fields].to_dict("records")
    return [{k: _plain(v) for k, v in record.items() if not pd.isna(v)} for record in records]


def _plain(value):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)   # integer identity columns read back as float when they hold missing values
    return value
