"""A loaded model package: verified files, onnxruntime sessions tuned for one row, thresholds, PAT limits and the
per-test statistics explanations use.

Loading refuses a package (``ModelRefused``, naming every problem) unless it verifies (manifest schema,
fidelity gate, sha256 of every file, and its signature when the registry has a ``Trust``), the ONNX graphs
handed to onnxruntime are the verified bytes (combined into one graph, ``runtime.combined_graph``: one call per
part), and a smoke score of the package's own sample rows through that combined graph reproduces the expected
scores within the fidelity the manifest records.
"""
from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EdgeError, ExportError, RegistryError
from ..package.manifest import SAMPLE_ROWS_FILE, FidelityCheck, Manifest
from ..package.registry import PackageRef, Registry
from ..package.runtime import YIELD_PREFIX, combined_graph, make_session, warm_up
from .explain import Explainer
from ..package.signing import TRUSTED
from .pat import StaticPat
from .stages import GRAPHS
from ..wire.score import ReadingsParser

log = logging.getLogger("edge_agent.daemon.scoring")

# The sample rows' expected values were computed by scikit-learn in float64 and stored as float32, and the
# agent's sessions may sum trees in another order than the exporter's: allow that much beyond the fidelity.
SMOKE_SLACK = 1e-5


class ModelRefused(EdgeError):
    """A package the agent will not serve; ``problems`` lists every reason."""

    def __init__(self, ref: PackageRef | str, problems: list[str]):
        self.ref = ref
        self.problems = problems
        super().__init__(f"model package {ref} refused:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class LoadedModel:
    ref: PackageRef
    checksum: str
    manifest: Manifest = field(repr=False)
    path: Path
    yield_variant: str
    columns: list[str]
    parser: ReadingsParser = field(repr=False)
    static_pat: StaticPat = field(repr=False)
    explainer: Explainer = field(repr=False)
    outlier_threshold: float
    pass_threshold: float
    identity: dict                 # {"name", "version", "checksum"}: sent with every decision
    smoke: dict                    # what the load-time smoke score found
    signature: dict                # who signed it and whether that key is trusted (signing.SignatureCheck)
    loaded_at: float
    observed_only: frozenset[str]  # PAT screens the package found not to separate good from failing parts
    _session: object = field(repr=False)       # both graphs as one (runtime.combined_graph)
    _input: str = field(repr=False)
    _outputs: list[str] = field(repr=False)    # [outlier score, pass probability]

    def score(self, rows: np.ndarray, sample: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Outlier scores and pass probabilities of float32 rows [n, n_features], in one onnxruntime call;
        ``sample``: a stage sample (edge_agent/daemon/stages.py) timing it."""
        score, probability = self._session.run(self._outputs, {self._input: rows})
        if sample is not None:
            sample[GRAPHS] = time.perf_counter_ns()
        return score.reshape(-1), probability.reshape(-1)

    def describe(self) -> dict:
        return {**self.identity, "path": str(self.path), "features": len(self.columns),
                "yield_variant": self.yield_variant, "outlier_threshold": self.outlier_threshold,
                "pass_threshold": self.pass_threshold, "static_pat_tests": self.static_pat.n_limited,
                "observed_only": sorted(self.observed_only),
                "loaded_at": self.loaded_at, "smoke": self.smoke, "signature": self.signature}


def load_package(registry: Registry, ref: PackageRef, yield_variant: str = "float32") -> LoadedModel:
    """Verify, load, warm up and smoke-test one package; ModelRefused when any step fails."""
    try:
        result = registry.verify(ref)
        folder = registry.package_dir(ref)
    except RegistryError as error:
        raise ModelRefused(ref, [str(error)]) from None
    if not result.ok:
        raise ModelRefused(ref, result.problems)
    signature = {"status": "not checked"} if result.signature is None else result.signature.describe()
    if signature["status"] != TRUSTED:
        signer = f" by key {signature['key_id']}" if signature.get("key_id") else ""
        log.warning("SIGNATURES NOT ENFORCED (development mode): loading %s, signature %s%s", ref,
                    signature["status"], signer)
    manifest = result.manifest
    outlier_model, yield_model = manifest.models.outlier, manifest.models.yield_model
    if yield_variant not in yield_model.files:
        raise ModelRefused(ref, [f"yield variant {yield_variant!r} requested, the package ships "
                                 f"{', '.join(yield_model.files)} ({yield_model.quantization.reason})"])
    outlier_bytes = _verified_bytes(folder, outlier_model.files["float32"], manifest)
    yield_bytes = _verified_bytes(folder, yield_model.files[yield_variant], manifest)
    sample_bytes = _verified_bytes(folder, SAMPLE_ROWS_FILE, manifest)
    try:
        session = make_session(combined_graph(outlier_bytes, yield_bytes, manifest.input.name))
    except ExportError as error:
        raise ModelRefused(ref, [str(error)]) from None
    except Exception as error:   # onnx and onnxruntime raise their own exception types for graphs they cannot load
        raise ModelRefused(ref, [f"onnxruntime cannot load the graphs: {error}"]) from None
    columns = manifest.columns
    model = LoadedModel(
        ref=ref, checksum=result.checksum, manifest=manifest, path=folder, yield_variant=yield_variant,
        columns=columns, parser=ReadingsParser(columns, [f.name for f in manifest.features]),
        static_pat=StaticPat(columns, manifest.pat.limits, k_sigma=manifest.pat.k_sigma,
                             resolution_floor=manifest.pat.resolution_floor),
        explainer=Explainer(columns, manifest.pat.limits),
        observed_only=frozenset(f"{screen.kind}_pat" for screen in manifest.pat.screens or ()
                                if screen.verdict == "does not separate"),
        outlier_threshold=float(outlier_model.threshold), pass_threshold=float(yield_model.threshold),
        # Every reply's model block says when the yield model could not be told from chance (--advisory).
        identity={"name": ref.name, "version": ref.version, "checksum": result.checksum,
                  **({"advisory": True} if yield_model.gate is not None and yield_model.gate.advisory else {})},
        smoke={}, signature=signature, loaded_at=time.time(), _session=session,
        _input=manifest.input.name, _outputs=[outlier_model.output, YIELD_PREFIX + yield_model.output])
    try:
        warm_up(session, len(columns))
    except ExportError as error:   # a graph whose input width is not the manifest's feature count
        raise ModelRefused(ref, [str(error)]) from None
    except Exception as error:      # onnxruntime's own exception types
        raise ModelRefused(ref, [f"warm-up of the graphs failed in onnxruntime: {error}"]) from None
    model.smoke = _smoke_test(model, sample_bytes, manifest.fidelity, yield_variant)
    return model


def _verified_bytes(folder: Path, name: str, manifest: Manifest) -> bytes:
    """The file's bytes, re-hashed: what onnxruntime gets is exactly what verification accepted."""
    try:
        data = (folder / name).read_bytes()
    except OSError as error:
        raise ModelRefused(f"{manifest.name}/{manifest.version}",
                           [f"{name}: cannot be read after verification ({error.strerror})"]) from None
    if hashlib.sha256(data).hexdigest() != manifest.files[name]:
        raise ModelRefused(f"{manifest.name}/{manifest.version}",
                           [f"{name}: changed on disk while the package was being loaded"])
    return data


def _smoke_test(model: LoadedModel, sample_bytes: bytes, fidelity: dict[str, FidelityCheck],
                yield_variant: str) -> dict:
    """Score the package's sample rows and compare with the expected values, within the recorded fidelity."""
    where = f"{model.ref.name}/{model.ref.version}"
    try:
        with np.load(io.BytesIO(sample_bytes), allow_pickle=False) as sample:
            readings = np.asarray(sample["readings"], dtype=np.float32)
            expected = {"score": np.asarray(sample["score"], np.float64),
                        "pass_probability": np.asarray(sample["pass_probability"], np.float64)}
    except (ValueError, KeyError, OSError) as error:
        raise ModelRefused(where, [f"{SAMPLE_ROWS_FILE}: unreadable ({error})"]) from None
    if readings.ndim != 2 or readings.shape[1] != len(model.columns) or len(readings) == 0:
        raise ModelRefused(where, [f"{SAMPLE_ROWS_FILE}: readings have shape {readings.shape}, expected "
                                   f"[rows > 0, {len(model.columns)}]"])
    try:
        got_score, got_probability = model.score(readings)
    except Exception as error:   # onnxruntime's own exception types
        raise ModelRefused(where, [f"smoke score of {SAMPLE_ROWS_FILE} failed in onnxruntime: {error}"]) from None
    report, problems = {}, []
    for key, got, fidelity_key in (("score", got_score, "outlier.float32"),
                                   ("pass_probability", got_probability, f"yield.{yield_variant}")):
        entry = fidelity[fidelity_key]
        allowed = float(entry.max_abs_diff) + SMOKE_SLACK
        worst = float(np.max(np.abs(got - expected[key]))) if len(got) == len(expected[key]) else np.inf
        report[key] = {"rows": len(readings), "max_abs_diff": worst, "allowed": allowed}
        if not worst <= allowed:
            problems.append(f"smoke score: {fidelity_key} ({entry.file}) on this CPU: {key} of the {len(readings)} "
                            f"sample rows differs from the expected values by up to {worst:.3g}, more than "
                            f"fidelity.{fidelity_key}.max_abs_diff {float(entry.max_abs_diff):.3g} recorded in "
                            f"the manifest allows (+ {SMOKE_SLACK:g})")
    if problems:
        raise ModelRefused(where, problems)
    return report
