"""int8 variants: which models have one, and how it is made.

onnxruntime's dynamic quantization stores MatMul weights as 8-bit integers and quantizes each call's
activations to uint8 on the fly (scale from that call's min/max), so a row's int8 score can depend slightly
on the other rows in the same call. The fidelity check scores row by row and as one batch for that reason.

Weights are uint8 (onnxruntime's U8U8 format), not int8 (U8S8), so that a graph scores the same on every x86
CPU. Without VNNI (AVX2, or AVX-512 without VNNI) onnxruntime computes U8S8 with VPMADDUBSW, which adds two
uint8 x int8 products into a saturating int16 (2 x 255 x 127 = 64,770 > 32,767): an MLP whose probabilities
were within 0.012 of scikit-learn on a VNNI CPU was off by 0.157 on an AVX2 one (onnxruntime's quantization
guide, "When and why do I need to try U8U8?"). onnxruntime's U8U8 kernels widen both operands to 16 bits
and add pairs into 32 bits (VPMADDWD) or use 32-bit VNNI sums, so the integer result is exact on every x86
CPU: the same U8U8 graph gave bit-identical scores on an AVX-512 VNNI CPU and on emulated AVX2-only Haswell
and EPYC-Rome CPUs. ``reduce_range`` (7-bit int8 weights, 2 x 255 x 64 fits) avoids the saturation too, but
halves the weight resolution: its largest difference from scikit-learn was larger than U8U8's for 7 of 8
models measured (logistic and MLP on four data sets), by up to 1.7x.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

from edge_agent.errors import ExportError

TREE_QUANTIZATION_NOTE = (
    "No int8 or float16 variant: onnxruntime quantizes MatMul/Conv-style operators only and has no int8 or "
    "float16 tree-ensemble kernels, so tree models ship as one float32 TreeEnsemble node holding the whole "
    "forest, each split threshold stored as the largest float32 at or below scikit-learn's float64 threshold "
    "(so every split on a float32 reading decides exactly as in scikit-learn). That single node is already the "
    "small, fast form: thresholds and leaf values are only about a third of its bytes (the rest is tree "
    "structure), so int8 values could save at most about a quarter, and scoring a row is branch traversal, "
    "not arithmetic that int8 would speed up.")

_DENSE_INT8_REASON = ("the model is MatMul layers: onnxruntime dynamic quantization stores their weights as uint8 "
                      "and quantizes activations to uint8 per call (U8U8, chosen over int8 weights because "
                      "onnxruntime sums uint8 x int8 products in saturating 16-bit integers on x86 CPUs without "
                      "VNNI, so an int8-weight graph can score differently from one CPU to another; U8U8 sums "
                      "are exact on every x86 CPU); shipped only if its decisions agree with scikit-learn")


def supports_int8(pipeline) -> tuple[bool, str]:
    """Whether the pipeline's final model has an int8 ONNX variant, and why (for the manifest)."""
    model = pipeline.steps[-1][1] if hasattr(pipeline, "steps") else pipeline
    if isinstance(model, (LogisticRegression, MLPClassifier)):
        return True, _DENSE_INT8_REASON
    if isinstance(model, (RandomForestClassifier, HistGradientBoostingClassifier)):
        return False, TREE_QUANTIZATION_NOTE
    return False, f"no int8 export exists for {type(model).__name__}"


def quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with every MatMul weight quantized to 8 bits (dynamic quantization, uint8 weights)."""
    if not any(node.op_type == "MatMul" for node in model.graph.node):
        raise ExportError("int8 quantization needs a graph with MatMul layers; this graph has none "
                          f"(operators: {sorted({node.op_type for node in model.graph.node})})")
    with tempfile.TemporaryDirectory(prefix="edge-quantize-") as folder, _without_pre_processing_advice():
        target = Path(folder) / "int8.onnx"
        # uint8 weights (U8U8): exact integer sums on every x86 CPU, see the module docstring.
        quantize_dynamic(model, target, op_types_to_quantize=["MatMul"], weight_type=QuantType.QUInt8)
        quantized = onnx.load(target)
    onnx.checker.check_model(quantized)
    return quantized


@contextlib.contextmanager
def _without_pre_processing_advice():
    """Silence quantize_dynamic's advice to pre-process first: pre-processing fuses MatMul + Add into Gemm,
    which dynamic quantization does not cover, so following it would leave nothing quantized."""
    def keep(record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
