"""Training on a synthetic lot, end to end through the `edge-train` command line into a verified package."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from trainer.ingest import load_tables
from trainer.registry import Registry
from trainer.synth import SynthConfig, write
from trainer.train import TrainConfig, fit


def _edge_train(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def latent_lot(tmp_path_factory):
    path = tmp_path_factory.mktemp("lot") / "lot.parquet"
    write(SynthConfig(seed=3, parts=8000, tests=60, excursions=("latent_outliers",)), str(path))
    table, _ = load_tables([str(path)])
    return table


def test_latent_outlier_cluster_is_flagged_at_the_calibrated_threshold(latent_lot):
    """The latent cluster passes every limit, so limits alone find 0 % of it. Its parts are moved jointly by
    3.5-5 sigma on about a third of the tests, which an Isolation Forest isolates in short paths; at a
    threshold calibrated to flag 1 % of passing parts, a random flag would find ~1 % of the cluster. We demand
    90 %: well above chance, while leaving room for a part or two that landed near the cluster's edge."""
    trained = fit(latent_lot, TrainConfig(n_trees=100, yield_model="logistic", seed=3), progress=lambda _: None)
    frame = latent_lot.frame
    latent = frame["truth_excursion"].to_numpy(str) == "latent_outliers"
    passed = frame["passed"].to_numpy(bool)
    assert latent.sum() >= 10 and passed[latent].all(), "the cluster must exist and pass every limit"

    flagged = trained.outlier.decision_function(latent_lot.readings()) < trained.outlier_threshold
    assert flagged[latent].mean() >= 0.9
    # The calibration holds on the parts that are not outliers: close to the 1 % target, not a flood.
    assert flagged[passed & ~latent].mean() < 0.02
    assert trained.metrics["outlier"]["latent_outlier_recall"] >= 0.9 or \
        trained.metrics["outlier"]["latent_outlier_parts"] < 3


def test_training_progress_is_reported(latent_lot):
    messages: list[str] = []
    fit(latent_lot, TrainConfig(n_trees=60, yield_model="random_forest", yield_trees=40, seed=1),
        progress=messages.append)
    assert any("isolation forest: 60/60 trees" in m for m in messages)
    assert any("yield random forest: 40/40 trees" in m for m in messages)


def test_synth_fit_verify_through_the_command_line(tmp_path):
    lot = tmp_path / "lot.csv"
    registry = tmp_path / "models"
    synth = _edge_train("synth", "--out", str(lot), "--parts", "3000", "--tests", "40", "--seed", "5", cwd=tmp_path)
    assert synth.returncode == 0, synth.stderr

    fitted = _edge_train("fit", "--data", str(lot), "--registry", str(registry), "--name", "lotmodel",
                         "--trees", "50", "--yield-model", "mlp", "--promote", "production", cwd=tmp_path)
    assert fitted.returncode == 0, fitted.stderr
    assert "verified  ok" in fitted.stdout

    verified = _edge_train("registry", "verify", "lotmodel", "--registry", str(registry), cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    ref = Registry(registry).resolve("lotmodel", "production")
    manifest = Registry(registry).manifest(ref)
    features = manifest["features"]
    assert len(features) == 40 and all(f["units"] for f in features)
    # Limits carried from the CSV metadata rows; leakage-style tests may be one-sided.
    assert all(f["low"] is not None or f["high"] is not None for f in features)
    # Static PAT limits sit inside the test limits for a normal parameter: median +/- 6 robust sigma.
    pat = {p["column"]: p for p in manifest["pat"]["limits"]}
    assert set(pat) == {f["column"] for f in features}
    assert all(p["low"] < p["median"] < p["high"] for p in pat.values())
    assert all(entry["passed"] and entry["decision_agreement"] >= 0.999 for entry in manifest["fidelity"].values())
    assert manifest["lineage"]["rows"] == 3000 and len(manifest["lineage"]["data_sha256"]) == 64
    assert manifest["models"]["yield"]["kind"] == "mlp"
    assert {"roc_auc", "f1_fail_class", "calibration"} <= set(manifest["metrics"]["yield"])
    drift = manifest["drift_reference"]
    assert len(drift["tests"]) == 40
    assert all(abs(sum(t["proportions"]) - 1) < 1e-6 for t in drift["tests"])
    json.dumps(manifest)  # the manifest on disk is plain JSON


def test_bad_data_stops_fit_with_a_message_and_publishes_nothing(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("lot,part_id,1000:VDD\nL1,1,1.0\nL1,2,1.1\n")
    registry = tmp_path / "models"
    result = _edge_train("fit", "--data", str(bad), "--registry", str(registry), cwd=tmp_path)
    assert result.returncode == 2
    assert "TOO_FEW_ROWS" in result.stderr and "bad.csv" in result.stderr
    assert "Traceback" not in result.stderr
    assert not registry.exists() or not any(registry.rglob("manifest.json"))
