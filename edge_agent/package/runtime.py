"""onnxruntime sessions tuned for one-row latency; shared by the trainer's fidelity check, the agent and bench.

Measured at the start of the project (onnxruntime 1.32, 2 cores): onnxruntime spreads a forest of more than 80
trees over its thread pool even for one row, and spinning pool threads burn the cores the tester needs. One
intra-op thread, no spinning and a warm-up at load give steady single-row latency from the first request on.

The agent runs a package's two graphs as one (``combined_graph``): each onnxruntime call has a fixed cost (the
Python binding's checks, the run's setup, and after a pause the first touch of the session's code and buffers), so
one call per part instead of two. Measured on the benchmark package (200 tests, 200 + 100 trees, one row, this
2-core VM): 36.5 us back to back for the two sessions against 28 us for the combined one; after a 0.2 ms pause
78-102 against 49-86 us, after 1 ms 120-158 against 115 us, after 10 ms 354-447 against 286-396 us. Its outputs are
the two graphs' own, bit for bit (the same kernels on the same input).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import ExportError

YIELD_PREFIX = "yield/"   # the yield graph's names inside the combined graph (the outlier graph's are kept)


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


def combined_graph(outlier: bytes, yield_graph: bytes, input_name: str) -> bytes:
    """One ONNX model computing both graphs of a package from their one input ``input_name``: the outlier graph's
    names unchanged, the yield graph's prefixed with ``YIELD_PREFIX`` (its output too), its input fed from the
    shared one. ExportError when the two graphs cannot be combined: another input, or one opset domain at two
    versions (the trainer exports both at the same opsets)."""
    graphs = {"outlier": onnx.load_from_string(outlier), "yield": onnx.load_from_string(yield_graph)}
    opsets: dict[str, int] = {}
    for name, model in graphs.items():
        inputs = [value.name for value in model.graph.input]
        if inputs != [input_name]:
            raise ExportError(f"the {name} graph takes inputs {inputs}, expected only {input_name!r}")
        for opset in model.opset_import:
            if opsets.setdefault(opset.domain, opset.version) != opset.version:
                raise ExportError(f"the outlier and yield graphs import opset domain {opset.domain or 'ai.onnx'!r} at "
                                  f"versions {opsets[opset.domain]} and {opset.version}: they cannot run as one graph")
    first, second = graphs["outlier"], onnx.compose.add_prefix(graphs["yield"], YIELD_PREFIX)
    feed = onnx.helper.make_node("Identity", [input_name], [second.graph.input[0].name], name=f"{YIELD_PREFIX}input")
    graph = onnx.helper.make_graph([*first.graph.node, feed, *second.graph.node], "outlier_and_yield",
                                   [*first.graph.input], [*first.graph.output, *second.graph.output],
                                   initializer=[*first.graph.initializer, *second.graph.initializer],
                                   value_info=[*first.graph.value_info, *second.graph.value_info],
                                   sparse_initializer=[*first.graph.sparse_initializer,
                                                       *second.graph.sparse_initializer])
    combined = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(domain, version)
                                                            for domain, version in opsets.items()],
                                      ir_version=max(first.ir_version, second.ir_version),
                                      producer_name="edge_agent.package.runtime")
    combined.functions.extend([*first.functions, *second.functions])
    return combined.SerializeToString()
