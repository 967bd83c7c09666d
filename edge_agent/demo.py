"""Stream a lot through a running agent the way a test program would, and summarise what it decided.

    from edge_agent.client import AgentClient
    from edge_agent.demo import feature_columns, stream_lot
    with AgentClient("tcp://127.0.0.1:5555", timeout_ms=50) as client:
        summary = stream_lot(client, table, feature_columns("models", "demo"))
"""
from __future__ import annotations

from trainer.table import ParametricTable

from .client import AgentClient
from .replay import plan_from_table, registry_features, replay


def feature_columns(registry_root: str, name: str, stage: str = "production") -> list[str]:
    """The model's feature order (manifest), which the readings sent to the agent follow."""
    return registry_features(registry_root, name, stage)[0]


def stream_lot(client: AgentClient, table: ParametricTable, columns: list[str]) -> dict:
    """Score every part of ``table`` (in table order) one call at a time, back to back; summary of the decisions.

    Tests of the model that the table lacks are sent as NaN (not run). The summary is ReplySummary.as_dict()
    plus the model's tests that the table lacks.
    """
    plan = plan_from_table(table, columns)
    return {**replay(plan, client).as_dict(), "tests_missing_from_table": plan.missing_tests}
