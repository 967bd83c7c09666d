"""Training on a synthetic lot, end to end through the `edge-train` command line into a verified package."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edge_agent.package import rules
from edge_agent.package.manifest import MANIFEST_FILE
from edge_agent.package.registry import Registry
from trainer.ingest import load_tables
from trainer.reference import static_pat_limits
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
    assert any(m.startswith("forward fold 5/5:") and "random_forest" in m for m in messages)
    assert any(m.startswith("refitting yield random_forest on") for m in messages)


def test_synth_fit_verify_through_the_command_line(tmp_path):
    lot = tmp_path / "lot.csv"
    registry = tmp_path / "models"
    synth = _edge_train("synth", "--out", str(lot), "--parts", "3000", "--tests", "40", "--seed", "5", cwd=tmp_path)
    assert synth.returncode == 0, synth.stderr

    # The trainer's signing key where fit and registry verify look by default (keys/ in the working folder).
    created = _edge_train("keys", "create", "trainer", "--kind", "signing", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    # The small MLP is at chance on this lot, so it is published only as advisory and its promotion has to be forced.
    fitted = _edge_train("fit", "--data", str(lot), "--registry", str(registry), "--name", "lotmodel",
                         "--trees", "50", "--yield-model", "mlp", "--advisory", "--promote", "production", "--force",
                         "--reason", "exercising the mlp export, not its quality", cwd=tmp_path)
    assert fitted.returncode == 0, fitted.stderr
    assert "verified  ok" in fitted.stdout and "signature trusted (accepted)" in fitted.stdout

    verified = _edge_train("registry", "verify", "lotmodel", "--registry", str(registry), cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    ref = Registry(registry).resolve("lotmodel", "production")
    manifest = Registry(registry).manifest(ref)
    features = manifest.features
    assert len(features) == 40 and all(f.units for f in features)
    # Limits carried from the CSV metadata rows; leakage-style tests may be one-sided.
    assert all(f.low is not None or f.high is not None for f in features)
    # Static PAT limits sit inside the test limits for a normal parameter: median +/- 6 robust sigma.
    pat = {p.column: p for p in manifest.pat.limits}
    assert set(pat) == set(manifest.columns)
    assert all(p.low < p.median < p.high for p in pat.values())
    assert all(entry.passed and entry.decision_agreement >= 0.999 for entry in manifest.fidelity.values())
    assert manifest.lineage.rows == 3000 and len(manifest.lineage.data_sha256) == 64
    assert manifest.models.yield_model.kind == "mlp"
    assert {"roc_auc", "roc_auc_low", "roc_auc_high", "fail_parts", "calibration"} <= set(manifest.metrics.yield_model)
    drift = manifest.drift_reference
    assert len(drift.tests) == 40
    assert all(abs(sum(t.proportions) - 1) < 1e-6 for t in drift.tests)
    # One reader and one writer: the manifest read back writes the bytes on disk again.
    assert manifest.to_json() == (Registry(registry).package_dir(ref) / MANIFEST_FILE).read_bytes()


def test_bad_data_stops_fit_with_a_message_and_publishes_nothing(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("lot,part_id,1000:VDD\nL1,1,1.0\nL1,2,1.1\n")
    registry = tmp_path / "models"
    result = _edge_train("fit", "--data", str(bad), "--registry", str(registry), "--unsigned", cwd=tmp_path)
    assert result.returncode == 2
    assert "TOO_FEW_ROWS" in result.stderr and "bad.csv" in result.stderr
    assert "Traceback" not in result.stderr
    assert not registry.exists() or not any(registry.rglob(MANIFEST_FILE))


def _synth_args(*extra: str) -> list[str]:
    return ["synth", "--parts", "2000", "--tests", "40", "--sites", "4", "--seed", "9", *extra]


def test_synth_to_stdf_reads_back_like_parquet(tmp_path, capsys):
    """`edge-train synth --out x.stdf.gz` and `--out x.parquet` of one config give the same parts: STDF stores
    readings as R*4, so they must equal the Parquet readings rounded to float32; bins, coordinates, sites and
    part ids must be equal exactly, and the ground truth must be the same JSON."""
    from trainer.cli import main
    stdf, parquet = tmp_path / "lot.stdf.gz", tmp_path / "lot.parquet"
    assert main(_synth_args("--out", str(stdf))) == 0
    assert main(_synth_args("--out", str(parquet))) == 0
    from_stdf, _ = load_tables([str(stdf)])
    from_parquet, _ = load_tables([str(parquet)])

    assert len(from_stdf) == len(from_parquet) == 2000
    assert from_stdf.test_columns == from_parquet.test_columns and len(from_stdf.test_columns) == 40
    np.testing.assert_array_equal(from_stdf.readings(),
                                  from_parquet.readings().astype(np.float32).astype(np.float64))
    assert np.isnan(from_stdf.readings()).any(), "missing readings must stay missing, not become 0"
    for column in ("wafer", "x", "y", "head", "site", "part_id", "hard_bin", "soft_bin", "passed"):
        assert from_stdf.frame[column].astype(object).tolist() == \
            from_parquet.frame[column].astype(object).tolist(), column
    assert (~from_stdf.frame["passed"]).any() and from_stdf.frame["hard_bin"].nunique() > 1
    truth = json.loads((tmp_path / "lot.stdf.gz.truth.json").read_text())
    assert truth == json.loads((tmp_path / "lot.parquet.truth.json").read_text())
    assert truth["excursions"][0]["part_ids"], "the latent outliers' ids are the truth STDF cannot carry"


def test_synth_several_lots_to_stdf_writes_one_file_per_lot(tmp_path, capsys):
    """Without a {lot} placeholder the name gets one before the suffix, and the summary names every file."""
    from trainer.cli import main
    assert main(_synth_args("--lots", "2", "--out", str(tmp_path / "lots.stdf"))) == 0
    printed = capsys.readouterr().out
    assert "lots_SYN0001.stdf" in printed and "lots_SYN0002.stdf" in printed
    files = sorted(tmp_path.glob("lots_*.stdf"))
    assert [f.name for f in files] == ["lots_SYN0001.stdf", "lots_SYN0002.stdf"]
    tables = [load_tables([str(f)])[0] for f in files]
    assert [t.frame["lot"].unique().tolist() for t in tables] == [["SYN0001"], ["SYN0002"]]
    assert sum(len(t) for t in tables) == 2000
    assert all((tmp_path / f"{f.name}.truth.json").is_file() for f in files)


def test_fit_from_two_stdf_lots_through_the_command_line(tmp_path):
    """Two lots written as STDF by `edge-train synth`, trained into one model by `edge-train fit --data a --data b`
    in separate processes; the package's lineage names both files and counts the parts of both."""
    pattern = str(tmp_path / "{lot}.stdf")
    synth = _edge_train("synth", "--out", pattern, "--parts", "3000", "--tests", "30", "--lots", "2",
                        "--seed", "4", cwd=tmp_path)
    assert synth.returncode == 0, synth.stderr
    lots = [tmp_path / "SYN0001.stdf", tmp_path / "SYN0002.stdf"]
    parts = [len(load_tables([str(lot)])[0]) for lot in lots]
    assert parts == [1500, 1500]

    registry = tmp_path / "models"
    fitted = _edge_train("fit", "--data", str(lots[0]), "--data", str(lots[1]), "--registry", str(registry),
                         "--name", "two_lots", "--trees", "40", "--yield-trees", "20", "--unsigned", cwd=tmp_path)
    assert fitted.returncode == 0, fitted.stderr
    reg = Registry(registry)
    manifest = reg.manifest(reg.resolve("two_lots", "candidate"))
    lineage = manifest.lineage
    assert [source.path for source in lineage.sources] == [str(lot.resolve()) for lot in lots]
    assert all(source.bytes == lot.stat().st_size for source, lot in zip(lineage.sources, lots))
    assert lineage.rows == sum(parts) == 3000
    assert len(manifest.features) == 30


