"""Ingestion and validation: real bad files on disk, each problem must come back named and counted."""
from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edge_agent.errors import DataError
from trainer.ingest import load_tables, read_table
from trainer.table import PARQUET_METADATA_KEY, ParametricTable
from trainer.table import TestMeta as Meta  # aliased: pytest would try to collect a class named Test*
from trainer.validate import HIGH_MISSING_RATE

STDF_DIR = Path(__file__).parent / "data" / "stdf"
TESTS = ["1000:VDD", "1001:IDD", "1002:FREQ"]


def lot(n: int = 240, seed: int = 0, lot_name: str = "L1", tests=TESTS) -> pd.DataFrame:
    """A clean wafer-sort lot: unique (x, y), a pass flag, normal readings."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"lot": lot_name, "wafer": "1", "x": np.arange(n) % 30, "y": np.arange(n) // 30,
                          "hard_bin": rng.choice([1, 1, 1, 4], n)})
    frame["passed"] = frame["hard_bin"] == 1
    for j, column in enumerate(tests):
        frame[column] = rng.normal(1.0 + j, 0.1, n)
    return frame


def write_csv(path: Path, frame: pd.DataFrame) -> str:
    frame.to_csv(path, index=False)
    return str(path)


def only(report, code: str):
    found = report.by_code(code)
    assert len(found) == 1, f"expected one {code}, got {[str(f) for f in report.findings]}"
    return found[0]


def file_line(path: str, line: int) -> str:
    return Path(path).read_text().splitlines()[line - 1]


# ---------------------------------------------------------------- per-cell problems

def test_non_numeric_cells_become_missing_and_are_located(tmp_path):
    frame = lot().astype({"1001:IDD": object})
    frame.loc[[3, 50, 51, 90], "1001:IDD"] = ["FAIL", "n.a.", "1,5", "FAIL"]
    path = write_csv(tmp_path / "bad_cells.csv", frame)
    table, report = load_tables([path], min_rows=10)
    finding = only(report, "NON_NUMERIC")
    assert finding.severity == "warning" and finding.column == "1001:IDD" and finding.count == 4
    assert "bad_cells.csv" in finding.message and "'1001:IDD'" in finding.message and "4 of 240" in finding.message
    # the line numbers it names hold the values it quotes
    assert "'FAIL' at line 5" in finding.message and "FAIL" in file_line(path, 5)
    assert "'n.a.' at line 52" in finding.message and "n.a." in file_line(path, 52)
    idd = table.frame["1001:IDD"]
    assert idd.dtype == np.float64 and idd.isna().sum() == 4 and idd.notna().sum() == 236


def test_mostly_text_column_is_dropped(tmp_path):
    frame = lot()
    frame["OPERATOR_NOTE"] = ["ok"] * 200 + ["1.0"] * 40
    path = write_csv(tmp_path / "notes.csv", frame)
    table, report = load_tables([path], min_rows=10)
    finding = only(report, "NON_NUMERIC")
    assert finding.column == "OPERATOR_NOTE" and finding.count == 200 and "dropped" in finding.message
    assert "OPERATOR_NOTE" not in table.frame.columns and table.test_columns == TESTS


def test_parquet_text_test_column_is_coerced_and_rows_named(tmp_path):
    frame = lot(n=40).astype({"1002:FREQ": str})
    frame.loc[9, "1002:FREQ"] = "OVERFLOW"
    path = tmp_path / "text.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    table, findings = read_table(str(path))
    (finding,) = findings
    assert finding.code == "NON_NUMERIC" and finding.count == 1 and "'OVERFLOW' at row 10" in finding.message
    assert table.frame["1002:FREQ"].dtype == np.float64 and np.isnan(table.frame["1002:FREQ"][9])
    assert table.frame["1002:FREQ"][8] == pytest.approx(float(frame.loc[8, "1002:FREQ"]))


def test_only_text_columns_fail_with_the_reason_shown(tmp_path):
    frame = lot()[["lot", "x", "y"]].assign(STATUS="PASS", COMMENT="ok")
    with pytest.raises(DataError) as caught:
        load_tables([write_csv(tmp_path / "words.csv", frame)], min_rows=10)
    text = str(caught.value)
    assert "1 fatal problem(s)" in text and "NO_TESTS" in text
    assert "warnings (2)" in text and "column 'STATUS'" in text and "NON_NUMERIC" in text


def test_infinities_are_missing_and_counted(tmp_path):
    frame = lot()
    frame.loc[[7, 8], "1002:FREQ"] = [np.inf, -np.inf]
    path = write_csv(tmp_path / "inf.csv", frame)
    table, report = load_tables([path], min_rows=10)
    finding = only(report, "INFINITE")
    assert finding.column == "1002:FREQ" and finding.count == 2
    assert "inf.csv" in finding.message and "line 9" in finding.message and "inf" in file_line(path, 9)
    assert table.frame["1002:FREQ"].isna().sum() == 2 and np.isfinite(table.readings()[~np.isnan(table.readings())]).all()


# ---------------------------------------------------------------- per-test problems

def test_all_missing_and_constant_tests_are_dropped(tmp_path):
    frame = lot()
    frame["1003:NEVER_RAN"] = np.nan
    frame["1004:TRIM"] = 7.0
    frame.loc[5, "1004:TRIM"] = np.nan            # constant where present still counts as constant
    path = write_csv(tmp_path / "dead.csv", frame)
    table, report = load_tables([path], min_rows=10)
    empty, constant = only(report, "ALL_MISSING"), only(report, "CONSTANT")
    assert empty.column == "1003:NEVER_RAN" and empty.count == 240 and "dead.csv" in empty.message
    assert constant.column == "1004:TRIM" and constant.count == 239 and " 7;" in constant.message
    assert table.test_columns == TESTS
    assert report.tests_in == 5 and report.tests_out == 3
    assert report.dropped_tests == {"1003:NEVER_RAN": "all missing", "1004:TRIM": "constant"}


def test_high_missing_rate_is_warned_and_every_rate_recorded(tmp_path):
    frame = lot()
    frame.loc[:179, "1000:VDD"] = np.nan          # 180 of 240 missing: 75 %
    frame.loc[:23, "1001:IDD"] = np.nan           # 24 of 240: 10 %, no warning
    path = write_csv(tmp_path / "sparse.csv", frame)
    # rows 0-23 keep one reading of three: kept here, so every missing reading is counted
    table, report = load_tables([path], min_rows=10, keep_sparse_parts=True)
    finding = only(report, "HIGH_MISSING")
    assert finding.column == "1000:VDD" and finding.count == 180 and "75.0%" in finding.message
    assert "1000:VDD" in table.test_columns       # kept: the imputer handles it
    assert report.missing_rate == pytest.approx({"1000:VDD": 0.75, "1001:IDD": 0.1, "1002:FREQ": 0.0})
    assert 0.1 < HIGH_MISSING_RATE < 0.75


# ---------------------------------------------------------------- parts: duplicates and retests

def test_exact_duplicate_rows_are_dropped(tmp_path):
    frame = lot()
    path = write_csv(tmp_path / "dup.csv", pd.concat([frame, frame.iloc[[10, 11, 12]]], ignore_index=True))
    table, report = load_tables([path], min_rows=10)
    finding = only(report, "DUPLICATE_PART")
    assert finding.count == 3 and "dup.csv" in finding.message and "x=10 y=0" in finding.message
    assert len(table) == 240 and report.rows_in == 243 and report.rows_out == 240
    assert not report.by_code("RETEST")


def retested_lot(tmp_path, name="retest.csv", with_retest_column=False) -> str:
    """Parts 0..9 tested twice: first VDD = 100 + i, then (later in the file) VDD = 200 + i."""
    frame = lot()
    first = frame.iloc[:10].copy()
    first["1000:VDD"] = 100.0 + np.arange(10)
    frame.loc[:9, "1000:VDD"] = 200.0 + np.arange(10)
    combined = pd.concat([first, frame], ignore_index=True)
    if with_retest_column:
        # retest numbers say the file order is wrong: the rows written first are the retests
        combined["retest"] = [1] * 10 + [0] * 10 + [0] * 230
    return write_csv(tmp_path / name, combined)


@pytest.mark.parametrize("policy, rows, kept_base", [("last", 240, 200.0), ("first", 240, 100.0), ("all", 250, None)])
def test_retest_policies(tmp_path, policy, rows, kept_base):
    path = retested_lot(tmp_path)
    table, report = load_tables([path], retest_policy=policy, min_rows=10)
    finding = only(report, "RETEST")
    assert finding.count == 10 and "10 parts were tested more than once (10 extra rows)" in finding.message
    assert "retest.csv" in finding.message and f"'{policy}'" in finding.message
    assert len(table) == rows
    vdd = table.frame.loc[(table.frame["x"] < 10) & (table.frame["y"] == 0), "1000:VDD"].to_numpy()
    if kept_base is None:
        assert sorted(vdd) == sorted(list(100.0 + np.arange(10)) + list(200.0 + np.arange(10)))
    else:
        assert sorted(vdd) == list(kept_base + np.arange(10))
        assert "dropped 10 rows" in finding.message


def test_retest_column_orders_tests_before_file_order(tmp_path):
    path = retested_lot(tmp_path, with_retest_column=True)
    table, report = load_tables([path], retest_policy="last", min_rows=10)
    assert "ordered by retest" in only(report, "RETEST").message
    vdd = table.frame.loc[(table.frame["x"] < 10) & (table.frame["y"] == 0), "1000:VDD"].to_numpy()
    assert sorted(vdd) == list(100.0 + np.arange(10))   # retest 1 rows, though written first


def test_same_part_same_retest_number_different_readings_is_a_duplicate(tmp_path):
    frame = lot()
    frame["retest"] = 0
    clash = frame.iloc[[20, 21]].copy()
    clash["1001:IDD"] += 1.0
    path = write_csv(tmp_path / "clash.csv", pd.concat([frame, clash], ignore_index=True))
    table, report = load_tables([path], min_rows=10)
    finding = only(report, "DUPLICATE_PART")
    assert finding.count == 2 and "same retest number" in finding.message and "clash.csv" in finding.message
    assert len(table) == 240


def test_parts_of_different_files_without_lot_column_are_different_parts(tmp_path):
    a = write_csv(tmp_path / "a.csv", lot(seed=1).drop(columns=["lot"]))
    b = write_csv(tmp_path / "b.csv", lot(seed=2).drop(columns=["lot"]))
    table, report = load_tables([a, b], min_rows=10)
    assert len(table) == 480 and not report.by_code("RETEST") and not report.by_code("DUPLICATE_PART")


def test_retests_across_files_of_one_lot(tmp_path):
    first = lot(seed=1)
    retest = lot(seed=2).iloc[:15]
    a = write_csv(tmp_path / "wafer1.csv", first)
    b = write_csv(tmp_path / "wafer1_retest.csv", retest)
    table, report = load_tables([a, b], min_rows=10)
    finding = only(report, "RETEST")
    assert finding.count == 15 and "wafer1.csv" in finding.message and "wafer1_retest.csv" in finding.message
    assert len(table) == 240
    kept = table.frame.set_index(["x", "y"]).loc[(3, 0), "1000:VDD"]
    assert kept == pytest.approx(retest.set_index(["x", "y"]).loc[(3, 0), "1000:VDD"])


def test_wafer_sort_and_final_test_files_combined(tmp_path):
    """x/y identify wafer-sort parts; part_id identifies final-test parts, which have no x/y."""
    sort = write_csv(tmp_path / "sort.csv", lot(seed=1, lot_name="L7"))
    final = lot(seed=2, lot_name="L7").drop(columns=["x", "y", "wafer"]).assign(part_id=[f"P{i}" for i in range(240)])
    final = pd.concat([final, final.iloc[[5, 6]].assign(**{"1001:IDD": 9.0})], ignore_index=True)
    final_path = write_csv(tmp_path / "final.csv", final)
    table, report = load_tables([sort, final_path], min_rows=10)
    finding = only(report, "RETEST")
    assert finding.count == 2 and finding.file == final_path and "part_id=P5" in finding.message
    assert len(table) == 480
    assert (table.frame.loc[table.frame["part_id"].isin(["P5", "P6"]), "1001:IDD"] == 9.0).all()


def test_no_identity_and_no_pass_info(tmp_path):
    frame = lot()[TESTS]
    path = write_csv(tmp_path / "bare.csv", frame)
    table, report = load_tables([path], min_rows=10)
    assert only(report, "NO_IDENTITY").severity == "warning" and "bare.csv" in only(report, "NO_IDENTITY").message
    no_pass = only(report, "NO_PASS_INFO")
    assert no_pass.severity == "info" and "every part counts as passing" in no_pass.message
    assert "passed" not in table.frame.columns and len(table) == 240


def test_aliases_and_passed_from_hard_bin(tmp_path):
    frame = lot().drop(columns=["passed"]).rename(columns={"lot": "LOT_ID", "x": "die_x", "y": "Y_COORD",
                                                           "hard_bin": "HBIN"})
    frame.loc[0, "HBIN"] = np.nan
    path = write_csv(tmp_path / "aliases.csv", frame)
    table, report = load_tables([path], min_rows=10)
    assert table.identity_columns == ["lot", "wafer", "x", "y", "hard_bin", "passed"]
    derived = only(report, "PASSED_FROM_BIN")
    assert derived.count == 240 and "1 without a hard bin count as failing" in derived.message
    expected = (frame["HBIN"] == 1).to_numpy()
    assert table.frame["passed"].dtype == bool and (table.frame["passed"].to_numpy() == expected).all()


def test_unreadable_identity_values(tmp_path):
    frame = lot(n=30).astype({"x": object, "passed": object})
    frame.loc[4, "x"] = "A7"
    frame.loc[[2, 3], "passed"] = ["PASS", "maybe"]
    table, findings = read_table(write_csv(tmp_path / "ids.csv", frame))
    bad = {f.column: f for f in findings if f.code == "BAD_VALUE"}
    assert bad["x"].count == 1 and "'A7' at line 6" in bad["x"].message
    assert bad["passed"].count == 1 and "'maybe' at line 5" in bad["passed"].message
    assert np.isnan(table.frame["x"][4]) and table.frame["passed"][2] is True and pd.isna(table.frame["passed"][3])


# ---------------------------------------------------------------- fatal problems

def test_too_few_rows_is_fatal(tmp_path):
    path = write_csv(tmp_path / "tiny.csv", lot(n=50))
    with pytest.raises(DataError) as caught:
        load_tables([path], min_rows=200)
    text = str(caught.value)
    assert "TOO_FEW_ROWS" in text and "tiny.csv" in text and "only 50 rows" in text and "at least 200" in text


def test_no_tests_is_fatal_and_all_fatal_problems_come_together(tmp_path):
    frame = lot(n=30)[["lot", "wafer", "x", "y"]].assign(**{"1000:VDD": 1.0, "1001:IDD": np.nan})
    good = write_csv(tmp_path / "no_tests.csv", frame)
    missing = str(tmp_path / "gone.parquet")
    with pytest.raises(DataError) as caught:
        load_tables([good, missing], min_rows=200)
    text = str(caught.value)
    assert "3 fatal problem(s)" in text
    assert "NO_TESTS" in text and "1 constant" in text and "1 all missing" in text
    assert "TOO_FEW_ROWS" in text and "only 30 rows" in text
    assert "UNREADABLE" in text and "gone.parquet" in text and "no such file" in text


def test_unknown_retest_policy(tmp_path):
    with pytest.raises(DataError, match="retest policy"):
        load_tables([write_csv(tmp_path / "a.csv", lot())], retest_policy="newest")


# ---------------------------------------------------------------- unreadable files

def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_text("lot,x\nL1,1\n")
    with pytest.raises(DataError) as caught:
        read_table(str(path))
    assert "fake.parquet" in str(caught.value) and "not a readable Parquet file" in str(caught.value)
    assert caught.value.file == str(path)


def test_nonexistent_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.csv: no such file"):
        read_table(str(tmp_path / "nothere.csv"))
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    with pytest.raises(DataError, match="not a regular file"):
        read_table(str(folder))


def test_unknown_suffix(tmp_path):
    path = tmp_path / "lot.xlsx"
    path.write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError) as caught:
        read_table(str(path))
    text = str(caught.value)
    assert "lot.xlsx" in text and "unknown file type" in text and ".csv" in text and ".parquet" in text and ".stdf" in text


def test_empty_csv(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.csv: empty file"):
        read_table(str(empty))
    header_only = tmp_path / "header_only.csv"
    header_only.write_text("lot,x,y,1000:VDD\n")
    with pytest.raises(DataError) as caught:
        load_tables([str(header_only)], min_rows=1)
    text = str(caught.value)
    assert "TOO_FEW_ROWS" in text and "only 0 rows" in text and "header_only.csv" in text


def test_ragged_csv_rows_are_fatal_and_located(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("lot,x,y,1000:VDD,1001:IDD\n"
                    "L1,0,0,1.0,2.0\n"
                    "L1,1,0,1.1,2.1\n"
                    "L1,2,0,1.2,2.2,9.9\n"      # line 4: one field too many
                    "L1,3,0,1.3,2.3\n"
                    "L1,4,0,1.4\n")             # line 6: one too few (a cut-off last row)
    with pytest.raises(DataError) as caught:
        read_table(str(path))
    text = str(caught.value)
    assert "ragged.csv" in text and "2 rows" in text and "line 4: 6 fields" in text and "line 6: 4 fields" in text


def test_duplicate_csv_header(tmp_path):
    path = tmp_path / "twice.csv"
    path.write_text("lot,x,y,1000:VDD,1000:VDD\nL1,0,0,1,2\n")
    with pytest.raises(DataError, match=r"twice\.csv: duplicate column names \['1000:VDD'\]"):
        read_table(str(path))


def test_two_columns_for_one_identity(tmp_path):
    path = tmp_path / "two_x.csv"
    path.write_text("lot,x,die_x,y,1000:VDD\nL1,0,0,0,1\n")
    with pytest.raises(DataError, match=r"two_x\.csv: several columns stand for the same identity column: x"):
        read_table(str(path))


# ---------------------------------------------------------------- metadata

def test_csv_metadata_rows_become_test_meta(tmp_path):
    path = tmp_path / "meta.csv.gz"
    body = lot(n=20).to_csv(index=False).splitlines()
    header = body[0].split(",")
    assert header[:6] == ["lot", "wafer", "x", "y", "hard_bin", "passed"]
    identity_blanks = [""] * 5

    def row(marker, values):
        return ",".join([marker] + identity_blanks + values)

    text = "\n".join([body[0],
                      row("#test_number", ["", "2001", "1002"]),
                      row("#units", ["V", "uA", "MHz"]),
                      row("#low_limit", ["0.9", "", "oops"]),
                      row("#high_limit", ["1.1", "5", "3.5"])] + body[1:]) + "\n"
    with gzip.open(path, "wt") as handle:
        handle.write(text)
    table, findings = read_table(str(path))
    assert len(table) == 20
    meta = {t.column: t for t in table.tests}
    assert meta["1000:VDD"] == Meta("1000:VDD", "VDD", 1000, "V", 0.9, 1.1)
    assert meta["1001:IDD"] == Meta("1001:IDD", "IDD", 2001, "uA", None, 5.0)   # the row beats the name
    assert meta["1002:FREQ"] == Meta("1002:FREQ", "FREQ", 1002, "MHz", None, 3.5)
    bad = [f for f in findings if f.code == "BAD_METADATA"]
    assert len(bad) == 1 and bad[0].column == "1002:FREQ" and "'oops'" in bad[0].message and "line 4" in bad[0].message
    assert table.frame["1000:VDD"].dtype == np.float64       # metadata rows are not read as data


def test_parquet_metadata_round_trip(tmp_path):
    frame = lot(n=50)
    frame["1003:IDDQ@P12"] = np.linspace(0, 1, 50)
    tests = [Meta("1000:VDD", "VDD", 1000, "V", 0.9, 1.1), Meta("1001:IDD", "IDD", 1001, "uA", None, 5.0),
             Meta("1002:FREQ", "FREQ", 1002, "MHz", 1.0, None),
             Meta("1003:IDDQ@P12", "IDDQ", 1003, "nA", None, 2.0, "P12")]
    original = ParametricTable(frame, tests, ["made here"])
    arrow = pa.Table.from_pandas(original.frame, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**arrow.schema.metadata, PARQUET_METADATA_KEY: original.tests_json()})
    path = tmp_path / "lot.parquet"
    pq.write_table(arrow, path)

    table, findings = read_table(str(path))
    assert table.tests == tests and findings == []
    np.testing.assert_array_equal(table.readings(), original.readings())
    assert table.frame["lot"].tolist() == ["L1"] * 50 and table.frame["passed"].tolist() == frame["passed"].tolist()

    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "bare.pq")
    inferred, _ = read_table(str(tmp_path / "bare.pq"))
    assert [(t.number, t.name, t.pin, t.units) for t in inferred.tests] == [
        (1000, "VDD", None, ""), (1001, "IDD", None, ""), (1002, "FREQ", None, ""), (1003, "IDDQ", "P12", "")]


def test_combining_files_with_different_tests(tmp_path):
    a = lot(seed=1, lot_name="A", tests=["1000:VDD", "1001:IDD"])
    b = lot(seed=2, lot_name="B", tests=["1000:VDD", "1002:FREQ", "1003:LEAK"])
    path_a, path_b = write_csv(tmp_path / "lotA.csv", a), str(tmp_path / "lotB.parquet")
    b_table = ParametricTable(b, [Meta("1000:VDD", "VDD", 1000, "mV"), Meta("1002:FREQ", "FREQ", 1002),
                                  Meta("1003:LEAK", "LEAK", 1003)])
    arrow = pa.Table.from_pandas(b, preserve_index=False)
    pq.write_table(arrow.replace_schema_metadata({PARQUET_METADATA_KEY: b_table.tests_json()}), path_b)

    table, report = load_tables([path_a, path_b], min_rows=10)
    assert table.test_columns == ["1000:VDD", "1001:IDD", "1002:FREQ", "1003:LEAK"]
    assert len(table) == 480
    frame = table.frame
    assert frame.loc[frame["lot"] == "A", ["1002:FREQ", "1003:LEAK"]].isna().all().all()
    assert frame.loc[frame["lot"] == "B", "1001:IDD"].isna().all()
    mismatched = {f.file: f for f in report.by_code("MISMATCHED_TESTS")}
    assert mismatched[path_a].count == 2 and "lacks 2 of the 4 tests" in mismatched[path_a].message
    assert "'1002:FREQ'" in mismatched[path_a].message
    assert mismatched[path_b].count == 1 and mismatched[path_b].column == "1001:IDD"
    units = only(report, "MISMATCHED_LIMITS")
    assert units.column == "1000:VDD" and "'' in" in units.message and "'mV' here" in units.message
    assert units.file == path_b
    assert report.missing_rate["1001:IDD"] == pytest.approx(0.5)
    assert report.rows_in == 480 and report.files == [path_a, path_b]


def test_report_is_json_and_readable(tmp_path):
    frame = lot()
    frame["1003:FLAT"] = 0.0
    table, report = load_tables([write_csv(tmp_path / "r.csv", frame)], min_rows=10)
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["rows_out"] == 240 and as_dict["tests_out"] == 3 and as_dict["counts"]["warning"] == 1
    assert as_dict["findings"][0]["code"] == "CONSTANT" and as_dict["findings"][0]["column"] == "1003:FLAT"
    text = report.summary()
    assert "240 rows in -> 240 rows out" in text and "4 tests in -> 3 tests out" in text and "CONSTANT" in text


# ---------------------------------------------------------------- STDF dispatch and the command line

def stdf_reader_available() -> bool:
    try:
        import trainer.ingest.stdf  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name == "trainer.ingest.stdf":
            return False
        raise
    return True


@pytest.mark.skipif(not stdf_reader_available(), reason="trainer.ingest.stdf is not written yet")
def test_damaged_stdf_file_gives_findings(tmp_path):
    data = gzip.decompress((STDF_DIR / "a595.stdf.gz").read_bytes())
    path = tmp_path / "cut.stdf"
    path.write_bytes(data[: len(data) * 2 // 3 + 3])     # cut inside a record
    table, findings = read_table(str(path))
    damaged = [f for f in findings if f.code == "STDF_DAMAGED"]
    assert len(table) > 0 and damaged and all("cut.stdf" in f.message and f.severity == "warning" for f in damaged)
    intact, _ = read_table(str(STDF_DIR / "a595.stdf.gz"))
    assert len(intact) >= len(table) and intact.readings().dtype == np.float64


def test_cli_fit_reports_bad_data_without_traceback(tmp_path):
    frame = lot(n=50).astype({"1000:VDD": object})
    frame.loc[2, "1000:VDD"] = "ERR"
    path = write_csv(tmp_path / "bad.csv", frame)
    # trainer/cli.py has no `if __name__ == "__main__"`, so run its main() the way the edge-train script does
    command = [sys.executable, "-c", "import sys; from trainer.cli import main; sys.exit(main())",
               "fit", "--data", path, "--registry", str(tmp_path / "models"), "--unsigned"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    if done.returncode != 0 and ("ImportError" in done.stderr or "ModuleNotFoundError" in done.stderr):
        pytest.skip(f"the CLI cannot start yet: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "TOO_FEW_ROWS" in done.stderr and "bad.csv" in done.stderr and "only 50 rows" in done.stderr
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_edge_train_script_is_installed_and_agrees(tmp_path):
    script = shutil.which("edge-train")
    if script is None:
        pytest.skip("edge-train is not on PATH (pip install -e . not run in this environment)")
    path = write_csv(tmp_path / "tiny.csv", lot(n=20))
    done = subprocess.run([script, "fit", "--data", path, "--data", str(tmp_path / "missing.csv"),
                           "--registry", str(tmp_path / "models"), "--unsigned"], capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0 and ("ImportError" in done.stderr or "ModuleNotFoundError" in done.stderr):
        pytest.skip(f"the CLI cannot start yet: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "missing.csv: no such file" in done.stderr and "only 20 rows" in done.stderr
