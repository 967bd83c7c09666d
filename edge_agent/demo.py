"""Stream a lot through a running agent the way a test program would, and summarise what it decided.

    from edge_agent.client import AgentClient
    from edge_agent.demo import feature_columns, stream_lot
    with AgentClient("tcp://127.0.0.1:5555", timeout_ms=50) as client:
        summary = stream_lot(client, table, feature_columns("models", "demo"))
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from trainer.registry import Registry
from trainer.table import ParametricTable

from .client import AgentClient
from .summary import ReplySummary

PART_IDENTITY = ("lot", "wafer", "x", "y", "head", "site", "part_id")


def feature_columns(registry_root: str, name: str, stage: str = "production") -> list[str]:
    """The model's feature order (manifest), which the readings sent to the agent follow."""
    registry = Registry(registry_root)
    return [f["column"] for f in registry.manifest(registry.resolve(name, stage))["features"]]


def stream_lot(client: AgentClient, table: ParametricTable, columns: list[str], *,
               limit: int | None = None) -> dict:
    """Score every part of ``table`` (in table order) one call at a time; summary of the decisions.

    Tests of the model that the table lacks are sent as NaN (not run). The summary is ReplySummary.as_dict()
    plus the model's tests that the table lacks.
    """
    frame = table.frame if limit is None else table.frame.iloc[:limit]
    present = [c for c in columns if c in frame.columns]
    readings = np.full((len(frame), len(columns)), np.nan, dtype=np.float32)
    readings[:, [columns.index(c) for c in present]] = frame[present].to_numpy(np.float32, na_value=np.nan)
    identities = part_identities(frame)

    summary = ReplySummary()
    for row, part in zip(readings, identities):
        summary.add(part, client.score(row, part))
    return {**summary.as_dict(), "tests_missing_from_table": [c for c in columns if c not in frame.columns]}


def part_identities(frame: pd.DataFrame) -> list[dict]:
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