def test_static_pat_uses_the_log_scale_only_for_skewed_positive_tests():
    """Log-normal leakage gets limits on log(reading) (a fresh sample of the same population stays inside),
    a normal test keeps median +/- (6 + the one-lot allowance) robust sigma, and a skewed test with readings <= 0
    cannot go to log."""
    rng = np.random.default_rng(5)
    n = 5000
    leak = rng.lognormal(-2.0, 1.0, n)
    normal = rng.normal(1.2, 0.01, n)
    skewed_signed = rng.lognormal(0.0, 1.0, n) - 1.5
    limits = static_pat_limits(np.column_stack([leak, normal, skewed_signed]), ["ILEAK", "VDD", "OFFSET"])
    assert [entry.scale for entry in limits] == ["log", "linear", "linear"]

    vdd = limits[1]
    assert vdd.lot_allowance == rules.ONE_LOT_ALLOWANCE
    assert vdd.low == pytest.approx(vdd.median - (6 + vdd.lot_allowance) * vdd.robust_sigma)
    assert vdd.high == pytest.approx(vdd.median + (6 + vdd.lot_allowance) * vdd.robust_sigma)

    fresh = rng.lognormal(-2.0, 1.0, 100_000)
    outside_log = np.mean((fresh < limits[0].low) | (fresh > limits[0].high))
    linear_high = limits[0].median + 6 * limits[0].robust_sigma
    assert outside_log < 1e-3 < np.mean(fresh > linear_high)
    assert limits[0].low > 0 and limits[0].median == pytest.approx(np.median(leak))


def test_fit_options_are_checked_before_any_data_is_read(tmp_path, capsys):
    """A data file that does not exist: had it been opened, the error would name it. One line per bad option,
    under the option's own name, and nothing in the registry."""
    from trainer.cli import main
    registry = tmp_path / "models"
    status = main(["fit", "--data", str(tmp_path / "missing.parquet"), "--registry", str(registry), "--trees", "0",
                   "--max-features", "0", "--target-outlier-rate", "2", "--holdout-fraction", "1.5",
                   "--yield-trees", "0"])
    assert status == 2
    assert capsys.readouterr().err.splitlines() == [
        "edge-train: error: configuration (edge-train fit options) is not usable:",
        "  - --trees: expected a positive number, got 0",
        "  - --max-features: expected a positive integer or a number in (0, 1], got 0.0",
        "  - --target-outlier-rate: expected a number in (0, 0.5), got 2.0",
        "  - --yield-trees: expected a positive number, got 0",
        "  - --holdout-fraction: expected a number in (0, 1), got 1.5"]
    assert not registry.exists()


def test_synth_options_are_checked_before_anything_is_written(tmp_path, capsys):
    from trainer.cli import main
    assert main(["synth", "--out", str(tmp_path / "lot.parquet"), "--parts", "0", "--sites", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == ["edge-train: error: configuration (SynthConfig) is not usable:",
                                                    "  - parts: expected a positive number, got 0",
                                                    "  - sites: expected a number in [1, 64], got 0"]
    assert not list(tmp_path.iterdir())
