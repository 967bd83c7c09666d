"""Central trainer: ingestion, validation, training, ONNX export, demo and replay.

It depends on the agent's contract (``edge_agent.package``, ``edge_agent.wire``), never the reverse. Kept
import-light: `edge-train --help` and the registry commands import no scikit-learn.
"""
