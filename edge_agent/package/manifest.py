"""The package manifest's schema (schema_version 1), checked by hand with the JSON path of every problem.

stdlib only: the edge agent runs these checks before it loads a package.
"""
from __future__ import annotations

import datetime as dt
import math
import re
from typing import Any

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_CARD_FILE = "model_card.md"
SAMPLE_ROWS_FILE = "sample_rows.npz"
REQUIRED_FILES = (MODEL_CARD_FILE, SAMPLE_ROWS_FILE)
YIELD_KINDS = ("random_forest", "logistic", "mlp")
VARIANTS = ("float32", "int8")

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")   # model names and package file names
VERSION_PATTERN = re.compile(r"[1-9][0-9]{0,17}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")

_KINDS = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, (list, tuple)),
    "object": lambda v: isinstance(v, dict),
}
_INVALID = object()   # what a field check returns for a missing or mistyped value


def validate_manifest(manifest: Any) -> list[str]:
    """Every way ``manifest`` breaks schema_version 1, each naming its JSON path; empty when it is valid."""
    check = _Checker()
    if check.typed(manifest, "manifest", "object") is _INVALID:
        return check.problems
    _check_json_values(check, manifest, "manifest")
    top = check.fields(manifest, "manifest", {
        "schema_version": "integer", "name": "string", "version": "string", "created_at": "string",
        "features": "array", "imputation": "object", "input": "object", "models": "object", "pat": "object",
        "drift_reference": "object", "metrics": "object", "fidelity": "object", "validation": "object",
        "lineage": "object", "files": "object"})
    if "schema_version" in top and top["schema_version"] != SCHEMA_VERSION:
        check.fail("manifest.schema_version", f"expected {SCHEMA_VERSION}, got {top['schema_version']}")
    if "name" in top:
        check.matches(top["name"], "manifest.name", NAME_PATTERN, "a model name (letters, digits, . _ -)")
    if "version" in top:
        check.matches(top["version"], "manifest.version", VERSION_PATTERN, "a positive integer as a string")
    if "created_at" in top:
        check.iso_utc(top["created_at"], "manifest.created_at")
    columns = _check_features(check, top.get("features"))
    if "imputation" in top:
        check.fields(top["imputation"], "manifest.imputation",
                     {"strategy": "string", "where": "string", "values_from": "string"})
    if "input" in top:
        _check_input(check, top["input"], None if columns is None else len(columns))
    files = _check_files(check, top.get("files"))
    if "models" in top:
        _check_models(check, top["models"], files)
    if "pat" in top:
        _check_pat(check, top["pat"], columns)
    if "drift_reference" in top:
        _check_drift_reference(check, top["drift_reference"], columns)
    if "metrics" in top:
        check.fields(top["metrics"], "manifest.metrics", {"outlier": "object", "yield": "object"})
    if "fidelity" in top:
        for key, entry in top["fidelity"].items():
            _check_fidelity_entry(check, key, entry)
    if "lineage" in top:
        _check_lineage(check, top["lineage"])
    return check.problems


def fidelity_problems(manifest: dict) -> list[str]:
    """The quality gate: every shipped ONNX graph has a fidelity entry, and every entry for a shipped file passed.

    Tolerates a malformed manifest (``validate_manifest`` reports the malformation itself).
    """
    files = manifest.get("files")
    shipped = set(files) if isinstance(files, dict) else set()
    fidelity = manifest.get("fidelity")
    fidelity = fidelity if isinstance(fidelity, dict) else {}
    problems = []
    models = manifest.get("models")
    for model, spec in (models.items() if isinstance(models, dict) else ()):
        variants = spec.get("files") if isinstance(spec, dict) else None
        for variant, file in (variants.items() if isinstance(variants, dict) else ()):
            entry = fidelity.get(f"{model}.{variant}")
            if not isinstance(entry, dict) or entry.get("file") != file:
                problems.append(f"{file}: no fidelity entry 'fidelity.{model}.{variant}' for this graph "
                                "(every shipped ONNX graph must be checked against its scikit-learn model)")
    for key, entry in fidelity.items():
        if not isinstance(entry, dict) or entry.get("file") not in shipped:
            continue
        where = f"{entry['file']}: fidelity.{key}"
        if entry.get("passed") is not True:
            problems.append(f"{where}.passed is {entry.get('passed')!r}, expected true")
        agreement, minimum = entry.get("decision_agreement"), entry.get("min_agreement")
        if _KINDS["number"](agreement) and _KINDS["number"](minimum) and not agreement >= minimum:
            problems.append(f"{where}.decision_agreement {agreement:.6g} is below min_agreement {minimum:.6g}")
    return problems


