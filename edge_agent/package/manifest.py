"""The package manifest (schema_version 1) as one typed object, with one reader and one writer.

``read_manifest`` turns manifest.json (its bytes or the parsed document) into a ``Manifest`` and lists every
way it breaks the schema, each problem naming its JSON path; ``Manifest.to_json`` writes the file. The
dataclasses below are the schema: a field's type says which JSON values it takes (``float | None``: a number
or null), ``optional()`` marks a field a manifest may leave out, and the ``_read_*`` checks add what a type
cannot say (ranges, patterns, references between sections).

A new field is added with ``optional()`` and a default, so that every package written before it still reads;
a new section (a field whose type is one of these classes) also gets its line in ``read_manifest``.

stdlib only: the edge agent runs these checks before it loads a package.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "signature.json"     # beside the manifest, never listed in it (package/signing.py)
MODEL_CARD_FILE = "model_card.md"
SAMPLE_ROWS_FILE = "sample_rows.npz"
OUTLIER_FILE = "outlier.onnx"
YIELD_FILE = "yield.onnx"
YIELD_INT8_FILE = "yield.int8.onnx"
REQUIRED_FILES = (MODEL_CARD_FILE, SAMPLE_ROWS_FILE)
YIELD_KINDS = ("random_forest", "logistic", "mlp", "hist_gradient_boosting")
HELD_OUT_SPLITS = ("lot", "time", "random", "input")  # how the held-out parts were chosen (trainer.evaluation)
THRESHOLD_OBJECTIVES = ("fail_f1", "fail_precision", "fixed")   # what the yield threshold was chosen for
VARIANTS = ("float32", "int8")
# PAT rules by the shape of a test's readings, and what the self-check does to a test whose limits flag too many
# passing training parts (edge_agent.package.rules applies them).
PAT_SHAPES = ("normal", "lognormal", "skewed", "discrete", "bimodal", "constant")
PAT_ON_EXCESS = ("widen", "disable")
PAT_SCREENS = ("static", "dynamic")
PAT_SCREEN_VERDICTS = ("separates", "does not separate", "not judged")

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")   # model names and package file names
VERSION_PATTERN = re.compile(r"[1-9][0-9]{0,17}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


def optional(default: Any = None) -> Any:
    """A field a manifest may leave out (packages written before it existed): read as ``default`` when absent,
    not written while None."""
    return field(default=default, metadata={"optional": True})


def _key(name: str) -> Any:
    """A field whose JSON key is not a Python name ("yield")."""
    return field(metadata={"key": name})


# ---- the schema ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Feature:
    """One reading the models take, at its position in the ONNX input."""

    index: int
    column: str                 # "<test number>:<test name>": how requests and tables name the test
    name: str
    number: int | None
    units: str
    low: float | None           # the test program's limits
    high: float | None
    pin: str | None
    impute: float               # what a missing reading becomes inside the graphs (shown on the model card)


@dataclass(frozen=True, kw_only=True)
class ImputationMethod:
    strategy: str
    where: str
    values_from: str


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """The graphs' one input: float32 rows [n, number of features], NaN for a reading that is missing."""

    name: str
    dtype: str
    shape: list                 # [null, <number of features>]
    missing: str


@dataclass(frozen=True, kw_only=True)
class Quantization:
    int8: bool                  # an int8 variant ships
    reason: str                 # why it does or does not (shown when an agent asks for a variant not shipped)


@dataclass(frozen=True, kw_only=True)
class OutlierModel:
    kind: str
    files: dict[str, str]       # variant ("float32", "int8") -> package file
    output: str
    score_convention: str
    threshold: float            # outlier when score < threshold
    target_outlier_rate: float
    trained_on: str | None = optional()
    params: dict
    quantization: Quantization


@dataclass(frozen=True, kw_only=True)
class YieldLabel:
    """What the yield model learned to predict, and what that is worth (trainer.labels, trainer.outcomes)."""

    column: str
    source: str                 # "outcomes": a later step's result joined by part identity; "pass_flag": this
                                # step's own pass flag (the model relearns the test limits); "column": as given
    meaning: str                # the sentence the model card shows
    pass_value: str | None = optional()   # the label value that means pass (--label-pass-value)
    outcomes: dict | None = optional()    # the join: files, keys, match counts


