"""The floors and model packages the tests share, made by the product itself: lots from the synthetic floor
generator (``trainer.synth``), models from the trainer (``trainer.train.fit``), packages from the package writer
(``trainer.package``). No test writes a manifest by hand, so every test reads what the trainer really writes.
Keys come from the product's key commands (``edge_agent.keys``): every published package is signed with the test
trainer key, and agents trust it (development mode only where a test is about it).

Session-scoped: each is built once per run (a few seconds in all). Tests that change a registry work on a copy.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest

from edge_agent.keys import (SigningKey, create_curve_pair, create_signing_key, load_curve_pair, load_curve_public,
                             load_signing_key)
from edge_agent.package.manifest import OUTLIER_FILE, YIELD_FILE, YIELD_INT8_FILE, Manifest
from edge_agent.package.registry import PackageRef, Registry
from edge_agent.processes import free_tcp_endpoint, start_agent, stop
from trainer.ingest import load_tables
from edge_agent.wire.links import CurveClient, CurvePair
from trainer.package import build_and_publish, build_package
from trainer.synth import DATALOG_PATHOLOGIES, SynthConfig, generate, test_catalog, write
from trainer.table import ParametricTable
from trainer.train import TrainConfig, TrainedModels, fit


def synth_lot(seed: int, parts: int, tests: int, *, lot_prefix: str = "SYN") -> ParametricTable:
    """One lot of the synthetic product, without injected excursions. The test program depends on ``tests``
    only, so lots with the same ``tests`` are lots of one product whatever their seeds."""
    config = SynthConfig(seed=seed, parts=parts, tests=tests, lots=1, lot_prefix=lot_prefix, excursions=())
    return ParametricTable(pd.concat(generate(config), ignore_index=True), test_catalog(config),
                           [f"trainer.synth seed {seed}"])


def train(table: ParametricTable, name: str, *, n_trees: int, yield_trees: int, seed: int,
          yield_model: str = "random_forest") -> TrainedModels:
    config = TrainConfig(name=name, n_trees=n_trees, yield_trees=yield_trees, yield_model=yield_model, seed=seed)
    return fit(table, config, progress=lambda message: None)


# ---- keys ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Keys:
    """The test floor's keys, made by ``edge_agent.keys`` in ``folder``: the trainer's signing key (trusted by every
    test agent through ``trusted``, a folder holding its public key only), another signing key nobody trusts, and
    CURVE pairs named ``collector``, ``agent-a``, ``agent-b``, ``control`` (an operator), ``program`` (a test program)
    and ``stranger``."""

    folder: Path
    signer: SigningKey
    untrusted: SigningKey
    trusted: Path

    def secret(self, name: str) -> Path:
        return self.folder / f"{name}.key_secret"

    def public(self, name: str) -> Path:
        return self.folder / f"{name}.key"

    def pair(self, name: str) -> CurvePair:
        return load_curve_pair(self.secret(name))

    def client(self, name: str, server: str) -> CurveClient:
        """What ``name`` needs to reach ``server`` over CURVE."""
        return CurveClient(self.pair(name), load_curve_public(self.public(server)))

    def allow(self, folder: Path, *names: str) -> Path:
        """An allow-list folder holding the public certificates of ``names`` (each file names the id it binds)."""
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(self.public(name), folder / f"{name}.key")
        return folder

    @property
    def trust_args(self) -> tuple[str, str]:
        """``edge-agent run`` options that trust the test trainer's key."""
        return "--trusted-keys", str(self.trusted)


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> Keys:
    folder = tmp_path_factory.mktemp("keys") / "keys"
    secret, public = create_signing_key(folder, "trainer")
    untrusted, _ = create_signing_key(folder, "nobody")
    for name in ("collector", "agent-a", "agent-b", "control", "program", "stranger"):
        create_curve_pair(folder, name)
    trusted = folder.parent / "trusted"
    trusted.mkdir()
    shutil.copy(public, trusted / public.name)
    return Keys(folder, load_signing_key(secret), load_signing_key(untrusted), trusted)