class _Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def typed(self, value: Any, path: str, kinds: str) -> Any:
        """``value`` if it is one of ``kinds`` ("number|null"), else records the problem and returns _INVALID."""
        names = kinds.split("|")
        if any(_KINDS[name](value) for name in names):
            return value
        self.fail(path, f"expected {' or '.join(names)}, got {_type_name(value)}")
        return _INVALID

    def fields(self, obj: dict, path: str, spec: dict[str, str], optional: tuple[str, ...] = ()) -> dict:
        """The fields of ``obj`` named in ``spec`` that are present and well typed; records the others."""
        valid = {}
        for key, kinds in spec.items():
            if key not in obj:
                if key not in optional:
                    self.fail(f"{path}.{key}", "missing")
                continue
            value = self.typed(obj[key], f"{path}.{key}", kinds)
            if value is not _INVALID:
                valid[key] = value
        return valid

    def objects(self, items: Any, path: str) -> list[tuple[str, dict]]:
        """(path, item) of every element of an array that is an object; records the others."""
        return [(f"{path}[{i}]", item) for i, item in enumerate(items)
                if self.typed(item, f"{path}[{i}]", "object") is not _INVALID]

    def matches(self, value: str, path: str, pattern: re.Pattern, meaning: str) -> None:
        if not pattern.fullmatch(value):
            self.fail(path, f"expected {meaning}, got {value!r}")

    def one_of(self, value: Any, path: str, choices: tuple) -> None:
        if value not in choices:
            self.fail(path, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")

    def iso_utc(self, value: str, path: str) -> None:
        try:
            moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            self.fail(path, f"expected an ISO 8601 time, got {value!r}")
            return
        if moment.utcoffset() != dt.timedelta(0):
            self.fail(path, f"expected a UTC time (+00:00), got {value!r}")

    def fraction(self, value: Any, path: str) -> None:
        if _KINDS["number"](value) and not 0.0 <= value <= 1.0:
            self.fail(path, f"expected a fraction in [0, 1], got {value!r}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_json_values(check: _Checker, value: Any, path: str) -> None:
    """Only JSON types, string keys and finite numbers: anything else cannot round-trip through manifest.json."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                check.fail(path, f"key {key!r} is a {type(key).__name__}, JSON keys are strings")
            _check_json_values(check, item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json_values(check, item, f"{path}[{i}]")
    elif isinstance(value, float):
        if not math.isfinite(value):
            check.fail(path, f"{value} is not a JSON number (write null for a missing value)")
    elif not (value is None or isinstance(value, (str, int, bool))):
        check.fail(path, f"a {type(value).__module__}.{type(value).__name__} is not a JSON value")


def _check_features(check: _Checker, features: Any) -> list[str] | None:
    """Feature columns in input order, or None when the feature list itself is unusable."""
    if features is None:
        return None
    columns = []
    for path, feature in check.objects(features, "manifest.features"):
        valid = check.fields(feature, path, {
            "index": "integer", "column": "string", "name": "string", "number": "integer|null", "units": "string",
            "low": "number|null", "high": "number|null", "pin": "string|null", "impute": "number"})
        position = len(columns)
        if "index" in valid and valid["index"] != position:
            check.fail(f"{path}.index", f"expected {position} (feature order is the ONNX input column order), "
                                        f"got {valid['index']}")
        column = valid.get("column")
        if column is not None and column in columns:
            check.fail(f"{path}.column", f"{column!r} appears twice in manifest.features")
        columns.append(column)
    if not columns:
        check.fail("manifest.features", "expected at least one feature, got none")
    return columns


def _check_input(check: _Checker, spec: dict, n_features: int | None) -> None:
    valid = check.fields(spec, "manifest.input",
                         {"name": "string", "dtype": "string", "shape": "array", "missing": "string"})
    if "dtype" in valid:
        check.one_of(valid["dtype"], "manifest.input.dtype", ("float32",))
    if "missing" in valid:
        check.one_of(valid["missing"], "manifest.input.missing", ("NaN",))
    shape = valid.get("shape")
    if shape is None:
        return
    if len(shape) != 2 or shape[0] is not None or not _KINDS["integer"](shape[1]):
        check.fail("manifest.input.shape", f"expected [null, <number of features>], got {list(shape)!r}")
    elif n_features is not None and shape[1] != n_features:
        check.fail("manifest.input.shape[1]", f"expected {n_features} (the number of manifest.features), "
                                              f"got {shape[1]}")


def _check_files(check: _Checker, files: Any) -> set[str]:
    if files is None:
        return set()
    for name, digest in files.items():
        path = f"manifest.files[{name!r}]"
        if name == MANIFEST_FILE:
            check.fail(path, "the manifest cannot list itself (the package checksum is its sha256)")
        elif not NAME_PATTERN.fullmatch(name):
            check.fail(path, "expected a plain file name inside the package (letters, digits, . _ -)")
        if check.typed(digest, path, "string") is not _INVALID and not SHA256_PATTERN.fullmatch(digest):
            check.fail(path, f"expected a sha256 as 64 lower-case hex digits, got {digest!r}")
    for required in REQUIRED_FILES:
        if required not in files:
            check.fail("manifest.files", f"{required} missing (every package ships it)")
    return set(files)


def _check_models(check: _Checker, models: dict, shipped: set[str]) -> None:
    common = {"kind": "string", "files": "object", "output": "string", "threshold": "number", "params": "object",
              "quantization": "object"}
    outlier = check.fields(models, "manifest.models", {"outlier": "object"}).get("outlier")
    if outlier is not None:
        valid = check.fields(outlier, "manifest.models.outlier",
                             {**common, "score_convention": "string", "target_outlier_rate": "number"})
        if "kind" in valid:
            check.one_of(valid["kind"], "manifest.models.outlier.kind", ("isolation_forest",))
        if "output" in valid:
            check.one_of(valid["output"], "manifest.models.outlier.output", ("score",))
        if "target_outlier_rate" in valid:
            check.fraction(valid["target_outlier_rate"], "manifest.models.outlier.target_outlier_rate")
        _check_model_files(check, "outlier", valid, shipped)
    yield_model = check.fields(models, "manifest.models", {"yield": "object"}).get("yield")
    if yield_model is not None:
        valid = check.fields(yield_model, "manifest.models.yield", {**common, "label": "string"})
        if "kind" in valid:
            check.one_of(valid["kind"], "manifest.models.yield.kind", YIELD_KINDS)
        if "output" in valid:
            check.one_of(valid["output"], "manifest.models.yield.output", ("pass_probability",))
        if "threshold" in valid:
            check.fraction(valid["threshold"], "manifest.models.yield.threshold")
        _check_model_files(check, "yield", valid, shipped)


def _check_model_files(check: _Checker, model: str, valid: dict, shipped: set[str]) -> None:
    path = f"manifest.models.{model}"
    files = valid.get("files")
    if files is not None:
        if "float32" not in files:
            check.fail(f"{path}.files.float32", "missing (every model ships a float32 graph)")
        for variant, file in files.items():
            check.one_of(variant, f"{path}.files", VARIANTS)
            if check.typed(file, f"{path}.files.{variant}", "string") is not _INVALID and file not in shipped:
                check.fail(f"{path}.files.{variant}", f"{file!r} is not listed in manifest.files")
    quantization = valid.get("quantization")
    if quantization is not None:
        q = check.fields(quantization, f"{path}.quantization", {"int8": "boolean", "reason": "string"})
        if files is not None and "int8" in q and q["int8"] != ("int8" in files):
            check.fail(f"{path}.quantization.int8", f"is {str(q['int8']).lower()} but {path}.files "
                                                     f"{'has' if 'int8' in files else 'has no'} int8 variant")


def _check_pat(check: _Checker, pat: dict, columns: list[str] | None) -> None:
    valid = check.fields(pat, "manifest.pat",
                         {"k_sigma": "number", "method": "string", "min_parts": "integer", "limits": "array"})
    for path, limit in check.objects(valid.get("limits", ()), "manifest.pat.limits"):
        entry = check.fields(limit, path, {"column": "string", "median": "number|null", "robust_sigma": "number|null",
                                           "scale": "string", "low": "number|null", "high": "number|null",
                                           "n": "integer"}, optional=("scale",))
        if "scale" in entry:
            check.one_of(entry["scale"], f"{path}.scale", ("linear", "log"))
        _known_column(check, entry, path, columns)
        low, high = entry.get("low"), entry.get("high")
        if low is not None and high is not None and low > high:
            check.fail(path, f"low {low} is above high {high}")


def _check_drift_reference(check: _Checker, reference: dict, columns: list[str] | None) -> None:
    valid = check.fields(reference, "manifest.drift_reference",
                         {"bins": "integer", "tests": "array", "outlier_score": "object"})
    bins = valid.get("bins")
    for path, test in check.objects(valid.get("tests", ()), "manifest.drift_reference.tests"):
        entry = check.fields(test, path, {"column": "string", "edges": "array", "proportions": "array",
                                          "missing_rate": "number"})
        _known_column(check, entry, path, columns)
        _check_bins(check, entry, path, bins)
        if "missing_rate" in entry:
            check.fraction(entry["missing_rate"], f"{path}.missing_rate")
    score = valid.get("outlier_score")
    if score is not None:
        path = "manifest.drift_reference.outlier_score"
        entry = check.fields(score, path, {"edges": "array", "proportions": "array", "quantiles": "object",
                                           "outlier_rate": "number"})
        _check_bins(check, entry, path, None)
        if "quantiles" in entry:
            check.fields(entry["quantiles"], f"{path}.quantiles", {"p01": "number", "p50": "number", "p99": "number"})
        if "outlier_rate" in entry:
            check.fraction(entry["outlier_rate"], f"{path}.outlier_rate")


def _check_bins(check: _Checker, entry: dict, path: str, bins: int | None) -> None:
    """Inner edges ascending; one proportion per bin (edges + 1; fewer than ``bins`` for a near-constant test)."""
    edges, proportions = entry.get("edges"), entry.get("proportions")
    numeric = True
    for name, values in (("edges", edges), ("proportions", proportions)):
        for i, value in enumerate(values or ()):
            numeric &= check.typed(value, f"{path}.{name}[{i}]", "number") is not _INVALID
    if edges is None or proportions is None or not numeric:
        return
    if bins is not None and len(edges) > bins - 1:
        check.fail(f"{path}.edges", f"expected at most {bins - 1} inner edges for {bins} bins, got {len(edges)}")
    if any(later < earlier for earlier, later in zip(edges, edges[1:])):
        check.fail(f"{path}.edges", "expected ascending edges")
    if len(proportions) != len(edges) + 1:
        check.fail(f"{path}.proportions", f"expected {len(edges) + 1} (one per bin: inner edges + 1), "
                                          f"got {len(proportions)}")


def _known_column(check: _Checker, entry: dict, path: str, columns: list[str] | None) -> None:
    if columns is not None and "column" in entry and entry["column"] not in columns:
        check.fail(f"{path}.column", f"{entry['column']!r} is not one of manifest.features")


def _check_fidelity_entry(check: _Checker, key: str, entry: Any) -> None:
    path = f"manifest.fidelity[{key!r}]"
    model, _, variant = key.partition(".")
    if model not in ("outlier", "yield") or variant not in VARIANTS:
        check.fail(path, "expected a key '<model>.<variant>' with model outlier|yield and variant float32|int8")
    if check.typed(entry, path, "object") is _INVALID:
        return
    valid = check.fields(entry, path, {"file": "string", "rows": "integer", "max_abs_diff": "number",
                                       "decision_agreement": "number", "min_agreement": "number",
                                       "passed": "boolean"})
    if "rows" in valid and valid["rows"] < 1:
        check.fail(f"{path}.rows", f"expected at least 1 checked row, got {valid['rows']}")
    for name in ("decision_agreement", "min_agreement"):
        if name in valid:
            check.fraction(valid[name], f"{path}.{name}")


def _check_lineage(check: _Checker, lineage: dict) -> None:
    valid = check.fields(lineage, "manifest.lineage", {
        "data_sha256": "string", "rows": "integer", "train_rows": "integer", "holdout_rows": "integer",
        "sources": "array", "code_version": "string", "parameters": "object", "trained_at": "string",
        "versions": "object"})
    if "data_sha256" in valid and not SHA256_PATTERN.fullmatch(valid["data_sha256"]):
        check.fail("manifest.lineage.data_sha256", f"expected 64 lower-case hex digits, got {valid['data_sha256']!r}")
    for name in ("rows", "train_rows", "holdout_rows"):
        if valid.get(name, 0) < 0:
            check.fail(f"manifest.lineage.{name}", f"expected a count >= 0, got {valid[name]}")
    for i, source in enumerate(valid.get("sources", ())):
        # A bare path, or {"path", "sha256", "bytes"} as the trainer records it.
        path = f"manifest.lineage.sources[{i}]"
        if isinstance(source, dict):
            check.fields(source, path, {"path": "string"})
        else:
            check.typed(source, path, "string|object")
    if "trained_at" in valid:
        check.iso_utc(valid["trained_at"], "manifest.lineage.trained_at")