@dataclass(frozen=True, kw_only=True)
class YieldThreshold:
    """How the threshold was chosen: for an objective, on held-out parts the reported measures do not use."""

    objective: str              # "fail_f1", "fail_precision" or "fixed"
    target_precision: float | None = optional()
    tuning_parts: int
    evaluation_parts: int
    note: str


@dataclass(frozen=True, kw_only=True)
class QualityGate:
    """The yield model against chance on held-out parts. A package that did not pass is published as a candidate
    and the registry promotes it to staging or production only when forced, with a reason."""

    min_auc: float
    roc_auc: float | None
    passed: bool
    reason: str
    auc_low: float | None = optional()      # the forward AUC's 95% interval, whose lower bound the gate judges
    auc_high: float | None = optional()
    fails: int | None = optional()          # failing parts behind the interval
    advisory: bool = optional(False)        # published although it did not pass (--advisory): agents say so


@dataclass(frozen=True, kw_only=True)
class YieldModel:
    kind: str
    files: dict[str, str]       # variant ("float32", "int8") -> package file
    output: str
    threshold: float            # predicted fail when pass probability < threshold
    label: str
    params: dict
    quantization: Quantization
    label_source: YieldLabel | None = optional()
    threshold_choice: YieldThreshold | None = optional()
    gate: QualityGate | None = optional()


@dataclass(frozen=True, kw_only=True)
class Models:
    outlier: OutlierModel
    yield_model: YieldModel = _key("yield")

    def named(self) -> tuple[tuple[str, OutlierModel | YieldModel], ...]:
        """(name as the manifest keys it, model): the fidelity keys and the summary use these names."""
        return ("outlier", self.outlier), ("yield", self.yield_model)


@dataclass(frozen=True, kw_only=True)
class PatLimit:
    """Static PAT limits of one test (None: no limit, see ``self_check``); median and sigma in the test's units.

    The fields from ``shape`` on are the rule the limits follow (``edge_agent.package.rules``); packages written
    before them read as a linear test without a resolution floor whose limits were kept as computed.
    """

    column: str
    median: float | None
    robust_sigma: float | None        # IQR/1.35, never below the resolution floor
    scale: str = optional("linear")   # "log": limits set on log(reading) (edge_agent.package.rules)
    low: float | None
    high: float | None
    n: int
    shape: str | None = optional()          # one of rules.SHAPES
    resolution: float | None = optional()   # smallest step between distinct readings (None: fewer than 2 values)
    k_sigma: float | None = optional()      # this test's k: the package's, or wider after the self-check
    typical_low: float | None = optional()  # the rule's limits at k = 3: the typical range explanations quote
    typical_high: float | None = optional()
    self_check: str | None = optional()     # "kept", "widened" or "disabled" (then low and high are None)
    flag_rate: float | None = optional()    # share of passing training parts outside low..high
    flag_rate_before: float | None = optional()   # the same for the rule's limits before the self-check
    reason: str | None = optional()         # what the self-check found, in words
    sigma_floor: float | None = optional()  # no sigma of this test, static or dynamic, below this (units)
    lot_allowance: float | None = optional()   # room for the next lot either side of the centre, robust sigmas
    allowance_rule: str | None = optional()    # where that allowance comes from


@dataclass(frozen=True, kw_only=True)
class PatScreen:
    """How one PAT screen ("static" or "dynamic") did on training parts later than those that set its limits
    (``trainer.screens``): the good and failing parts it flagged, 95 % intervals of both rates, and its verdict.
    "does not separate": the agent reports the screen's breaks and does not let them decide a bin."""

    kind: str
    good_parts: int
    good_flagged: int
    good_rate_interval: list[float]
    fail_parts: int
    fail_flagged: int
    fail_rate_interval: list[float]
    verdict: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class Pat:
    k_sigma: float
    method: str
    min_parts: int
    limits: list[PatLimit]
    resolution_floor: float | None = optional()   # robust sigma >= this many resolution steps
    limit_share_floor: float | None = optional()  # ... and >= this share of the test limits' range
    max_flag_rate: float | None = optional()      # the self-check's bound on flagged passing training parts
    on_excess: str | None = optional()            # "widen" or "disable": what the self-check does above it
    screens: list[PatScreen] | None = optional()  # each screen judged on later training parts (trainer.screens)
    screens_cut: str | None = optional()          # how the training parts were cut for that, in words


