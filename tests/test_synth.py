"""The synthetic test floor: reproducibility, file layout, realism and the recorded excursions.

Most checks read back the Parquet file that ``write`` produced for the default config (the one
``edge-train synth`` and ``demo`` use), with pyarrow directly: reading it into a ParametricTable is
the ingest module's job and has its own tests.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from edge_agent.errors import DataError, EdgeError
from trainer.cli import cmd_synth
from trainer.synth import (DATALOG_PATHOLOGIES, EXCURSIONS, SynthConfig, SynthSummary, excursion_plan, generate,
                           test_catalog, write)

# Aliased: pytest would collect names starting with "test" as tests.
from trainer.table import IDENTITY_COLUMNS, LABEL_COLUMNS, PARQUET_METADATA_KEY
from trainer.table import TestMeta as Meta
from trainer.table import test_column_name as column_name

DEFAULT = SynthConfig()


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[SynthSummary, pd.DataFrame, dict, pq.ParquetFile]:
    path = tmp_path_factory.mktemp("synth") / "lot.parquet"
    summary = write(DEFAULT, path)
    frame = pq.read_table(path).to_pandas()
    truth = json.loads(open(summary.truth_path).read())
    return summary, frame, truth, pq.ParquetFile(path)


@pytest.fixture(scope="module")
def frame(written) -> pd.DataFrame:
    return written[1]


@pytest.fixture(scope="module")
def truth(written) -> dict:
    return written[2]


def _excursion(truth: dict, kind: str) -> dict:
    (entry,) = [e for e in truth["excursions"] if e["kind"] == kind]
    return entry


def _limits(meta: list[Meta]) -> tuple[np.ndarray, np.ndarray]:
    low = np.array([-np.inf if m.low is None else m.low for m in meta])
    high = np.array([np.inf if m.high is None else m.high for m in meta])
    return low, high


def _family(meta: Meta) -> str:
    return re.sub(r"_\d+$", "", meta.name)   # "IDD_ACT_3" -> "IDD_ACT"


def _robust_sigma(values: np.ndarray) -> float:
    q1, q3 = np.nanpercentile(values, [25, 75])
    return (q3 - q1) / 1.35


# --- reproducibility -------------------------------------------------------------------------

def test_same_config_gives_identical_data_whatever_the_chunk_size():
    config = SynthConfig(parts=3000, tests=30, seed=3)
    small_chunks = list(generate(config, chunk_parts=997))
    assert [len(c) for c in small_chunks] == [997, 997, 997, 9]
    whole = pd.concat(small_chunks, ignore_index=True)
    pd.testing.assert_frame_equal(whole, next(generate(config, chunk_parts=100_000)))
    pd.testing.assert_frame_equal(whole, pd.concat(generate(config, chunk_parts=1500), ignore_index=True))


def test_distinct_seeds_give_different_parts_on_the_same_test_program():
    a = next(generate(SynthConfig(parts=2000, tests=30, seed=1)))
    b = next(generate(SynthConfig(parts=2000, tests=30, seed=2)))
    assert test_catalog(SynthConfig(tests=30, seed=1)) == test_catalog(SynthConfig(tests=30, seed=2))
    columns = [m.column for m in test_catalog(SynthConfig(tests=30))]
    same = np.isclose(a[columns].to_numpy(float), b[columns].to_numpy(float))
    assert same.mean() < 0.05   # only integer trim codes coincide now and then
    assert list(a["x"]) == list(b["x"])   # same wafer map and probe order


# --- file layout -----------------------------------------------------------------------------

def test_parquet_columns_types_and_test_metadata(written):
    summary, frame, truth, parquet = written
    catalog = test_catalog(DEFAULT)
    identity = [c for c in frame.columns if c in IDENTITY_COLUMNS]
    assert identity == [c for c in IDENTITY_COLUMNS if c in identity]   # the table's order
    assert list(frame.columns) == identity + list(LABEL_COLUMNS) + [m.column for m in catalog]
    assert {"lot", "wafer", "x", "y", "head", "site", "part_id", "timestamp", "hard_bin", "soft_bin",
            "passed"} <= set(identity)

    stored = json.loads(parquet.schema_arrow.metadata[PARQUET_METADATA_KEY])
    assert stored == [m.to_dict() for m in catalog]
    assert len(catalog) == DEFAULT.tests and len({m.column for m in catalog}) == DEFAULT.tests
    for m in catalog:
        assert m.column == column_name(m.number, m.name, m.pin)
        assert m.units and (m.low is not None or m.high is not None)
        assert frame[m.column].dtype == np.float32
    families = {_family(m) for m in catalog}
    assert {"FMAX", "IDD_ACT", "IDDQ", "ILEAK", "VREG", "TPD", "TSENSE", "CONT"} <= families
    assert any(m.pin for m in catalog) and any(m.low is None for m in catalog)   # MPR pins, one-sided limits

    assert summary.parts == len(frame) == DEFAULT.parts and summary.tests == DEFAULT.tests
    assert frame["part_id"].is_unique
    assert np.all(np.diff(frame["timestamp"].to_numpy()) > 0)   # one tester clock, lots back to back
    assert summary.lots == ["SYN0001", "SYN0002"] and list(frame["lot"].unique()) == summary.lots
    assert set(frame["site"]) == set(range(DEFAULT.sites)) and set(frame["head"]) == {1}
    assert summary.bytes == os.path.getsize(summary.path)


def test_wafers_are_round_and_lots_hold_at_most_25_wafers(frame, truth):
    radius = truth["derived"]["die_radius"]
    assert np.all(frame["x"] ** 2 + frame["y"] ** 2 <= radius ** 2)
    per_lot = frame.groupby("lot")["wafer"].nunique()
    assert per_lot.max() <= 25 and per_lot.tolist() == truth["derived"]["wafers_per_lot"]
    dies = frame.groupby(["lot", "wafer"]).size()
    assert dies.max() == truth["derived"]["dies_per_wafer"]
    # Sites are assigned in touchdowns: the parts of one touchdown finish within a few milliseconds.
    first = frame.iloc[: 4 * 50]
    touchdown = first["timestamp"].to_numpy().reshape(-1, 4)
    assert np.all(np.ptp(touchdown, axis=1) < 0.01)
    assert np.all(first["site"].to_numpy().reshape(-1, 4) == np.arange(4))


def test_truth_file_matches_the_labels(frame, truth, written):
    summary = written[0]
    assert truth["seed"] == DEFAULT.seed and truth["config"]["parts"] == DEFAULT.parts
    counts = frame["truth_excursion"].value_counts().to_dict()
    assert set(counts) == {""} | set(EXCURSIONS)
    for entry in truth["excursions"]:
        assert entry["parts"] == counts[entry["kind"]] == summary.excursion_parts[entry["kind"]]
    latent = _excursion(truth, "latent_outliers")
    assert sorted(latent["part_ids"]) == sorted(frame.loc[frame["truth_excursion"] == "latent_outliers", "part_id"])
    assert "latent_outliers" in summary.describe() and f"{summary.fail_rate:.2%}" in summary.describe()


# --- realism ---------------------------------------------------------------------------------

def test_fail_rate_bins_and_labels_follow_the_limits(frame, written):
    catalog = test_catalog(DEFAULT)
    readings = frame[[m.column for m in catalog]].to_numpy(np.float64)
    low, high = _limits(catalog)
    failed = (readings < low) | (readings > high)   # NaN (did not run) fails nothing
    passed = frame["passed"].to_numpy()
    np.testing.assert_array_equal(passed, ~failed.any(axis=1))
    assert 0.01 < 1 - passed.mean() < 0.08 and written[0].fail_rate == pytest.approx(1 - passed.mean())

    assert np.all((frame["hard_bin"] == 1) == passed) and np.all((frame["soft_bin"] == 1) == passed)
    # A failing part is binned by its first failing test; every test maps to one bin of its family.
    first = np.array([_family(catalog[j]) for j in failed.argmax(axis=1)])[~passed]
    bins = pd.DataFrame({"family": first, "hard": frame["hard_bin"][~passed].to_numpy(),
                         "soft": frame["soft_bin"][~passed].to_numpy()})
    assert (bins.groupby("family")[["hard", "soft"]].nunique() == 1).all().all()
    by_family = bins.groupby("family")["hard"].first()
    assert by_family["CONT"] == 2 and by_family["FMAX"] == 6 and by_family["IDDQ"] == 5
    assert set(bins["hard"]) <= set(range(2, 8))

    missing = np.isnan(readings).mean()
    assert 0.0007 < missing < 0.0013   # missing_fraction 0.001


def test_final_pass_label_fails_risky_passing_parts(frame):
    final = frame["final_pass"].to_numpy()
    passed = frame["passed"].to_numpy()
    assert set(np.unique(final)) == {0, 1}
    assert not np.any(final[~passed])   # a part that fails here never ships
    latent = (frame["truth_excursion"] == "latent_outliers").to_numpy()
    ordinary = passed & ~latent
    ordinary_fail = 1 - final[ordinary].mean()
    assert 0.003 < ordinary_fail < 0.05
    assert 1 - final[latent].mean() > 5 * ordinary_fail   # latent reliability risk shows downstream
    # Extreme leakage (high IDDQ) raises the downstream failure rate among passing parts.
    iddq = frame["3200:IDDQ_0"].to_numpy()
    top = ordinary & (iddq > np.nanquantile(iddq[ordinary], 0.99))
    assert 1 - final[top].mean() > 3 * ordinary_fail


def test_tests_correlate_through_shared_factors(frame):
    # Fmax loads 0.85 on process speed, IDD 0.7: with the other factors and each test's own noise
    # that is a correlation of about 0.6, measured 0.47..0.64 over seeds 7..26 (TPD: about -0.65,
    # IDDQ/ILEAK through the leakage factor: about 0.5).
    clean = frame[frame["passed"] & (frame["truth_excursion"] == "")]

    def spearman(a: str, b: str) -> float:
        both = clean[[a, b]].dropna()
        return float(both[a].rank().corr(both[b].rank()))

    assert spearman("4000:FMAX_0", "3000:IDD_ACT_0") > 0.4
    assert spearman("4000:FMAX_0", "4200:TPD_0") < -0.5
    assert spearman("3200:IDDQ_0", "3300:ILEAK@P0") > 0.35
    assert abs(spearman("4000:FMAX_0", "5000:TSENSE_0")) < 0.3   # temperature is its own factor

    iddq = clean["3200:IDDQ_0"].dropna()
    assert iddq.skew() > 0.7 and abs(np.log(iddq).skew()) < 0.2   # leakage is log-normal


def test_wafer_edge_ring_raises_leakage(frame, truth):
    radius = np.hypot(frame["x"], frame["y"]) / truth["derived"]["die_radius"]
    clean = frame["passed"] & (frame["truth_excursion"] == "")
    log_iddq = np.log(frame["3200:IDDQ_0"])
    edge, centre = log_iddq[clean & (radius > 0.9)], log_iddq[clean & (radius < 0.5)]
    assert (edge.mean() - centre.mean()) / log_iddq[clean].std() > 0.25


# --- excursions ------------------------------------------------------------------------------

def test_latent_outliers_pass_every_limit_yet_sit_far_off_on_their_signature(frame, truth):
    catalog = test_catalog(DEFAULT)
    latent = (frame["truth_excursion"] == "latent_outliers").to_numpy()
    entry = _excursion(truth, "latent_outliers")
    assert latent.sum() == round(DEFAULT.latent_outlier_fraction * DEFAULT.parts) == entry["parts"]
    assert frame.loc[latent, "passed"].all() and (frame.loc[latent, "hard_bin"] == 1).all()
    readings = frame.loc[latent, [m.column for m in catalog]].to_numpy(np.float64)
    low, high = _limits(catalog)
    assert not np.isnan(readings).any()
    assert np.all((readings >= low) & (readings <= high))
    assert set(frame.loc[latent, "lot"]) == {entry["lot"]}

    # Jointly shifted by 3.5..5 sigma on their signature tests, in the recorded directions.
    normal = frame["passed"].to_numpy() & ~latent & (frame["lot"] == entry["lot"]).to_numpy()
    shifts = []
    for column, direction in zip(entry["tests"], entry["direction"]):
        values = frame[column].to_numpy(np.float64)
        shifts.append(direction * (values[latent] - np.nanmedian(values[normal])) / _robust_sigma(values[normal]))
    shifts = np.array(shifts)
    assert len(entry["tests"]) >= 0.3 * DEFAULT.tests
    assert np.median(shifts) > 3.0 and np.mean(shifts > 1.5) > 0.9

    # Spatially clustered: each cluster is a compact patch of its wafer.
    radius = truth["derived"]["die_radius"]
    for cluster in entry["clusters"]:
        on_wafer = frame.loc[latent & (frame["wafer"] == cluster["wafer"]).to_numpy()]
        assert len(on_wafer) == cluster["parts"]
        spread = np.hypot(on_wafer["x"] - on_wafer["x"].mean(), on_wafer["y"] - on_wafer["y"].mean())
        assert spread.max() < 0.5 * radius


def test_drifting_site_drifts_late_in_the_lot_while_other_sites_hold(frame, truth):
    entry = _excursion(truth, "drifting_site")
    lot = frame[frame["lot"] == entry["lot"]]
    position = np.arange(len(lot)) / len(lot)
    early, late = position < 0.5, position >= 0.8
    labelled = (lot["truth_excursion"] == "drifting_site").to_numpy()
    on_site = ((lot["head"] == entry["head"]) & (lot["site"] == entry["site"])).to_numpy()
    np.testing.assert_array_equal(labelled, on_site & (position >= entry["onset_fraction_of_lot"]))

    # Change of each site's mean from the first half of the lot to its last fifth, in sigma units,
    # signed by the recorded drift direction. The ramp averages 2.6 sigma over that window.
    for column, direction in zip(entry["tests"], entry["direction"]):
        values = lot[column].to_numpy(np.float64)
        sigma = _robust_sigma(values[early])
        for site in sorted(lot["site"].unique()):
            mine = (lot["site"] == site).to_numpy()
            change = direction * (np.nanmean(values[mine & late]) - np.nanmean(values[mine & early])) / sigma
            if site == entry["site"]:
                assert change > 1.5, (column, site, change)
            else:
                assert abs(change) < 0.6, (column, site, change)


def test_shifted_lot_moves_its_tests_and_only_those(frame, truth):
    entry = _excursion(truth, "shifted_lot")
    last = (frame["lot"] == entry["lot"]).to_numpy()
    assert entry["lot"] == frame["lot"].iloc[-1]
    assert np.all((frame["truth_excursion"] == "shifted_lot").to_numpy() == last)

    def lot_shift(column: str) -> float:
        values = frame[column].to_numpy(np.float64)
        return (np.nanmedian(values[last]) - np.nanmedian(values[~last])) / _robust_sigma(values[~last])

    for column, sigma in zip(entry["tests"], entry["shift_sigma"]):
        assert np.sign(lot_shift(column)) == np.sign(sigma) and abs(lot_shift(column)) > 1.2, column
    others = [m.column for m in test_catalog(DEFAULT)
              if m.column not in entry["tests"] and m.low is not None and m.high is not None]
    assert np.median([abs(lot_shift(c)) for c in others]) < 0.3   # lot-to-lot process variation only


def _readings(config: SynthConfig) -> tuple[pd.DataFrame, np.ndarray]:
    frame = pd.concat(generate(config), ignore_index=True)
    return frame, frame[[m.column for m in test_catalog(config)]].to_numpy(np.float64)


def test_tester_shift_steps_every_site_of_the_floor_late_in_the_lot_on_its_tests_only():
    plain = SynthConfig(seed=3, parts=3000, tests=200, lots=1, excursions=())
    (plan,) = excursion_plan(SynthConfig(**{**plain.__dict__, "excursions": ("tester_shift",)}))
    frame, shifted = _readings(SynthConfig(**{**plain.__dict__, "excursions": ("tester_shift",)}))
    _, readings = _readings(plain)                   # the same floor and lot without the fault
    labelled = (frame["truth_excursion"] == "tester_shift").to_numpy()
    assert labelled.argmax() == int(0.6 * len(frame)) and labelled[labelled.argmax():].all()
    assert set(frame.loc[labelled, "site"]) == {0, 1, 2, 3} and len(plan["tests"]) == 4
    columns = [m.column for m in test_catalog(plain)]
    moved = np.flatnonzero(~np.isclose(shifted, readings, equal_nan=True).all(axis=0))
    assert [columns[t] for t in moved] == plan["tests"]
    for t, sigma in zip(moved, plan["shift_sigma"]):   # normal tests: the step is 2 sigma in units
        step = (shifted[labelled, t] - readings[labelled, t]) / plan["sigma_units"][columns[t]]
        np.testing.assert_allclose(step[~np.isnan(step)], sigma, rtol=1e-3)


def test_process_shift_moves_the_same_tests_the_same_way_on_every_floor():
    """The product's process moved: every tester's floor (seed) moves the same tests, all of every lot."""
    plans = [excursion_plan(SynthConfig(seed=seed, parts=500, tests=200, lots=1, excursions=("process_shift",)))
             for seed in (3, 4, 5)]
    assert plans[0] == plans[1] == plans[2] and plans[0][0]["kind"] == "process_shift"
    assert len(plans[0][0]["tests"]) == 10 and {abs(s) for s in plans[0][0]["shift_sigma"]} == {2.5}
    frame, _ = _readings(SynthConfig(seed=4, parts=500, tests=200, lots=1, excursions=("process_shift",)))
    assert (frame["truth_excursion"] == "process_shift").all()


# --- CSV -------------------------------------------------------------------------------------

def test_csv_has_metadata_rows_and_the_same_readings(tmp_path):
    config = SynthConfig(parts=600, tests=20, seed=5)
    summary = write(config, tmp_path / "lot.csv")
    catalog = test_catalog(config)
    with open(summary.path, newline="") as handle:
        rows = list(csv.reader(handle))
    header = rows[0]
    expected = next(generate(config))
    assert header == list(expected.columns)
    tags = {row[0]: row for row in rows[1:5]}
    assert list(tags) == ["#test_number", "#units", "#low_limit", "#high_limit"]
    first_test = len(header) - len(catalog)
    for row in tags.values():
        assert all(cell == "" for cell in row[1:first_test])
    for j, meta in enumerate(catalog, start=first_test):
        assert int(tags["#test_number"][j]) == meta.number
        assert tags["#units"][j] == meta.units
        assert (float(tags["#low_limit"][j]) if tags["#low_limit"][j] else None) == meta.low
        assert (float(tags["#high_limit"][j]) if tags["#high_limit"][j] else None) == meta.high
    assert len(rows) == 5 + config.parts

    data = pd.read_csv(summary.path, skiprows=[1, 2, 3, 4], keep_default_na=False, na_values={
        m.column: [""] for m in catalog})
    for meta in catalog:
        np.testing.assert_array_equal(data[meta.column].to_numpy(np.float32), expected[meta.column].to_numpy())
    assert data["part_id"].tolist() == expected["part_id"].tolist()
    assert data["truth_excursion"].tolist() == expected["truth_excursion"].tolist()
    assert data["passed"].tolist() == expected["passed"].tolist()
    np.testing.assert_array_equal(data["timestamp"].to_numpy(), expected["timestamp"].to_numpy())


# --- configuration and command line ----------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"parts": 0}, "parts: expected a positive number, got 0"),
    ({"tests": 3}, "tests: expected a number in [8, 5000], got 3"),
    ({"lots": 0}, "lots: expected a number in [1, 1000], got 0"),
    ({"parts": 3, "lots": 5, "excursions": ()},
     "parts: expected at least lots (5) since every lot needs a part, got 3"),
    ({"sites": 0}, "sites: expected a number in [1, 64], got 0"),
    ({"seed": -1}, "seed: expected a number >= 0, got -1"),
    ({"tests": 2.5}, "tests: expected an integer, got 2.5"),
    ({"excursions": ("bogus",)}, "excursions: expected names among ('drifting_site', 'shifted_lot', "
                                 "'latent_outliers', 'tester_shift', 'process_shift'), got unknown ['bogus']"),
    ({"lots": 2, "excursions": ("shifted_lot", "process_shift")}, "excursions: shifted_lot and process_shift both "
                                                                  "move lots; choose one"),
    ({"excursions": ("shifted_lot", "shifted_lot")}, "excursions: expected each name once, got ['shifted_lot', "
                                                     "'shifted_lot']"),
    ({"lots": 1, "excursions": ("shifted_lot",)}, "excursions: shifted_lot needs lots >= 2"),
    ({"sites": 1, "excursions": ("drifting_site",)}, "excursions: drifting_site needs at least 2"),
    ({"latent_outlier_fraction": 0.0}, "latent_outlier_fraction: expected a number in (0, 0.05], got 0.0"),
    ({"latent_outlier_fraction": 0.2}, "latent_outlier_fraction: expected a number in (0, 0.05], got 0.2"),
    ({"missing_fraction": -0.1}, "missing_fraction: expected a number in [0, 0.05], got -0.1"),
    ({"lot_prefix": "A B"}, "lot_prefix: expected letters, digits, '_' or '-', got 'A B'"),
    ({"die_radius": 1}, "die_radius: expected None or a number in [2, 1000], got 1"),
    ({"start_time": float("nan")}, "start_time: expected a finite number, got nan"),
])
def test_invalid_config_names_the_problem(kwargs, message):
    with pytest.raises(ValueError) as raised:
        SynthConfig(**kwargs)
    assert message in str(raised.value)
    assert isinstance(raised.value, EdgeError)   # the CLI prints it instead of a traceback


def test_configs_that_cannot_be_laid_out_are_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot hold"):
        list(generate(SynthConfig(parts=10_000, lots=1, die_radius=6, wafers_per_lot=2, excursions=())))
    with pytest.raises(ValueError, match="latent outliers do not fit"):
        generate(SynthConfig(parts=200, lots=2, latent_outlier_fraction=0.05))
    with pytest.raises(ValueError, match="chunk_parts"):
        generate(SynthConfig(parts=100, lots=1, excursions=()), chunk_parts=0)
    with pytest.raises(DataError, match=r"expected .parquet, .csv or .stdf .*got .txt"):
        write(SynthConfig(parts=100, lots=1, excursions=()), tmp_path / "lot.txt")
    assert not list(tmp_path.iterdir())


def test_explicit_wafer_count_sizes_the_die_grid(tmp_path):
    config = SynthConfig(parts=5000, lots=1, tests=10, wafers_per_lot=4, excursions=())
    summary = write(config, tmp_path / "a.parquet")
    frame = pq.read_table(summary.path).to_pandas()
    assert frame["wafer"].nunique() == 4 and frame.groupby("wafer").size().max() >= 1250
    assert set(frame["truth_excursion"]) == {""}


def test_cli_synth_command_writes_a_lot(tmp_path, capsys):
    out = tmp_path / "cli.parquet"
    args = argparse.Namespace(out=str(out), parts=1500, tests=16, lots=1, sites=2, heads=2, seed=9,
                              first_lot=7, excursion=None, final_test=None)
    assert cmd_synth(args) == 0
    printed = capsys.readouterr().out
    assert "1,500 parts x 16 tests" in printed and "latent_outliers" in printed
    frame = pq.read_table(out).to_pandas()
    assert set(frame["lot"]) == {"SYN0007"} and set(frame["head"]) == {1, 2} and set(frame["site"]) == {0, 1}
    assert set(frame["truth_excursion"]) == {"", "latent_outliers"}
    assert json.loads(open(f"{out}.truth.json").read())["config"]["first_lot_index"] == 7


# ---- the pathologies of real datalogs -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pathological(tmp_path_factory) -> tuple[pd.DataFrame, list[Meta], dict]:
    config = SynthConfig(parts=6000, tests=60, lots=3, seed=3, excursions=(), **DATALOG_PATHOLOGIES)
    path = tmp_path_factory.mktemp("pathological") / "floor.parquet"
    summary = write(config, path)
    return pq.read_table(path).to_pandas(), test_catalog(config), json.loads(open(summary.truth_path).read())


def test_datalog_pathologies_are_off_by_default():
    plain = SynthConfig(parts=2000, tests=30, seed=1, excursions=())
    assert (plain.quantized_share, plain.stop_on_fail, plain.datalog_every, plain.spread_change_share,
            plain.sublots) == (0.0, False, 1, 0.0, 1)
    frame = next(generate(plain))
    assert "sublot" not in frame.columns and frame[[m.column for m in test_catalog(plain)]].notna().mean().mean() > 0.99
    pathological = SynthConfig(parts=2000, tests=30, seed=1, excursions=(), **DATALOG_PATHOLOGIES)
    # only the tests chosen for a pathology change in the test program
    changed = [a.column for a, b in zip(test_catalog(plain), test_catalog(pathological)) if a != b]
    assert 0 < len(changed) <= round(DATALOG_PATHOLOGIES["spread_change_share"] * 30)


def test_quantized_tests_read_whole_instrument_steps(pathological):
    frame, _, truth = pathological
    quantized = truth["pathologies"]["quantized_tests"]
    assert len(quantized) == round(DATALOG_PATHOLOGIES["quantized_share"] * 60)
    for column, step in quantized.items():
        values = frame[column].dropna().to_numpy()
        assert np.allclose(values / step, np.round(values / step), atol=1e-6), column
        passing = frame.loc[frame["passed"], column].dropna()
        assert 3 <= passing.nunique() <= 20, (column, passing.nunique())


def test_stop_on_fail_and_sampled_datalogs_leave_readings_out(pathological):
    frame, catalog, _ = pathological
    columns = [m.column for m in catalog]
    present = frame[columns].notna().to_numpy()
    position = frame.groupby("lot").cumcount().to_numpy()
    unlogged = position % 2 == 1
    assert not present[unlogged].any()                       # every other part: bins, no readings
    assert frame.loc[unlogged, "hard_bin"].notna().all() and (~frame.loc[unlogged, "passed"]).any()
    logged_fails = ~unlogged & ~frame["passed"].to_numpy()
    low, high = _limits(catalog)
    for row in np.flatnonzero(logged_fails):
        values = frame[columns].to_numpy()[row]
        first = int(np.flatnonzero((values < low) | (values > high))[0])
        assert not present[row, first + 1:].any() and present[row, :first + 1].sum() >= 0.9 * (first + 1)


def test_spread_changing_tests_are_three_to_five_times_wider_in_every_other_lot(pathological):
    frame, _, truth = pathological
    changing = truth["pathologies"]["spread_change_tests"]
    assert len(changing) == round(DATALOG_PATHOLOGIES["spread_change_share"] * 60)
    for column, factors in changing.items():
        assert sorted(set(np.round(list(factors.values()), 6)))[0] == 1.0
        sigma = {lot: _robust_sigma(frame.loc[(frame["lot"] == lot) & frame["passed"], column].to_numpy())
                 for lot in factors}
        narrow = [lot for lot, f in factors.items() if f == 1.0]
        for lot, factor in factors.items():
            if factor != 1.0:
                assert 3.0 <= factor <= 5.0
                assert sigma[lot] / np.mean([sigma[n] for n in narrow]) == pytest.approx(factor, rel=0.25)


def test_sublots_share_their_lot_id_and_restart_wafer_numbers(pathological):
    frame, _, _ = pathological
    assert list(frame.columns[:3]) == ["lot", "sublot", "wafer"]
    for _, lot in frame.groupby("lot"):
        assert list(dict.fromkeys(lot["sublot"])) == ["A", "B"]
        first_wafers = lot.groupby("sublot")["wafer"].first()
        assert (first_wafers == "W01").all()


def test_stdf_files_carry_the_pathologies(tmp_path):
    """One file per sublot (MIR holds one lot and one sublot); parts without readings keep their part record and
    bins; readings a stop-on-fail program skipped stay missing; quantized values come back as written."""
    config = SynthConfig(parts=1500, tests=24, lots=1, seed=4, excursions=(), **DATALOG_PATHOLOGIES)
    expected = pd.concat(generate(config), ignore_index=True)
    summary = write(config, tmp_path / "lot.stdf")
    files = summary.path.split(", ")
    assert [Path(f).name for f in files] == ["lot_SYN0001_A.stdf", "lot_SYN0001_B.stdf"]
    from trainer.ingest.stdf import read_stdf
    back = pd.concat([read_stdf(f).table.frame for f in files], ignore_index=True)
    columns = [m.column for m in test_catalog(config)]
    assert len(back) == len(expected) and back["sublot"].tolist() == expected["sublot"].tolist()
    assert back["hard_bin"].tolist() == expected["hard_bin"].tolist()
    np.testing.assert_array_equal(back[columns].isna().to_numpy(), expected[columns].isna().to_numpy())
    np.testing.assert_allclose(back[columns].to_numpy(float), expected[columns].to_numpy(float).astype(np.float32),
                               rtol=0, atol=0, equal_nan=True)
