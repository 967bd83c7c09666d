"""Does an ONNX graph reproduce its scikit-learn model? Scored in a real onnxruntime session, as served.

Rows are scored one at a time (how the agent serves) and as one batch (how a multi-site request arrives),
and optionally in batches of a given size (how the agent's load-time smoke test scores a package's sample
rows); the worst is reported, because an int8 graph quantizes activations per call.
"""
from __future__ import annotations

import numpy as np

from edge_agent.errors import ExportError
from edge_agent.package.manifest import FidelityCheck
from edge_agent.package.runtime import make_session


def check_fidelity(model_bytes: bytes, expected: np.ndarray, X32: np.ndarray, *, output: str, threshold: float,
                   outlier_below: bool, file: str, refuse: bool = True, min_agreement: float = 0.999,
                   batch_rows: int | None = None) -> FidelityCheck:
    """Compare the graph's ``output`` on ``X32`` with scikit-learn's ``expected`` values.

    ``expected`` must be scikit-learn's values on ``X32`` itself (``X32.astype(np.float64)``), the rows the agent
    is sent: a HistGradientBoostingClassifier compares float64 readings, so on readings float32 does not represent
    (CSV data) its values on the float64 originals differ from any float32 graph (up to 0.08-0.19 measured on
    SECOM) although every split on a float32 reading decides as in scikit-learn.

    decision = value < threshold (``outlier_below``) or value >= threshold; passed when every value is
    finite and decisions agree on at least ``min_agreement`` of the rows. With ``refuse`` a failed check
    raises ExportError. ``batch_rows``: also score consecutive batches of that many rows, so that the
    recorded difference covers a later call on the first ``batch_rows`` rows (the package's sample rows).
    """
    X32 = np.ascontiguousarray(X32, dtype=np.float32)
    expected = np.asarray(expected, dtype=np.float64).reshape(-1)
    if X32.ndim != 2 or len(X32) == 0 or len(X32) != len(expected):
        raise ExportError(f"{file}: fidelity needs rows [n > 0, features] and one expected value per row, got "
                          f"rows of shape {X32.shape} and {len(expected)} expected values")
    session = make_session(model_bytes)
    input_name = session.get_inputs()[0].name
    if output not in [o.name for o in session.get_outputs()]:
        raise ExportError(f"{file}: the graph has no output {output!r} "
                          f"(outputs: {[o.name for o in session.get_outputs()]})")
    batch = session.run([output], {input_name: X32})[0].reshape(-1)
    if len(batch) != len(X32):
        raise ExportError(f"{file}: output {output!r} has {len(batch)} values for {len(X32)} rows, "
                          "expected one per row")

    def in_batches(rows: int) -> np.ndarray:
        return np.concatenate([session.run([output], {input_name: X32[i:i + rows]})[0].reshape(-1)
                               for i in range(0, len(X32), rows)])

    def decide(values: np.ndarray) -> np.ndarray:
        return values < threshold if outlier_below else values >= threshold

    scored = [batch, in_batches(1)] + ([in_batches(batch_rows)] if batch_rows else [])
    wanted = decide(expected)
    max_abs_diff = max(_max_abs_diff(got, expected) for got in scored)
    agreement = min(float(np.mean(decide(got) == wanted)) for got in scored)
    result = FidelityCheck(file=file, rows=int(len(X32)), max_abs_diff=max_abs_diff, decision_agreement=agreement,
                           min_agreement=float(min_agreement),
                           passed=bool(np.isfinite(max_abs_diff) and agreement >= min_agreement))
    if refuse and not result.passed:
        raise ExportError(f"{file} does not reproduce its scikit-learn model: decisions agree on {agreement:.4%} "
                          f"of {len(X32)} rows (need {min_agreement:.2%}), max abs difference {max_abs_diff:.3g}")
    return result


def _max_abs_diff(got: np.ndarray, expected: np.ndarray) -> float:
    difference = np.abs(got.astype(np.float64) - expected)
    return float("inf") if not np.all(np.isfinite(difference)) else float(difference.max())
