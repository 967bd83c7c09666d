"""Assemble a model package (ONNX graphs, manifest, model card, sample rows) and publish it.

Every graph is checked against the scikit-learn model it came from before anything is written;
an export that disagrees is refused (ExportError) and the registry is left untouched.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import platform
import subprocess
from pathlib import Path

import numpy as np

from edge_agent import __version__
from edge_agent.keys import SigningKey
from edge_agent.package.manifest import (MODEL_CARD_FILE, OUTLIER_FILE, SAMPLE_ROWS_FILE, YIELD_FILE, YIELD_INT8_FILE,
                                         Feature, FidelityCheck, HeldOut, HeldOutMetrics, ImputationMethod, InputSpec,
                                         Lineage, Manifest, Models, OutlierModel, Pat, Quantization, QualityGate,
                                         SourceFile, YieldLabel, YieldModel, YieldThreshold)
from edge_agent.package.registry import PackageRef, Registry
from edge_agent.package.rules import LIMIT_SHARE_FLOOR, RESOLUTION_FLOOR

from .export import (TREE_QUANTIZATION_NOTE, check_fidelity, isolation_forest_to_onnx, quantize_int8, supports_int8,
                     yield_model_to_onnx)
from .modelcard import render_model_card
from .reference import PAT_MIN_PARTS, drift_reference, static_pat_limits
from .screens import check_screens
from .table import ParametricTable
from .train import TrainedModels

PAT_METHOD = ("AEC-Q001 over passing training parts, by each test's shape (edge_agent.package.rules): normal and "
              "discrete median +/- k * IQR/1.35; lognormal the same on log(reading); skewed a half-IQR sigma per "
              "side; bimodal around both modes; constant none. Every sigma >= resolution_floor x the test's "
              "resolution (read site by site) and >= limit_share_floor x its limit range; static limits leave "
              "each test's lot_allowance for the next lot; a test whose robust sigma differs between training lots takes its widest lot's; then "
              "the self-check widens (or disables) a test flagging more than max_flag_rate of the passing parts")
# The agent's load-time smoke test scores these first held-out rows as one call; every fidelity check scores
# that call too, so the difference the manifest records covers what the smoke test will see.
SAMPLE_ROWS = 256
INPUT_NAME = "readings"


def build_and_publish(trained: TrainedModels, table: ParametricTable, validation: dict,
                      registry: Registry, source_files: list[str], signer: SigningKey | None = None) -> PackageRef:
    """Build the package and publish it, signed by ``signer`` (None: unsigned, refused by agents outside
    development mode)."""
    files, manifest = build_package(trained, table, validation, source_files)
    return registry.publish(trained.config.name, files, manifest, reason="trained by edge-train fit", signer=signer)


def build_package(trained: TrainedModels, table: ParametricTable, validation: dict,
                  source_files: list[str]) -> tuple[dict[str, bytes], Manifest]:
    X = table.readings(trained.columns)      # the features: never the label or a join key (trainer.train.fit)
    features = [t for t in table.tests if t.column in set(trained.columns)]
    holdout = X[trained.holdout_index]
    holdout32 = holdout.astype(np.float32)
    expected_score = trained.outlier.decision_function(holdout)
    expected_prob = trained.yield_model.predict_proba(holdout32.astype(np.float64))[:, 1]   # the agent's rows

    files: dict[str, bytes] = {}
    fidelity: dict[str, FidelityCheck] = {}

    outlier_bytes = isolation_forest_to_onnx(trained.outlier).SerializeToString()
    fidelity["outlier.float32"] = check_fidelity(
        outlier_bytes, expected_score, holdout32, output="score", threshold=trained.outlier_threshold,
        outlier_below=True, file=OUTLIER_FILE, batch_rows=SAMPLE_ROWS)
    files[OUTLIER_FILE] = outlier_bytes

    yield_onnx = yield_model_to_onnx(trained.yield_model)
    yield_bytes = yield_onnx.SerializeToString()
    fidelity["yield.float32"] = check_fidelity(
        yield_bytes, expected_prob, holdout32, output="pass_probability", threshold=trained.yield_threshold,
        outlier_below=False, file=YIELD_FILE, batch_rows=SAMPLE_ROWS)
    files[YIELD_FILE] = yield_bytes
    yield_files = {"float32": YIELD_FILE}

    int8_possible, int8_reason = supports_int8(trained.yield_model)
    if int8_possible:
        int8_bytes = quantize_int8(yield_onnx).SerializeToString()
        check = check_fidelity(int8_bytes, expected_prob, holdout32, output="pass_probability",
                               threshold=trained.yield_threshold, outlier_below=False,
                               file=YIELD_INT8_FILE, refuse=False, batch_rows=SAMPLE_ROWS)
        if check.passed:
            files[YIELD_INT8_FILE] = int8_bytes
            yield_files["int8"] = YIELD_INT8_FILE
            fidelity["yield.int8"] = check
        else:
            int8_reason = (f"int8 variant refused: decisions agree on {check.decision_agreement:.4%} of "
                           f"{check.rows} held-out rows, below {check.min_agreement:.1%}")
            int8_possible = False

    files[SAMPLE_ROWS_FILE] = _sample_rows(holdout32[:SAMPLE_ROWS], expected_score[:SAMPLE_ROWS],
                                           expected_prob[:SAMPLE_ROWS])

    passed = _passing_mask(table)
    train_rows = trained.train_index
    reference_rows = train_rows[passed[train_rows]]
    reference_scores = trained.outlier.decision_function(X[reference_rows])
    pat_rules = dict(k_sigma=trained.config.pat_k_sigma, max_flag_rate=trained.config.pat_max_flag_rate,
                     on_excess=trained.config.pat_on_excess)
    limit_ranges = [t.high - t.low if t.low is not None and t.high is not None else None for t in features]
    screens, screens_cut = check_screens(table, X, trained.columns, passed, **pat_rules, limit_ranges=limit_ranges)
    imputer_values = trained.outlier.named_steps["impute"].statistics_

    manifest = Manifest(
        name=trained.config.name,   # the registry allocates the version and lists the files
        created_at=_now(),
        features=[Feature(index=i, column=t.column, name=t.name, number=t.number, units=t.units or "", low=t.low,
                          high=t.high, pin=t.pin, impute=float(imputer_values[i]))
                  for i, t in enumerate(features)],
        imputation=ImputationMethod(strategy="median", where="inside the ONNX graphs",
                                    values_from="passing training parts (outlier model); the yield graph carries "
                                                "its own medians over all training parts"),
        input=InputSpec(name=INPUT_NAME, dtype="float32", shape=[None, len(features)], missing="NaN"),
        models=Models(
            outlier=OutlierModel(
                kind="isolation_forest", files={"float32": OUTLIER_FILE}, output="score",
                score_convention="IsolationForest.decision_function: lower = more anomalous; "
                                 "outlier when score < threshold",
                threshold=trained.outlier_threshold, target_outlier_rate=trained.config.target_outlier_rate,
                trained_on=trained.config.train_outlier_on,
                params=_json_params(trained.outlier.named_steps["forest"]),
                quantization=Quantization(int8=False, reason=TREE_QUANTIZATION_NOTE)),
            yield_model=YieldModel(
                kind=trained.yield_kind, files=yield_files, output="pass_probability",
                threshold=trained.yield_threshold, label=trained.yield_label,
                params=_json_params(trained.yield_model.named_steps["model"]),
                quantization=Quantization(int8=int8_possible, reason=int8_reason), **_yield_evaluation(trained))),
        pat=Pat(k_sigma=trained.config.pat_k_sigma, method=PAT_METHOD, min_parts=PAT_MIN_PARTS,
                limits=static_pat_limits(X[reference_rows], trained.columns, **pat_rules,
                                         lots=table.lot_keys()[reference_rows], wafers=table.wafer_keys()[reference_rows],
                                         sites=table.site_keys()[reference_rows], limit_ranges=limit_ranges),
                resolution_floor=RESOLUTION_FLOOR, limit_share_floor=LIMIT_SHARE_FLOOR,
                max_flag_rate=trained.config.pat_max_flag_rate, on_excess=trained.config.pat_on_excess,
                screens=screens, screens_cut=screens_cut),
        drift_reference=drift_reference(X[reference_rows], trained.columns, reference_scores,
                                        trained.outlier_threshold, trained.config.drift_bins),
        metrics=HeldOutMetrics(outlier=trained.metrics["outlier"], yield_model=trained.metrics["yield"],
                               timings_s=trained.timings_s),
        fidelity=fidelity,
        validation=validation,
        lineage=Lineage(
            data_sha256=_data_sha256(table, trained.columns), rows=len(table), train_rows=int(len(train_rows)),
            holdout_rows=int(len(trained.holdout_index)), sources=[_source_entry(path) for path in source_files],
            code_version=_code_version(), parameters=trained.config.to_dict(), trained_at=_now(),
            versions=_library_versions()),
        held_out=_held_out(trained),
    )
    files[MODEL_CARD_FILE] = render_model_card(manifest).encode()
    return files, manifest


def _passing_mask(table: ParametricTable) -> np.ndarray:
    if "passed" in table.frame.columns:
        return table.frame["passed"].to_numpy(bool)
    return np.ones(len(table), bool)


def _sample_rows(readings: np.ndarray, score: np.ndarray, prob: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, readings=readings, score=score.astype(np.float32), pass_probability=prob.astype(np.float32))
    return buffer.getvalue()


def _data_sha256(table: ParametricTable, columns: list[str]) -> str:
    """Hash of exactly what was trained on: column names and readings after validation."""
    digest = hashlib.sha256("\x1f".join(columns).encode())
    digest.update(np.ascontiguousarray(table.readings(columns)).tobytes())
    return digest.hexdigest()


def _yield_evaluation(trained: TrainedModels) -> dict:
    """The yield model's label, threshold choice and gate against chance, as the manifest records them."""
    label, threshold, gate, config = trained.label, trained.threshold, trained.gate, trained.config
    metrics = trained.metrics["yield"]
    return {
        "label_source": YieldLabel(column=label.column, source=label.source, meaning=label.meaning,
                                   pass_value=label.pass_value,
                                   outcomes=trained.outcomes.to_dict() if trained.outcomes else None),
        "threshold_choice": YieldThreshold(
            objective=threshold.objective, note=threshold.note, tuning_parts=metrics["tuning_parts"],
            evaluation_parts=metrics["evaluation_parts"],
            target_precision=config.target_precision if threshold.objective == "fail_precision" else None),
        "gate": QualityGate(min_auc=gate.min_auc, roc_auc=gate.roc_auc, passed=gate.passed, reason=gate.reason,
                            auc_low=gate.auc_low, auc_high=gate.auc_high, fails=gate.fails,
                            advisory=not gate.passed),
    }


def _held_out(trained: TrainedModels) -> HeldOut:
    """The yield model's out-of-time parts: the forward folds' test blocks."""
    folds, forward = trained.folds, trained.forward
    reason = folds.reason + (f"; {forward.sampled}" if forward.sampled else "")
    return HeldOut(split=folds.kind, reason=reason, parts=int(len(forward.rows)), held_out_lots=[],
                   training_lots=[], time_from=None)


def _source_entry(path: str) -> SourceFile:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return SourceFile(path=str(Path(path).resolve()), sha256=digest.hexdigest(), bytes=Path(path).stat().st_size)


def _json_params(estimator) -> dict:
    return {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
            for k, v in estimator.get_params().items()}


def _code_version() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except OSError:
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def _library_versions() -> dict:
    import onnx
    import onnxruntime
    import skl2onnx
    import sklearn
    return {"python": platform.python_version(), "numpy": np.__version__, "sklearn": sklearn.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "skl2onnx": skl2onnx.__version__}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
