"""ONNX export: compact graphs of the trained pipelines, int8 variants, fidelity checks, tuned sessions.

Names load on first use: the edge agent needs only ``runtime`` and must not pay scikit-learn's import
(about 1 s and tens of MB) that the converters bring.
"""
from __future__ import annotations

import importlib

_HOMES = {
    "check_fidelity": "fidelity",
    "isolation_forest_to_onnx": "iforest",
    "TREE_QUANTIZATION_NOTE": "quantize", "quantize_int8": "quantize", "supports_int8": "quantize",
    "yield_model_to_onnx": "yield_model",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