@dataclass(frozen=True, kw_only=True)
class FeatureBins:
    """Reference distribution of one test: inner bin edges and one proportion per bin (edges + 1)."""

    column: str
    edges: list[float]
    proportions: list[float]
    missing_rate: float


@dataclass(frozen=True, kw_only=True)
class ScoreQuantiles:
    p01: float
    p05: float | None = optional()
    p50: float
    p95: float | None = optional()
    p99: float


@dataclass(frozen=True, kw_only=True)
class ScoreBins:
    """Reference distribution of the outlier score."""

    edges: list[float]
    proportions: list[float]
    quantiles: ScoreQuantiles
    outlier_rate: float


@dataclass(frozen=True, kw_only=True)
class ReferenceBins:
    """What drift is measured against: the passing training parts' distributions (manifest.drift_reference)."""

    bins: int
    binning: str | None = optional()
    rows: int = optional(0)    # reference parts
    tests: list[FeatureBins]
    outlier_score: ScoreBins


@dataclass(frozen=True, kw_only=True)
class HeldOut:
    """Which parts the models were evaluated on, and why those (trainer.evaluation)."""

    split: str                  # "lot": the latest lot(s); "time": the latest time slice; "random"
    reason: str
    parts: int
    held_out_lots: list[str]
    training_lots: list[str]
    time_from: float | None = optional()   # split "time": the first held-out timestamp (unix seconds)


@dataclass(frozen=True, kw_only=True)
class HeldOutMetrics:
    """Held-out measures, free-form per model (the model card and the summary show what they know)."""

    outlier: dict
    yield_model: dict = _key("yield")
    timings_s: dict | None = optional()


@dataclass(frozen=True, kw_only=True)
class FidelityCheck:
    """How closely one ONNX graph reproduced its scikit-learn model on held-out rows."""

    file: str
    rows: int
    max_abs_diff: float
    decision_agreement: float
    min_agreement: float
    passed: bool


@dataclass(frozen=True, kw_only=True)
class SourceFile:
    """A file the training data came from, as the trainer records it."""

    path: str
    sha256: str | None = optional()
    bytes: int | None = optional()


@dataclass(frozen=True, kw_only=True)
class Lineage:
    data_sha256: str
    rows: int
    train_rows: int
    holdout_rows: int
    sources: list[str | SourceFile]   # a bare path, or the file with its sha256 and size
    code_version: str
    parameters: dict
    trained_at: str
    versions: dict


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """A package's manifest.json. The registry fills ``name``, ``version`` and ``files`` when it publishes.

    A manifest ``read_manifest`` found problems in is partial: a value it could not read is None, an empty
    list or mapping, or a section whose own fields are so. Only a manifest without problems is served.
    """

    schema_version: int = SCHEMA_VERSION
    name: str = ""
    version: str = ""
    created_at: str
    features: list[Feature]
    imputation: ImputationMethod
    input: InputSpec
    models: Models
    pat: Pat
    drift_reference: ReferenceBins
    metrics: HeldOutMetrics
    fidelity: dict[str, FidelityCheck]   # "<model>.<variant>" -> the check of that graph
    validation: dict
    lineage: Lineage
    held_out: HeldOut | None = optional()
    files: dict[str, str] = field(default_factory=dict)   # package file -> sha256

    @property
    def columns(self) -> list[str]:
        """Feature columns in ONNX input order."""
        return [feature.column for feature in self.features]

    def graphs(self) -> list[tuple[str, str, str]]:
        """(model, variant, file) of every ONNX graph the package ships."""
        return [(name, variant, file) for name, model in self.models.named() for variant, file in model.files.items()]

    def to_document(self) -> dict:
        """The manifest as JSON values (numpy scalars from training code become plain numbers)."""
        return _document(self)

    def to_json(self) -> bytes:
        """The bytes of manifest.json (its sha256 is the package checksum). Write only a manifest that reads
        without problems: a non-finite number raises ValueError here."""
        return (json.dumps(self.to_document(), indent=2, allow_nan=False) + "\n").encode()


# ---- the reader -----------------------------------------------------------------------------------------------

