"""Yield models that mean something: the label is never a feature, labels are read only as they cannot be misread,
the held-out parts are the latest ones, a model at chance is not promoted unforced, and downstream outcomes (a
final-test lot) join the wafer-sort parts by die identity."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from edge_agent.errors import DataError
from edge_agent.package.registry import Registry
from trainer.evaluation import choose_threshold, split_rows
from trainer.ingest import load_tables, read_table
from trainer.labels import encode
from trainer.outcomes import OUTCOME_COLUMN, join_outcomes
from trainer.synth import SynthConfig, generate, test_catalog, write
from trainer.table import IDENTITY_COLUMNS, ParametricTable
from trainer.table import TestMeta as Meta   # "Test..." would be collected by pytest
from trainer.train import TrainConfig, fit

QUICK = ("--trees", "30", "--yield-trees", "30", "--unsigned")   # packages no agent serves here


def _edge_train(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def _floor(seed: int, parts: int, tests: int, lots: int) -> pd.DataFrame:
    config = SynthConfig(seed=seed, parts=parts, tests=tests, lots=lots, excursions=())
    return pd.concat(generate(config), ignore_index=True)


# ---- the label is never a feature; a model at chance is not promoted unforced ---------------------------------

@pytest.fixture(scope="module")
def random_label_package(tmp_path_factory):
    """A lot whose label column is coin flips, under identity columns spelled as a tester export spells them, fit
    with --yield-label: before the label was set aside it was also a feature, and the held-out AUC was 1.0."""
    folder = tmp_path_factory.mktemp("random_label")
    frame = _floor(seed=31, parts=3000, tests=20, lots=1).drop(columns=["final_pass", "truth_excursion"])
    frame = frame.rename(columns={"lot": "LOT_ID", "x": "die_x", "y": "die_y", "hard_bin": "HBIN"})
    frame["coin"] = np.random.default_rng(31).integers(0, 2, len(frame))
    data = folder / "lot.csv"
    frame.to_csv(data, index=False)
    registry = folder / "models"
    fitted = _edge_train("fit", "--data", str(data), "--yield-label", "coin", "--registry", str(registry),
                         "--name", "coin", "--advisory", *QUICK, cwd=folder)
    return folder, registry, fitted


def test_the_label_and_identity_columns_are_never_features(random_label_package):
    _, registry, fitted = random_label_package
    assert fitted.returncode == 0, fitted.stderr
    reg = Registry(registry)
    manifest = reg.manifest(reg.resolve("coin", "candidate"))
    features = set(manifest.columns)
    assert len(features) == 20 and all(column.count(":") == 1 for column in features)
    assert "coin" not in features
    assert not features & {"LOT_ID", "die_x", "die_y", "HBIN", *IDENTITY_COLUMNS}
    label = manifest.models.yield_model.label_source
    assert (manifest.models.yield_model.label, label.source) == ("coin", "column")
    # Coin flips cannot be predicted from the readings: the held-out AUC sits near 0.5, far from the 1.0 of a model
    # that reads its own label.
    auc = manifest.metrics.yield_model["roc_auc"]
    assert 0.35 < auc < 0.65


def test_a_yield_model_at_chance_is_a_candidate_promoted_only_by_force_with_a_reason(random_label_package):
    folder, registry, fitted = random_label_package
    reg = Registry(registry)
    gate = reg.manifest(reg.resolve("coin", "candidate")).models.yield_model.gate
    assert gate.passed is False and gate.min_auc == 0.55 and "cannot be told from chance" in gate.reason
    assert "cannot be told from chance" in fitted.stderr and "published as ADVISORY" in fitted.stderr
    assert "NOT PASSED" in fitted.stdout

    refused = _edge_train("registry", "promote", "coin", "1", "production", "--reason", "looks fine",
                          "--registry", str(registry), cwd=folder)
    assert refused.returncode == 2 and "cannot be told from chance" in refused.stderr and "--force" in refused.stderr
    refused_staging = _edge_train("registry", "promote", "coin", "1", "staging", "--reason", "try",
                                  "--registry", str(registry), cwd=folder)
    assert refused_staging.returncode == 2
    assert reg.stages("coin") == {"1": "candidate"}

    forced = _edge_train("registry", "promote", "coin", "1", "production", "--force", "--reason",
                         "line trial, watched by hand", "--registry", str(registry), cwd=folder)
    assert forced.returncode == 0, forced.stderr
    assert "forced past the quality gate" in forced.stdout
    assert reg.stages("coin") == {"1": "production"}
    last = reg.history("coin")[-1]
    assert last["action"] == "promote" and last["reason"] == "line trial, watched by hand"
    assert "cannot be told from chance" in last["forced"]
    history = _edge_train("registry", "history", "coin", "--registry", str(registry), cwd=folder)
    assert "FORCED past" in history.stdout


def test_fit_promote_refuses_a_model_at_chance_but_publishes_it_and_force_needs_a_reason(random_label_package,
                                                                                         tmp_path):
    folder, _, _ = random_label_package
    registry = tmp_path / "models"
    args = ("fit", "--data", str(folder / "lot.csv"), "--yield-label", "coin", "--registry", str(registry),
            "--name", "coin", "--advisory", *QUICK)
    unforced = _edge_train(*args, "--promote", "production", cwd=tmp_path)
    assert unforced.returncode == 2 and "cannot go to production" in unforced.stderr
    assert Registry(registry).stages("coin") == {"1": "candidate"}

    no_reason = _edge_train(*args, "--promote", "production", "--force", cwd=tmp_path)
    assert no_reason.returncode == 2
    assert "--force: needs --reason" in no_reason.stderr and "reading" not in no_reason.stderr

    forced = _edge_train(*args, "--promote", "production", "--force", "--reason", "pilot", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert Registry(registry).stages("coin") == {"1": "candidate", "2": "production"}
    assert Registry(registry).history("coin")[-1]["forced"]


def test_a_label_that_a_table_holds_as_a_test_is_still_not_a_feature():
    """A table built in code, where the label column sits among the tests: fit sets it aside all the same."""
    config = SynthConfig(seed=30, parts=1500, tests=12, lots=1, excursions=())
    frame = pd.concat(generate(config), ignore_index=True)
    frame["9000:LABEL"] = frame.pop("final_pass")
    table = ParametricTable(frame, [*test_catalog(config), Meta(column="9000:LABEL", name="LABEL", number=9000)])
    trained = fit(table, TrainConfig(n_trees=20, yield_trees=10, yield_label="9000:LABEL"), progress=lambda _: None)
    assert "9000:LABEL" not in trained.columns and len(trained.columns) == 12
    assert trained.label.column == "9000:LABEL" and trained.metrics["yield"]["roc_auc"] < 0.99


# ---- labels coded other than 0/1 -------------------------------------------------------------------------------

def test_labels_coded_other_than_0_1_need_the_value_that_means_pass():
    minus_one = pd.Series([-1, 1, 1, -1, None])
    with pytest.raises(DataError) as refused:
        encode(minus_one, "label", None)
    text = str(refused.value)
    assert "column 'label'" in text and "values -1.0, 1.0" in text and "--label-pass-value" in text
    np.testing.assert_array_equal(encode(minus_one, "label", "1"), [0, 1, 1, 0, np.nan])

    words = pd.Series(["PASS", "fail ", "Pass", "FAIL", ""])
    np.testing.assert_array_equal(encode(words, "result", "pass"), [1, 0, 1, 0, np.nan])
    with pytest.raises(DataError, match=r"'GOOD' is not one of the yield label's values.*'PASS', 'fail '"):
        encode(words, "result", "GOOD")
    with pytest.raises(DataError, match="more than two values.*3 values: 'P', 'F', 'X'"):
        encode(pd.Series(["P", "F", "X"]), "result", "P")

    np.testing.assert_array_equal(encode(pd.Series([True, False]), "passed", None), [1, 0])
    np.testing.assert_array_equal(encode(pd.Series(["true", "0", "1"]), "final_pass", None), [1, 0, 1])


def test_fit_reads_a_pass_fail_text_label_with_its_pass_value(tmp_path):
    frame = _floor(seed=32, parts=1500, tests=12, lots=1).drop(columns=["truth_excursion"])
    frame["final_pass"] = np.where(frame.pop("final_pass") == 1, "PASS", "FAIL")
    data = tmp_path / "lot.csv"
    frame.to_csv(data, index=False)
    table, _ = load_tables([str(data)])
    assert set(table.frame["final_pass"]) == {"PASS", "FAIL"}
    with pytest.raises(DataError, match="--label-pass-value"):
        fit(table, TrainConfig(n_trees=20, yield_trees=10), progress=lambda _: None)
    trained = fit(table, TrainConfig(n_trees=20, yield_trees=10, label_pass_value="pass"), progress=lambda _: None)
    np.testing.assert_array_equal(trained.label.values, (table.frame["final_pass"] == "PASS").to_numpy(float))


# ---- honest evaluation ---------------------------------------------------------------------------------------

def test_every_forward_fold_trains_only_on_lots_before_its_own_and_the_card_shows_every_candidate(tmp_path):
    frame = _floor(seed=33, parts=4500, tests=16, lots=3)
    # Given newest first: the order of the lots comes from their timestamps, not from the input.
    frame = pd.concat([frame[frame["lot"] == lot] for lot in ("SYN0003", "SYN0001", "SYN0002")], ignore_index=True)
    table = ParametricTable(frame, test_catalog(SynthConfig(seed=33, parts=4500, tests=16, lots=3)))
    trained = fit(table, TrainConfig(n_trees=20, yield_trees=20), progress=lambda _: None)
    lots, times = frame["lot"].to_numpy(), frame["timestamp"].to_numpy()
    rank = {"SYN0001": 0, "SYN0002": 1, "SYN0003": 2}
    assert trained.folds.kind == "lot"
    for train, test in trained.folds.pairs():
        assert max(rank[lot] for lot in lots[train]) <= min(rank[lot] for lot in lots[test])
        assert times[train].max() <= times[test].min()
    evaluation = trained.forward
    assert {c.name for c in evaluation.candidates} >= {"logistic_l2", "hist_gradient_boosting", "random_forest"}
    best = max(c.mean_auc for c in evaluation.candidates if c.mean_auc is not None)
    assert evaluation.candidates[0].mean_auc == best
    metrics = trained.metrics["yield"]
    assert metrics["roc_auc_low"] <= metrics["roc_auc"] <= metrics["roc_auc_high"] and metrics["fail_parts"] > 0

    from trainer.package import build_package
    files, _ = build_package(trained, table, {}, [])
    card = files["model_card.md"].decode()
    assert all(c.name in card for c in evaluation.candidates) and "95%" in card


def test_one_lot_holds_out_its_latest_time_slice_and_only_data_without_either_is_split_at_random():
    frame = _floor(seed=34, parts=2000, tests=8, lots=1)
    by_time = split_rows(frame, 0.2, "auto")
    times = frame["timestamp"].to_numpy()
    assert by_time.kind == "time" and len(by_time.holdout) == 400
    assert times[by_time.holdout].min() >= times[by_time.train].max()
    assert by_time.time_from == times[by_time.holdout].min()

    anonymous = frame.drop(columns=["lot", "timestamp"])
    at_random = split_rows(anonymous, 0.2, "auto", seed=1)
    assert at_random.kind == "random" and "no timestamp column" in at_random.reason
    with pytest.raises(DataError, match="--split lot needs at least two lots"):
        split_rows(frame, 0.2, "lot")


def test_the_threshold_is_chosen_for_its_objective_not_fixed_at_one_half():
    """Ten failing parts of a hundred, all with pass probabilities below 0.7 but above 0.5: a 0.5 threshold
    predicts no fail at all; the best F1 of the fail class puts the threshold between the fails and the passes, and
    a target precision the scores cannot reach falls back to it, saying so."""
    rng = np.random.default_rng(3)
    prob = np.r_[rng.uniform(0.55, 0.69, 10), rng.uniform(0.71, 1.0, 90)]
    y = np.r_[np.zeros(10, int), np.ones(90, int)]
    best_f1 = choose_threshold(prob, y, "fail_f1", target_precision=0.5, fixed=0.5)
    # Halfway between the highest failing part and the lowest passing one: a rounding step cannot flip either.
    assert best_f1.value == pytest.approx((prob[:10].max() + prob[10:].min()) / 2)
    assert best_f1.objective == "fail_f1" and "1.000" in best_f1.note
    assert ((prob < best_f1.value) == (y == 0)).all()
    assert not (prob < 0.5).any()
    precise = choose_threshold(prob, y, "fail_precision", target_precision=0.9, fixed=0.5)
    assert precise.value == best_f1.value and precise.objective == "fail_precision" and "100%" in precise.note
    noisy = y.copy()
    noisy[np.argmin(prob)] = 1                     # the least likely part passed: no cut is free of false fails
    unreachable = choose_threshold(prob, noisy, "fail_precision", target_precision=0.99, fixed=0.5)
    assert unreachable.objective == "fail_f1" and "no threshold reaches fail precision 99%" in unreachable.note
    one_class = choose_threshold(prob[10:], y[10:], "fail_f1", target_precision=0.5, fixed=0.5)
    assert one_class.value == 0.5 and "one class" in one_class.note


def test_yield_measures_at_the_threshold_are_counts_on_the_pooled_forward_predictions(tmp_path):
    frame = _floor(seed=35, parts=3000, tests=16, lots=2)
    table = ParametricTable(frame, test_catalog(SynthConfig(seed=35, parts=3000, tests=16, lots=2)))
    trained = fit(table, TrainConfig(n_trees=20, yield_trees=20), progress=lambda _: None)
    metrics = trained.metrics["yield"]
    assert trained.threshold.objective == "fail_f1" and trained.yield_threshold != 0.5
    chosen = trained.forward.candidates[0]
    truth = frame["final_pass"].to_numpy()[trained.forward.rows]
    fails, predicted = truth == 0, chosen.prob < trained.yield_threshold
    assert metrics["fail_parts"] == fails.sum() == chosen.pooled.fails
    assert metrics["flagged_parts"] == predicted.sum()


@pytest.fixture(scope="module")
def sort_and_final_test(tmp_path_factory):
    """Three wafer-sort lots as STDF (one file per lot) and their final-test lot in one Parquet file."""
    folder = tmp_path_factory.mktemp("floor")
    config = SynthConfig(seed=36, parts=7500, tests=24, lots=3, excursions=("latent_outliers",))
    summary = write(config, folder / "sort_{lot}.stdf", final_test=folder / "final.parquet")
    return folder, config, summary


def test_a_wafer_sort_lot_joins_its_final_test_lot_by_die_identity(sort_and_final_test):
    """Sort lots 1 and 2 trained against final-test results of all three lots. Every final-test unit is a die that
    passed sort (less a few lost in assembly); the counts are checked against the files themselves, and the label
    the model learns is the final-test result (the floor's final_pass), not the sort flag."""
    folder, config, _ = sort_and_final_test
    final = pq.read_table(folder / "final.parquet").to_pandas()
    sort = [folder / "sort_SYN0001.stdf", folder / "sort_SYN0002.stdf"]
    table, _ = load_tables([str(path) for path in sort])
    assert "final_pass" not in table.frame.columns, "the downstream result lives in the final-test file only"

    joined, report = join_outcomes(table, [str(folder / "final.parquet")])
    units = final.drop_duplicates(["lot", "wafer", "x", "y"])
    trained_lots = units["lot"].isin(["SYN0001", "SYN0002"])
    sort_fails = int((~table.frame["passed"]).sum())
    assert report.join_on == ["lot", "wafer", "x", "y"]
    assert report.outcome_rows == len(final) and report.outcome_parts == len(units)
    assert report.matched == int(trained_lots.sum())
    assert report.outcomes_without_part == int((~trained_lots).sum()) > 0
    assert report.training_without_outcome == len(table) - report.matched
    assert report.training_without_outcome_failed_here == sort_fails > 0
    assert report.training_without_outcome > sort_fails, "a few passing dies are lost in assembly"
    assert report.duplicate_outcomes == int((final["retest"] > 0).sum()) > 0

    truth = pd.concat(generate(config), ignore_index=True).set_index("part_id")["final_pass"]
    label = joined.frame[OUTCOME_COLUMN].to_numpy()
    matched = ~np.isnan(label)
    expected = truth.reindex(joined.frame["part_id"]).to_numpy()
    np.testing.assert_array_equal(label[matched], expected[matched])
    passed_here = joined.frame["passed"].to_numpy(bool)
    assert (label[matched] == 0).any() and passed_here[matched].all()

    trained = fit(joined, TrainConfig(n_trees=30, yield_trees=30), progress=lambda _: None, outcomes=report)
    assert trained.label.source == "outcomes" and OUTCOME_COLUMN not in trained.columns
    assert trained.folds.kind == "lot"
    assert trained.metrics["yield"]["evaluated_parts"] <= int(matched.sum())


def test_fit_with_outcomes_reports_the_match_counts_and_the_manifest_keeps_them(sort_and_final_test, tmp_path):
    folder, _, _ = sort_and_final_test
    registry = tmp_path / "models"
    fitted = _edge_train("fit", "--data", str(folder / "sort_SYN0001.stdf"), "--data",
                         str(folder / "sort_SYN0002.stdf"), "--outcomes", str(folder / "final.parquet"),
                         "--registry", str(registry), "--name", "ft", *QUICK, cwd=tmp_path)
    assert fitted.returncode == 0, fitted.stderr
    reg = Registry(registry)
    manifest = reg.manifest(reg.resolve("ft", "candidate"))
    label = manifest.models.yield_model.label_source
    join = label.outcomes
    assert label.source == "outcomes" and "final.parquet" in label.meaning
    assert f"matched {join['matched']:,} of {join['training_parts']:,} training parts" in fitted.stderr
    assert f"outcomes without a training part {join['outcomes_without_part']:,}" in fitted.stderr
    assert join["matched"] > 0 and join["outcomes_without_part"] > 0 and join["duplicate_outcomes"] > 0
    assert OUTCOME_COLUMN not in manifest.columns and "final.parquet" in reg.package_dir(
        reg.resolve("ft", "candidate")).joinpath("model_card.md").read_text()


def test_without_outcomes_the_manifest_says_the_label_is_this_steps_own_pass_flag(sort_and_final_test, tmp_path):
    folder, _, _ = sort_and_final_test
    table, _ = load_tables([str(folder / "sort_SYN0001.stdf")])
    trained = fit(table, TrainConfig(n_trees=20, yield_trees=20), progress=lambda _: None)
    from trainer.package import build_package
    files, manifest = build_package(trained, table, {}, [])
    label = manifest.models.yield_model.label_source
    assert (label.column, label.source) == ("passed", "pass_flag")
    assert "relearns the test limits" in label.meaning
    assert "relearns the test limits" in files["model_card.md"].decode()


def test_outcomes_keyed_by_a_custom_column_coded_pass_fail(tmp_path):
    """A chip id (a number, which the CSV reader would take for a test) keys both files; results are PASS/FAIL."""
    frame = _floor(seed=37, parts=1500, tests=12, lots=1).drop(columns=["final_pass", "truth_excursion"])
    frame["ecid"] = 7_000_000 + np.arange(len(frame))
    frame.drop(columns=["x", "y", "part_id"]).to_csv(tmp_path / "sort.csv", index=False)
    results = pd.DataFrame({"ecid": frame["ecid"][::2], "result": np.where(frame["passed"][::2], "PASS", "FAIL")})
    results.to_csv(tmp_path / "final.csv", index=False)

    table, _ = load_tables([str(tmp_path / "sort.csv")], set_aside=["ecid"])
    assert "ecid" not in table.test_columns and "ecid" in table.frame.columns
    with pytest.raises(DataError, match="share no part identity"):
        join_outcomes(table, [str(tmp_path / "final.csv")], pass_value="PASS")
    joined, report = join_outcomes(table, [str(tmp_path / "final.csv")], join_on=["ecid"], pass_value="PASS")
    assert (report.matched, report.training_without_outcome, report.result_columns) == \
        (750, 750, {str(tmp_path / "final.csv"): "result"})
    np.testing.assert_array_equal(joined.frame[OUTCOME_COLUMN].to_numpy()[::2], frame["passed"][::2].to_numpy(float))


def test_the_final_test_lot_reads_back_alike_from_stdf_and_csv(tmp_path):
    config = SynthConfig(seed=38, parts=1200, tests=10, lots=1, excursions=())
    write(config, tmp_path / "sort.parquet", final_test=tmp_path / "final.stdf")
    write(config, tmp_path / "sort2.parquet", final_test=tmp_path / "final.csv")
    from_stdf, _ = read_table(str(tmp_path / "final.stdf"))
    from_csv, _ = read_table(str(tmp_path / "final.csv"))
    columns = ["lot", "wafer", "x", "y", "part_id", "hard_bin", "passed", "retest"]
    assert len(from_stdf) == len(from_csv) > 1000 and not from_stdf.tests and not from_csv.tests
    for column in columns:
        assert from_stdf.frame[column].astype(str).tolist() == from_csv.frame[column].astype(str).tolist(), column
    truth = json.loads((tmp_path / "sort.parquet.truth.json").read_text())
    assert truth["final_test"]["files"] == [str(tmp_path / "final.stdf")]
    assert "final_pass" not in pq.read_schema(tmp_path / "sort.parquet").names