# ---- the agent's packages ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Packages:
    """Model ``model``: version 1 (production) and version 2 (candidate), trained on two lots of one product."""

    root: Path
    model: str
    n_tests: int
    trained: dict        # version -> TrainedModels (the scikit-learn pipelines)
    stream: np.ndarray   # float32 readings of a further lot of the same product, for scoring
    keys: Keys           # the signing key of both versions; agents trust it with ``keys.trust_args``

    def manifest(self, version: str) -> Manifest:
        return Registry(self.root).manifest(PackageRef(self.model, version))

    def offline(self, version: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores of ``rows`` from plain onnxruntime sessions (default options) over the package's files."""
        folder = Registry(self.root).package_dir(PackageRef(self.model, version))
        outlier = ort.InferenceSession(str(folder / OUTLIER_FILE), providers=["CPUExecutionProvider"])
        yield_ = ort.InferenceSession(str(folder / YIELD_FILE), providers=["CPUExecutionProvider"])
        feed = {"readings": rows.astype(np.float32)}
        return outlier.run(["score"], feed)[0].reshape(-1), yield_.run(["pass_probability"], feed)[0].reshape(-1)

    def copy(self, target: Path) -> Path:
        shutil.copytree(self.root, target)
        return target

    def lot(self, seed: int, parts: int, lot_prefix: str) -> ParametricTable:
        """Another lot of the product the packages were trained on."""
        return synth_lot(seed, parts, self.n_tests, lot_prefix=lot_prefix)


@pytest.fixture(scope="session")
def packages(tmp_path_factory, keys) -> Packages:
    """Two lots of 1,500 parts x 20 tests, 50-tree forests; a third lot of 400 parts to score."""
    model, n_tests = "m", 20
    root = tmp_path_factory.mktemp("registry") / "models"
    registry = Registry(root)
    trained = {}
    for version, seed in (("1", 11), ("2", 12)):
        table = synth_lot(seed, 1500, n_tests)
        trained[version] = train(table, model, n_trees=50, yield_trees=30, seed=seed)
        assert build_and_publish(trained[version], table, {}, registry, [], signer=keys.signer).version == version
    registry.promote(model, "1", "production", "test fixture")
    stream = synth_lot(13, 400, n_tests, lot_prefix="L").readings().astype(np.float32)
    return Packages(root, model, n_tests, trained, stream, keys)


# ---- drift: a package and further parts of its floor ----------------------------------------------------------------

@dataclasses.dataclass
class DriftFloor:
    """Package ``drift-demo`` (production) trained on a synthetic lot, and the lot's parts that training held out,
    that passed (the drift reference is built from passing parts too) and that ran every test (so a window of n
    parts holds n readings of each test), with the outlier model's scores: what an agent serving the package sees
    while the product does not drift."""

    registry: Registry
    ref: PackageRef
    readings: np.ndarray   # float32 [parts, tests], the package's feature order
    scores: np.ndarray     # the outlier model's scores of those parts
    feed: Path             # readings and scores in one .npz, for tests/drift_feeder.py

    @property
    def manifest(self) -> Manifest:
        """The published manifest."""
        return self.registry.manifest(self.ref)

    @property
    def columns(self) -> list[str]:
        return self.manifest.columns


@pytest.fixture(scope="session")
def drift_floor(tmp_path_factory, keys) -> DriftFloor:
    """8,000 parts x 12 tests, a 30-tree forest; about 1,500 held-out parts to feed."""
    folder = tmp_path_factory.mktemp("drift")
    table = synth_lot(1, 8000, 12)
    trained = train(table, "drift-demo", n_trees=30, yield_trees=10, seed=1)
    registry = Registry(folder / "models")
    ref = build_and_publish(trained, table, {}, registry, [], signer=keys.signer)
    registry.promote(ref.name, ref.version, "production", "test fixture")
    readings = table.readings()[trained.holdout_index]
    readings = readings[table.frame["passed"].to_numpy(bool)[trained.holdout_index] & ~np.isnan(readings).any(axis=1)]
    scores = trained.outlier.decision_function(readings)
    feed = folder / "feed.npz"
    np.savez(feed, readings=readings.astype(np.float32), scores=scores)
    return DriftFloor(registry, ref, readings.astype(np.float32), scores, feed)


# ---- a floor with real datalogs' pathologies -------------------------------------------------------------------------

@dataclasses.dataclass
class PathologicalFloor:
    """Package ``floor`` (production), trained on four lots of the synthetic product with every datalog pathology
    on (``trainer.synth.DATALOG_PATHOLOGIES``: quantized tests, stop-on-fail, every other part without readings,
    tests 3-5x wider in every other lot, two sublots per lot) and latent outliers in its first lot; and the next
    lot off the line, with the same pathologies and 2 % latent outliers."""

    registry: Registry
    ref: PackageRef
    trained: TrainedModels
    training: ParametricTable     # after validation: the parts without enough readings are left out
    report: dict                  # the validation report
    next_lot: ParametricTable     # every part, as the tester logged it
    truth: dict                   # the next lot's ground truth (trainer.synth)

    @property
    def manifest(self) -> Manifest:
        return self.registry.manifest(self.ref)


@pytest.fixture(scope="session")
def pathological_floor(tmp_path_factory, keys) -> PathologicalFloor:
    """12,000 parts x 200 tests in four lots (about 6,000 left to train on), 50-tree forest; a next lot of 4,000."""
    folder = tmp_path_factory.mktemp("floor")
    lots = {}
    for name, config in (("training", dict(parts=12_000, lots=4, excursions=("latent_outliers",))),
                         ("next", dict(parts=4_000, lots=1, first_lot_index=5, excursions=("latent_outliers",),
                                       latent_outlier_fraction=0.02))):
        lots[name] = write(SynthConfig(seed=11, tests=200, **DATALOG_PATHOLOGIES, **config),
                           folder / f"{name}.parquet")
    table, report = load_tables([lots["training"].path])
    trained = train(table, "floor", n_trees=50, yield_trees=20, seed=11)
    registry = Registry(folder / "models")
    ref = build_and_publish(trained, table, report.to_dict(), registry, [lots["training"].path],
                            signer=keys.signer)
    registry.promote(ref.name, ref.version, "production", "test fixture")
    next_lot, _ = load_tables([lots["next"].path], keep_sparse_parts=True)
    return PathologicalFloor(registry, ref, trained, table, report.to_dict(), next_lot,
                             json.loads(Path(lots["next"].truth_path).read_text()))


@pytest.fixture(scope="session")
def floor_agent(pathological_floor, keys, tmp_path_factory):
    """The endpoint of a real agent serving the pathological floor's package (drift off)."""
    folder = tmp_path_factory.mktemp("floor-agent")
    endpoint = free_tcp_endpoint()
    process = start_agent(pathological_floor.registry.root, pathological_floor.ref.name, endpoint, "--no-drift",
                          "--metrics-port", "0", *keys.trust_args, log_path=folder / "agent.log")
    yield endpoint
    assert stop(process) == 0


# ---- packages built but not published -----------------------------------------------------------------------------

class Unpublished:
    """Files and manifest of real packages that are not published yet (the registry tests publish them)."""

    def __init__(self, with_int8: tuple[dict, Manifest], without_int8: tuple[dict, Manifest]):
        self._built = {True: with_int8, False: without_int8}

    def package(self, int8: bool = True) -> tuple[dict[str, bytes], Manifest]:
        """A fresh copy: logistic yield model with its int8 variant, or a random forest (no int8 variant)."""
        files, manifest = self._built[int8]
        return dict(files), copy.deepcopy(manifest)


@pytest.fixture(scope="session")
def unpublished() -> Unpublished:
    """Model ``demo`` on one lot of 1,000 parts x 8 tests, 20-tree forest."""
    table = synth_lot(5, 1000, 8)
    built = [build_package(train(table, "demo", n_trees=20, yield_trees=10, seed=5, yield_model=kind), table, {}, [])
             for kind in ("logistic", "random_forest")]
    assert YIELD_INT8_FILE in built[0][0], "the logistic yield model's int8 variant was refused"
    return Unpublished(*built)