def read_manifest(document: bytes | dict) -> tuple[Manifest | None, list[str]]:
    """The manifest in manifest.json's bytes (or their parsed document), and every way it breaks schema_version 1,
    each naming its JSON path. The manifest is partial when there are problems (see ``Manifest``), None when
    the document is not a JSON object."""
    if isinstance(document, (bytes, bytearray, memoryview)):
        try:
            document = json.loads(document)
        except ValueError as error:   # JSONDecodeError and UnicodeDecodeError
            return None, [f"{MANIFEST_FILE}: not valid JSON ({error})"]
    check = _Checker()
    if check.typed(document, "manifest", "object") is _INVALID:
        return None, check.problems
    _check_json_values(check, document, "manifest")
    top = check.fields(document, "manifest", Manifest)
    if "schema_version" in top and top["schema_version"] != SCHEMA_VERSION:
        check.fail("manifest.schema_version", f"expected {SCHEMA_VERSION}, got {top['schema_version']}")
    if "name" in top:
        check.matches(top["name"], "manifest.name", NAME_PATTERN, "a model name (letters, digits, . _ -)")
    if "version" in top:
        check.matches(top["version"], "manifest.version", VERSION_PATTERN, "a positive integer as a string")
    if "created_at" in top:
        check.iso_utc(top["created_at"], "manifest.created_at")
    features, columns = _read_features(check, top.get("features"))
    files = _read_files(check, top.get("files"))
    sections = {"features": features, "files": files}
    if "imputation" in top:
        sections["imputation"] = check.section(top["imputation"], "manifest.imputation", ImputationMethod)
    if "input" in top:
        sections["input"] = _read_input(check, top["input"], None if columns is None else len(columns))
    if "models" in top:
        sections["models"] = _read_models(check, top["models"], set(files))
    if "pat" in top:
        sections["pat"] = _read_pat(check, top["pat"], columns)
    if "drift_reference" in top:
        sections["drift_reference"] = _read_drift_reference(check, top["drift_reference"], columns)
    if "metrics" in top:
        sections["metrics"] = check.section(top["metrics"], "manifest.metrics", HeldOutMetrics)
    if "fidelity" in top:
        sections["fidelity"] = {key: entry for key, value in top["fidelity"].items()
                                if (entry := _read_fidelity_entry(check, key, value)) is not None}
    if "lineage" in top:
        sections["lineage"] = _read_lineage(check, top["lineage"])
    if top.get("held_out") is not None:
        held_out = check.fields(top["held_out"], "manifest.held_out", HeldOut)
        if "split" in held_out:
            check.one_of(held_out["split"], "manifest.held_out.split", HELD_OUT_SPLITS)
        sections["held_out"] = _partial(HeldOut, held_out)
    return _partial(Manifest, {**top, **sections}), check.problems


def fidelity_problems(manifest: Manifest) -> list[str]:
    """The quality gate: every shipped ONNX graph has a fidelity entry, and every entry for a shipped file passed.

    Reads a partial manifest too (``read_manifest`` reports the malformation itself).
    """
    problems = []
    for model, variant, file in manifest.graphs():
        entry = manifest.fidelity.get(f"{model}.{variant}")
        if entry is None or entry.file != file:
            problems.append(f"{file}: no fidelity entry 'fidelity.{model}.{variant}' for this graph "
                            "(every shipped ONNX graph must be checked against its scikit-learn model)")
    for key, entry in manifest.fidelity.items():
        if entry.file not in manifest.files:
            continue
        where = f"{entry.file}: fidelity.{key}"
        if entry.passed is not True:
            problems.append(f"{where}.passed is {entry.passed!r}, expected true")
        agreement, minimum = entry.decision_agreement, entry.min_agreement
        if agreement is not None and minimum is not None and not agreement >= minimum:
            problems.append(f"{where}.decision_agreement {agreement:.6g} is below min_agreement {minimum:.6g}")
    return problems


# ---- fields of a schema class -----------------------------------------------------------------------------------

_KIND_OF_TYPE = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array",
                 type(None): "null"}
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


@dataclass(frozen=True)
class _Field:
    name: str                       # attribute
    key: str                        # JSON key
    kinds: str                      # JSON kinds it takes, "number|null"
    optional: bool                  # may be absent from the document
    blank: Callable[[], Any]        # its value when absent or unreadable


@functools.cache
def _fields(cls: type) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(cls)
    return tuple(_Field(f.name, f.metadata.get("key", f.name), _kinds(hints[f.name]), f.metadata.get("optional", False),
                        _blank(f, hints[f.name])) for f in dataclasses.fields(cls))


