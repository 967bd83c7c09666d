"""onnxruntime sessions tuned for one-row latency; shared by the trainer's fidelity check, the agent and bench.

Measured at the start of the project (onnxruntime 1.32, 2 cores): onnxruntime spreads a forest of more than 80
trees over its thread pool even for one row, and spinning pool threads burn the cores the tester needs. One
intra-op thread, no spinning and a warm-up at load give steady single-row latency from the first request on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import ExportError


def make_session(model: bytes | str | Path, *, threads: int = 1) -> ort.InferenceSession:
    """A CPU session over ONNX bytes or a file path, sequential, ``threads`` intra-op threads, no spinning."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def warm_up(session: ort.InferenceSession, n_features: int, rounds: int = 50) -> None:
    """Run ``rounds`` single-row inferences (complete rows and all-missing rows) so the first real request
    does not pay for lazy allocation; refuses a graph whose input width is not ``n_features``."""
    graph_input = session.get_inputs()[0]
    width = graph_input.shape[-1] if graph_input.shape else None
    if isinstance(width, int) and width != n_features:
        raise ExportError(f"the ONNX graph's input {graph_input.name!r} takes {width} features, "
                          f"expected {n_features}")
    rows = (np.zeros((1, n_features), np.float32), np.full((1, n_features), np.nan, np.float32))
    for i in range(rounds):
        session.run(None, {graph_input.name: rows[i % 2]})
