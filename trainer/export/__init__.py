"""ONNX export: compact graphs of the trained pipelines, int8 variants, fidelity checks, tuned sessions."""
from __future__ import annotations

from .fidelity import check_fidelity
from .iforest import isolation_forest_to_onnx
from .quantize import TREE_QUANTIZATION_NOTE, quantize_int8, supports_int8
from .runtime import make_session, warm_up
from .yield_model import yield_model_to_onnx

__all__ = ["isolation_forest_to_onnx", "yield_model_to_onnx", "supports_int8", "quantize_int8",
           "TREE_QUANTIZATION_NOTE", "check_fidelity", "make_session", "warm_up"]