def _kinds(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return "|".join(_kinds(arg) for arg in typing.get_args(hint))
    if dataclasses.is_dataclass(hint):
        return "object"
    return _KIND_OF_TYPE[typing.get_origin(hint) or hint]


def _blank(f: dataclasses.Field, hint: Any) -> Callable[[], Any]:
    if f.metadata.get("optional"):
        return lambda: f.default
    if dataclasses.is_dataclass(hint):
        return lambda: _partial(hint, {})
    container = typing.get_origin(hint) or hint
    return container if container in (list, dict) else lambda: None


def _partial(cls: type, values: dict) -> Any:
    """``cls`` from the values read by attribute name; a value that is absent (or None) takes its blank."""
    return cls(**{f.name: values[f.name] if values.get(f.name) is not None else f.blank() for f in _fields(cls)})


def _document(value: Any) -> Any:
    """JSON values of a schema object. None is written as null only where the field's type takes null; else
    the key is left out (an optional field not set, or a required one missing: the reader names it)."""
    if dataclasses.is_dataclass(value):
        document = {}
        for f in _fields(type(value)):
            item = getattr(value, f.name)
            if item is not None or (not f.optional and "null" in f.kinds.split("|")):
                document[f.key] = _document(item)
        return document
    if isinstance(value, dict):
        return {key: _document(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_document(item) for item in value]
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()
    return value   # anything else that is not JSON is named by the reader


# ---- checks ---------------------------------------------------------------------------------------------------

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

    def fields(self, obj: dict, path: str, cls: type) -> dict:
        """The fields of ``cls`` that ``obj`` holds well typed, by attribute name; records the others."""
        valid = {}
        for f in _fields(cls):
            if f.key not in obj:
                if not f.optional:
                    self.fail(f"{path}.{f.key}", "missing")
                continue
            value = self.typed(obj[f.key], f"{path}.{f.key}", f.kinds)
            if value is not _INVALID:
                valid[f.name] = value
        return valid

    def section(self, obj: dict, path: str, cls: type) -> Any:
        """A ``cls`` whose fields need no check beyond their types."""
        return _partial(cls, self.fields(obj, path, cls))

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


def _read_features(check: _Checker, features: Any) -> tuple[list[Feature], list[str | None] | None]:
    """The features, and their columns in input order (None when the feature list itself is unusable)."""
    if features is None:
        return [], None
    read, columns = [], []
    for path, feature in check.objects(features, "manifest.features"):
        valid = check.fields(feature, path, Feature)
        position = len(columns)
        if "index" in valid and valid["index"] != position:
            check.fail(f"{path}.index", f"expected {position} (feature order is the ONNX input column order), "
                                        f"got {valid['index']}")
        column = valid.get("column")
        if column is not None and column in columns:
            check.fail(f"{path}.column", f"{column!r} appears twice in manifest.features")
        columns.append(column)
        read.append(_partial(Feature, valid))
    if not columns:
        check.fail("manifest.features", "expected at least one feature, got none")
    return read, columns


def _read_input(check: _Checker, spec: dict, n_features: int | None) -> InputSpec:
    valid = check.fields(spec, "manifest.input", InputSpec)
    if "dtype" in valid:
        check.one_of(valid["dtype"], "manifest.input.dtype", ("float32",))
    if "missing" in valid:
        check.one_of(valid["missing"], "manifest.input.missing", ("NaN",))
    shape = valid.get("shape")
    if shape is not None:
        if len(shape) != 2 or shape[0] is not None or not _KINDS["integer"](shape[1]):
            check.fail("manifest.input.shape", f"expected [null, <number of features>], got {list(shape)!r}")
        elif n_features is not None and shape[1] != n_features:
            check.fail("manifest.input.shape[1]", f"expected {n_features} (the number of manifest.features), "
                                                  f"got {shape[1]}")
    return _partial(InputSpec, valid)


def _read_files(check: _Checker, files: Any) -> dict:
    if files is None:
        return {}
    for name, digest in files.items():
        path = f"manifest.files[{name!r}]"
        if name == MANIFEST_FILE:
            check.fail(path, "the manifest cannot list itself (the package checksum is its sha256)")
        elif name == SIGNATURE_FILE:
            check.fail(path, "the manifest cannot list the signature that signs it")
        elif not NAME_PATTERN.fullmatch(name):
            check.fail(path, "expected a plain file name inside the package (letters, digits, . _ -)")
        if check.typed(digest, path, "string") is not _INVALID and not SHA256_PATTERN.fullmatch(digest):
            check.fail(path, f"expected a sha256 as 64 lower-case hex digits, got {digest!r}")
    for required in REQUIRED_FILES:
        if required not in files:
            check.fail("manifest.files", f"{required} missing (every package ships it)")
    return files


def _read_models(check: _Checker, models: dict, shipped: set[str]) -> Models:
    valid = check.fields(models, "manifest.models", Models)
    read = {}
    if "outlier" in valid:
        path = "manifest.models.outlier"
        spec = check.fields(valid["outlier"], path, OutlierModel)
        if "kind" in spec:
            check.one_of(spec["kind"], f"{path}.kind", ("isolation_forest",))
        if "output" in spec:
            check.one_of(spec["output"], f"{path}.output", ("score",))
        if "target_outlier_rate" in spec:
            check.fraction(spec["target_outlier_rate"], f"{path}.target_outlier_rate")
        read["outlier"] = _read_model(check, OutlierModel, path, spec, shipped)
    if "yield_model" in valid:
        path = "manifest.models.yield"
        spec = check.fields(valid["yield_model"], path, YieldModel)
        if "kind" in spec:
            check.one_of(spec["kind"], f"{path}.kind", YIELD_KINDS)
        if "output" in spec:
            check.one_of(spec["output"], f"{path}.output", ("pass_probability",))
        if "threshold" in spec:
            check.fraction(spec["threshold"], f"{path}.threshold")
        for key, section in (("label_source", YieldLabel), ("threshold_choice", YieldThreshold),
                             ("gate", QualityGate)):
            if spec.get(key) is not None:
                spec[key] = check.section(spec[key], f"{path}.{key}", section)
        if spec.get("threshold_choice") is not None and spec["threshold_choice"].objective is not None:
            check.one_of(spec["threshold_choice"].objective, f"{path}.threshold_choice.objective",
                         THRESHOLD_OBJECTIVES)
        read["yield_model"] = _read_model(check, YieldModel, path, spec, shipped)
    return _partial(Models, read)


def _read_model(check: _Checker, cls: type, path: str, spec: dict, shipped: set[str]) -> Any:
    """The model's graph files (each shipped) and quantization (int8 exactly when an int8 graph ships)."""
    files = spec.get("files")
    if files is not None:
        if "float32" not in files:
            check.fail(f"{path}.files.float32", "missing (every model ships a float32 graph)")
        for variant, file in files.items():
            check.one_of(variant, f"{path}.files", VARIANTS)
            if check.typed(file, f"{path}.files.{variant}", "string") is not _INVALID and file not in shipped:
                check.fail(f"{path}.files.{variant}", f"{file!r} is not listed in manifest.files")
    quantization = None
    if "quantization" in spec:
        q = check.fields(spec["quantization"], f"{path}.quantization", Quantization)
        if files is not None and "int8" in q and q["int8"] != ("int8" in files):
            check.fail(f"{path}.quantization.int8", f"is {str(q['int8']).lower()} but {path}.files "
                                                     f"{'has' if 'int8' in files else 'has no'} int8 variant")
        quantization = _partial(Quantization, q)
    return _partial(cls, {**spec, "quantization": quantization})


def _read_pat(check: _Checker, pat: dict, columns: list[str | None] | None) -> Pat:
    valid = check.fields(pat, "manifest.pat", Pat)
    if "on_excess" in valid:
        check.one_of(valid["on_excess"], "manifest.pat.on_excess", PAT_ON_EXCESS)
    if "max_flag_rate" in valid:
        check.fraction(valid["max_flag_rate"], "manifest.pat.max_flag_rate")
    limits = []
    for path, limit in check.objects(valid.get("limits", ()), "manifest.pat.limits"):
        entry = check.fields(limit, path, PatLimit)
        if "scale" in entry:
            check.one_of(entry["scale"], f"{path}.scale", ("linear", "log"))
        if "shape" in entry:
            check.one_of(entry["shape"], f"{path}.shape", PAT_SHAPES)
        if "self_check" in entry:
            check.one_of(entry["self_check"], f"{path}.self_check", ("kept", "widened", "disabled"))
        for name in ("flag_rate", "flag_rate_before"):
            if name in entry:
                check.fraction(entry[name], f"{path}.{name}")
        _known_column(check, entry, path, columns)
        low, high = entry.get("low"), entry.get("high")
        if low is not None and high is not None and low > high:
            check.fail(path, f"low {low} is above high {high}")
        limits.append(_partial(PatLimit, entry))
    screens = []
    for path, screen in check.objects(valid.get("screens", ()), "manifest.pat.screens"):
        entry = check.fields(screen, path, PatScreen)
        check.one_of(entry.get("kind"), f"{path}.kind", PAT_SCREENS)
        check.one_of(entry.get("verdict"), f"{path}.verdict", PAT_SCREEN_VERDICTS)
        screens.append(_partial(PatScreen, entry))
    return _partial(Pat, {**valid, "limits": limits, "screens": screens if "screens" in valid else None})


def _read_drift_reference(check: _Checker, reference: dict, columns: list[str | None] | None) -> ReferenceBins:
    valid = check.fields(reference, "manifest.drift_reference", ReferenceBins)
    bins = valid.get("bins")
    tests = []
    for path, test in check.objects(valid.get("tests", ()), "manifest.drift_reference.tests"):
        entry = check.fields(test, path, FeatureBins)
        _known_column(check, entry, path, columns)
        _check_bins(check, entry, path, bins)
        if "missing_rate" in entry:
            check.fraction(entry["missing_rate"], f"{path}.missing_rate")
        tests.append(_partial(FeatureBins, entry))
    score = None
    if "outlier_score" in valid:
        path = "manifest.drift_reference.outlier_score"
        entry = check.fields(valid["outlier_score"], path, ScoreBins)
        _check_bins(check, entry, path, None)
        quantiles = None
        if "quantiles" in entry:
            quantiles = check.section(entry["quantiles"], f"{path}.quantiles", ScoreQuantiles)
        if "outlier_rate" in entry:
            check.fraction(entry["outlier_rate"], f"{path}.outlier_rate")
        score = _partial(ScoreBins, {**entry, "quantiles": quantiles})
    return _partial(ReferenceBins, {**valid, "tests": tests, "outlier_score": score})


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


def _known_column(check: _Checker, entry: dict, path: str, columns: list[str | None] | None) -> None:
    if columns is not None and "column" in entry and entry["column"] not in columns:
        check.fail(f"{path}.column", f"{entry['column']!r} is not one of manifest.features")


def _read_fidelity_entry(check: _Checker, key: str, entry: Any) -> FidelityCheck | None:
    path = f"manifest.fidelity[{key!r}]"
    model, _, variant = key.partition(".")
    if model not in ("outlier", "yield") or variant not in VARIANTS:
        check.fail(path, "expected a key '<model>.<variant>' with model outlier|yield and variant float32|int8")
    if check.typed(entry, path, "object") is _INVALID:
        return None
    valid = check.fields(entry, path, FidelityCheck)
    if "rows" in valid and valid["rows"] < 1:
        check.fail(f"{path}.rows", f"expected at least 1 checked row, got {valid['rows']}")
    for name in ("decision_agreement", "min_agreement"):
        if name in valid:
            check.fraction(valid[name], f"{path}.{name}")
    return _partial(FidelityCheck, valid)


def _read_lineage(check: _Checker, lineage: dict) -> Lineage:
    valid = check.fields(lineage, "manifest.lineage", Lineage)
    if "data_sha256" in valid and not SHA256_PATTERN.fullmatch(valid["data_sha256"]):
        check.fail("manifest.lineage.data_sha256", f"expected 64 lower-case hex digits, got {valid['data_sha256']!r}")
    for name in ("rows", "train_rows", "holdout_rows"):
        if valid.get(name, 0) < 0:
            check.fail(f"manifest.lineage.{name}", f"expected a count >= 0, got {valid[name]}")
    sources = []
    for i, source in enumerate(valid.get("sources", ())):
        path = f"manifest.lineage.sources[{i}]"
        if isinstance(source, dict):
            sources.append(check.section(source, path, SourceFile))
        elif check.typed(source, path, "string|object") is not _INVALID:
            sources.append(source)
    if "trained_at" in valid:
        check.iso_utc(valid["trained_at"], "manifest.lineage.trained_at")
    return _partial(Lineage, {**valid, "sources": sources})
