"""STDF V4 reader and writer, checked against an independent reader (Semi-ATE-STDF).

The reference table is built from Semi-ATE-STDF's record objects with the STDF rules written out
here (parts framed by PIR/PRR per head and site, RES_SCAL from the first PTR with OPT_FLAG,
TEST_FLG bits 1 and 4 = no result). Real files come from tests/data/stdf (see PROVENANCE.md there);
edge-case files are built in the tests with trainer.stdf_writer.StdfWriter.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("Semi_ATE.STDF")
from Semi_ATE.STDF import records_from_file  # noqa: E402

from edge_agent.errors import DataError  # noqa: E402
from trainer.ingest.stdf import read_stdf  # noqa: E402
from trainer.stdf_writer import StdfWriter, write_stdf  # noqa: E402
from trainer.table import IDENTITY_COLUMNS  # noqa: E402
from trainer.table import TestMeta as Meta  # noqa: E402  (aliases keep pytest from collecting them)
from trainer.table import test_column_name as column_name  # noqa: E402

DATA = Path(__file__).parent / "data" / "stdf"
PREFIX = {15: "f", 12: "p", 9: "n", 6: "u", 3: "m", 2: "%", 0: "", -3: "K", -6: "M", -9: "G", -12: "T"}


# ----------------------------------------------------------------------------------------------
# the independent reference


def _bits(flags: list[str]) -> int:
    """Semi-ATE-STDF gives B*1 fields as a list of '0'/'1', most significant bit first."""
    return int("".join(flags), 2)


def reference(path: str | Path) -> dict:
    """Parts, readings (display units) and test defaults, decoded by Semi-ATE-STDF."""
    parts, open_parts, defaults, names, wafer, pins, mir = [], {}, {}, {}, {}, {}, {}
    for rec in records_from_file(str(path)):
        v = rec.to_dict().get       # (get_value returns the count, not the list, for MPR arrays)
        if rec.id == "MIR":
            mir = {"lot": v("LOT_ID"), "sublot": v("SBLOT_ID"), "tester": v("NODE_NAM") or v("TSTR_TYP"),
                   "job": v("JOB_NAM")}
        elif rec.id == "WIR":
            wafer[v("HEAD_NUM")] = v("WAFER_ID")
        elif rec.id == "PMR":
            pins.setdefault(v("PMR_INDX"), v("LOG_NAM") or v("CHAN_NAM"))
        elif rec.id == "PIR":
            open_parts[(v("HEAD_NUM"), v("SITE_NUM"))] = {"raw": {}, "wafer": wafer.get(v("HEAD_NUM"), "")}
        elif rec.id in ("PTR", "MPR"):
            number, text = v("TEST_NUM"), v("TEST_TXT")
            if text:
                names.setdefault((rec.id, number), text)
            name = text or names.get((rec.id, number), "")
            opt = _bits(v("OPT_FLAG"))
            results = [v("RESULT")] if rec.id == "PTR" else v("RTN_RSLT")
            for position, result in enumerate(results):
                key = (number, name, None if rec.id == "PTR" else position)
                if key not in defaults and _has_opt_flag(v):
                    scale = v("RES_SCAL") if not opt & 0x01 else 0
                    indexes = v("RTN_INDX") if rec.id == "MPR" else []
                    defaults[key] = {
                        "scale": scale, "units": PREFIX[scale] + v("UNITS"),
                        "low": None if opt & 0x50 else _display(v("LO_LIMIT"), scale),
                        "high": None if opt & 0xA0 else _display(v("HI_LIMIT"), scale),
                        "pmr": indexes[position] if position < len(indexes or []) else None}
                part = open_parts.get((v("HEAD_NUM"), v("SITE_NUM")))
                if part is not None and not _bits(v("TEST_FLG")) & 0x12 and not np.isnan(result):
                    part["raw"][key] = result
        elif rec.id == "PRR":
            part = open_parts.pop((v("HEAD_NUM"), v("SITE_NUM")))
            flags = _bits(v("PART_FLG"))
            part.update(head=v("HEAD_NUM"), site=v("SITE_NUM"), hard_bin=v("HARD_BIN"), soft_bin=v("SOFT_BIN"),
                        x=v("X_COORD"), y=v("Y_COORD"), part_id=v("PART_ID"), passed=not flags & 0x08,
                        test_time=v("TEST_T"))
            parts.append(part)
    for part in parts:
        part["readings"] = {key: _display(raw, defaults.get(key, {}).get("scale", 0))
                            for key, raw in part.pop("raw").items()}
    return {"parts": parts, "defaults": defaults, "pins": pins, "mir": mir}


def _has_opt_flag(v) -> bool:
    """Whether the record reaches OPT_FLAG; Semi-ATE fills absent fields with values that look real."""
    fixed = 12 if v("rec_id") == "PTR" else 12 + (v("RTN_ICNT") + 1) // 2 + 4 * v("RSLT_CNT")
    return v("REC_LEN") > fixed + 2 + len(v("TEST_TXT").encode("latin-1")) + len(v("ALARM_ID").encode("latin-1"))


def _display(value: float, scale: int) -> float:
    return float(np.float32(value * 10.0 ** scale)) if scale else float(value)


def _column(key: tuple, ref: dict) -> str:
    number, name, position = key
    if position is None:
        return column_name(number, name)
    pmr = ref["defaults"].get(key, {}).get("pmr")
    return column_name(number, name, ref["pins"].get(pmr, str(pmr)) if pmr is not None else f"#{position}")


def assert_matches_reference(result, ref: dict) -> None:
    """Every part's identity, every reading and every test's limits and units equal the reference."""
    frame, parts = result.table.frame, ref["parts"]
    assert len(frame) == len(parts)
    expected = pd.DataFrame({
        "head": [p["head"] for p in parts], "site": [p["site"] for p in parts],
        "hard_bin": [p["hard_bin"] for p in parts], "soft_bin": [p["soft_bin"] for p in parts],
        "passed": [p["passed"] for p in parts], "wafer": [p["wafer"] for p in parts],
    })
    for column in expected.columns:
        assert frame[column].tolist() == expected[column].tolist(), column
    for axis in ("x", "y"):
        assert frame[axis].tolist() == [pd.NA if p[axis] == -32768 else p[axis] for p in parts], axis
    assert frame["part_id"].fillna("").tolist() == [p["part_id"].strip() for p in parts]
    for column in ("lot", "sublot", "tester", "job"):
        assert set(frame[column]) <= {ref["mir"].get(column, "")}, column

    tests = {t.column: t for t in result.table.tests}
    keys = {key for p in parts for key in p["readings"]} | set(ref["defaults"])
    assert {_column(k, ref) for k in keys} <= set(tests)
    readings = result.table.readings()
    position = {c: i for i, c in enumerate(result.table.test_columns)}
    for i, part in enumerate(parts):
        row = readings[i]
        assert np.count_nonzero(~np.isnan(row)) == len(part["readings"]), f"part {i}"
        for key, value in part["readings"].items():
            assert row[position[_column(key, ref)]] == pytest.approx(value, rel=1e-12, abs=0), (i, key)
    for key, d in ref["defaults"].items():
        meta = tests[_column(key, ref)]
        assert (meta.units, meta.low, meta.high) == (d["units"], d["low"], d["high"]), key


@pytest.fixture(scope="session")
def a595(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("real") / "a595.stdf"
    with gzip.open(DATA / "a595.stdf.gz", "rb") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return path


@pytest.fixture(scope="session")
def a595_reference(a595) -> dict:
    return reference(a595)


# ----------------------------------------------------------------------------------------------
# real files


def test_a595_equals_reference(a595, a595_reference):
    result = read_stdf(DATA / "a595.stdf.gz")
    assert result.problems == []
    assert len(result.table) == 336
    assert len(result.table.tests) == 108
    assert result.table.identity_columns == [c for c in IDENTITY_COLUMNS if c != "timestamp"]
    assert result.stats.parts == 336 and result.stats.results == 31605
    assert_matches_reference(result, a595_reference)
    frame = result.table.frame
    assert sorted(frame["hard_bin"].unique()) == [1, 2, 3, 4]
    assert sorted(frame["wafer"].unique()) == ["02", "03", "09"]
    assert (frame["lot"] == "TEST").all() and (frame["tester"] == "a595-tst").all()
    assert (frame["handler"] == "apm90g1").all()       # SDR HAND_TYP; the file has no HAND_ID


def test_a595_res_scal_gives_display_units(a595_reference):
    tests = {t.column: t for t in read_stdf(DATA / "a595.stdf.gz").table.tests}
    idd = tests["210:IDD_Static <> curr"]            # base units 'a', RES_SCAL 3, C_RESFMT '%6.2f ma'
    assert (idd.units, idd.low, idd.high) == ("ma", 35.0, 55.0)
    assert tests["700:" + next(t.name for t in tests.values() if t.number == 700)].units == "ns"


def test_d10_final_test_equals_reference():
    path = DATA / "d10_final_test.std"
    result = read_stdf(path)
    assert result.problems == []
    assert len(result.table) == 22 and len(result.table.tests) == 26
    ref = reference(path)
    assert_matches_reference(result, ref)
    frame = result.table.frame
    assert frame["x"].isna().all() and frame["y"].isna().all()     # final test: no die coordinates
    assert frame["test_time_ms"].tolist() == [float(p["test_time"]) for p in ref["parts"]]
    assert sorted(frame["site"].unique()) == [0, 1] and not frame["passed"].any()
    assert (frame["retest"] == 0).all()


def test_compressed_files_read_like_plain(a595, tmp_path):
    plain = read_stdf(a595)
    raw = a595.read_bytes()
    for suffix, compress in ((".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress)):
        path = tmp_path / f"a595.stdf{suffix}"
        path.write_bytes(compress(raw))
        packed = read_stdf(path)
        assert packed.problems == []
        pd.testing.assert_frame_equal(packed.table.frame, plain.table.frame)
        assert packed.table.tests == plain.table.tests
        assert packed.stats.bytes == len(raw)


def test_big_endian_equals_little_endian(a595, a595_reference, tmp_path):
    """a595 is big-endian; re-written little-endian by our writer it must read the same."""
    table = read_stdf(a595).table
    tests = [Meta(t.column, t.name, t.number, t.units, t.low, t.high) for t in table.tests]
    for order in "<>":
        path = tmp_path / f"a595{order == '>'}.stdf"
        write_stdf(path, table, tests, byte_order=order)
        assert path.read_bytes()[4] == (1 if order == ">" else 2)        # FAR CPU_TYP
        again = read_stdf(path)
        pd.testing.assert_frame_equal(again.table.frame, table.frame, check_exact=True)
        assert again.table.tests == table.tests
    assert_matches_reference(read_stdf(path), reference(path))


# ----------------------------------------------------------------------------------------------
# edge cases built with the writer


def _lot(n: int = 40, n_tests: int = 6, seed: int = 0) -> tuple[pd.DataFrame, list[Meta]]:
    rng = np.random.default_rng(seed)
    tests = [Meta(f"{100 + i}:T{i}", f"T{i}", 100 + i, "V", -2.0, 2.0) for i in range(n_tests)]
    frame = pd.DataFrame({"lot": "L7", "wafer": np.repeat(["W1", "W2"], n // 2), "x": np.arange(n) % 7,
                          "y": np.arange(n) // 7, "part_id": [f"P{i}" for i in range(n)],
                          "hard_bin": rng.integers(1, 4, n), "soft_bin": rng.integers(1, 9, n),
                          "passed": rng.random(n) > 0.2, "tester": "TST", "job": "JOB"})
    values = rng.normal(size=(n, n_tests)).astype(np.float32)
    values[rng.random((n, n_tests)) < 0.1] = np.nan                          # tests not run
    return pd.concat([frame, pd.DataFrame(values, columns=[t.column for t in tests])], axis=1), tests


def _records(data: bytes, order: str) -> list[tuple[int, int, int, int]]:
    """(offset, REC_LEN, REC_TYP, REC_SUB) of every record, walking the headers."""
    out, pos = [], 0
    while pos + 4 <= len(data):
        length, typ, sub = struct.unpack_from(order + "HBB", data, pos)
        out.append((pos, length, typ, sub))
        pos += 4 + length
    return out


def test_multi_site_interleaving_by_writer(tmp_path):
    frame, tests = _lot(n=48)
    path = tmp_path / "quad.stdf"
    write_stdf(path, frame, tests, sites_per_touchdown=4)
    kinds = [(typ, sub) for _, _, typ, sub in _records(path.read_bytes(), "<")]
    first_ptr = kinds.index((15, 10))
    assert kinds[first_ptr - 4:first_ptr] == [(5, 10)] * 4                   # 4 PIRs, then interleaved PTRs
    result = read_stdf(path)
    assert_matches_reference(result, reference(path))
    assert result.table.frame["site"].tolist() == [1, 2, 3, 4] * 12
    expected = frame[[t.column for t in tests]].to_numpy(np.float64)
    np.testing.assert_array_equal(result.table.readings(), expected)


def test_multi_site_parts_finish_out_of_order(tmp_path):
    path = tmp_path / "scrambled.stdf"
    with open(path, "wb") as f:
        w = StdfWriter(f)
        w.far(), w.mir(lot="L"), w.wir("W")
        w.pir(1, 1), w.pir(1, 2)
        w.ptr(1, "A", 1.0, site=2, defaults=True), w.ptr(1, "A", 2.0, site=1, defaults=True)
        w.prr(1, 2, x=2, y=0, part_id="two")                                  # site 2 finishes first
        w.pir(1, 2)                                                            # and starts a new part
        w.ptr(1, "A", 3.0, site=2), w.ptr(2, "B", 4.0, site=1, defaults=True)
        w.prr(1, 1, x=1, y=0, part_id="one", passed=False, hard_bin=5)
        w.prr(1, 2, x=3, y=0, part_id="three")
        w.mrr()
    result = read_stdf(path)
    assert result.problems == []
    frame = result.table.frame
    assert frame["part_id"].tolist() == ["two", "one", "three"]               # rows in PRR order
    assert frame["1:A"].tolist() == [1.0, 2.0, 3.0]
    assert frame["2:B"].fillna(-1).tolist() == [-1, 4.0, -1]
    assert frame["passed"].tolist() == [True, False, True] and frame["hard_bin"].tolist() == [1, 5, 1]
    assert_matches_reference(result, reference(path))


def _good_file(tmp_path) -> tuple[Path, pd.DataFrame, list[Meta]]:
    frame, tests = _lot(n=30)
    path = tmp_path / "good.stdf"
    write_stdf(path, frame, tests, sites_per_touchdown=2)
    return path, frame, tests


def _parts_before(data: bytes, offset: int) -> int:
    return sum(1 for pos, _, typ, sub in _records(data, "<") if (typ, sub) == (5, 20) and pos < offset)


def test_truncated_file_keeps_parts_before_the_damage(tmp_path):
    path, _, _ = _good_file(tmp_path)
    data = path.read_bytes()
    ptrs = [pos for pos, _, typ, sub in _records(data, "<") if (typ, sub) == (15, 10)]
    cut = ptrs[len(ptrs) // 2]
    damaged = tmp_path / "cut.stdf"
    damaged.write_bytes(data[:cut + 9])                                       # inside a PTR
    result = read_stdf(damaged)
    full = read_stdf(path).table.frame
    kept = _parts_before(data, cut)
    assert 0 < kept == len(result.table) < len(full)
    pd.testing.assert_frame_equal(result.table.frame, full.iloc[:kept])
    assert any(f"byte offset {cut:,}, record PTR" in p and "truncated" in p for p in result.problems), \
        result.problems
    assert any(f"kept {kept} parts" in p for p in result.problems)


def test_truncated_inside_a_header_and_cut_compressed_stream(tmp_path):
    path, _, _ = _good_file(tmp_path)
    data = path.read_bytes()
    prrs = [pos for pos, _, typ, sub in _records(data, "<") if (typ, sub) == (5, 20)]
    damaged = tmp_path / "header.stdf"
    damaged.write_bytes(data[:prrs[5] + 2])
    result = read_stdf(damaged)
    assert len(result.table) == 5
    assert any(f"byte offset {prrs[5]:,}" in p and "inside a record header" in p for p in result.problems)

    packed = tmp_path / "cut.stdf.gz"
    packed.write_bytes(gzip.compress(data)[: len(gzip.compress(data)) // 2])
    result = read_stdf(packed)
    assert 0 < len(result.table) < 30
    assert any("compressed stream is damaged" in p for p in result.problems)
    pd.testing.assert_frame_equal(result.table.frame, read_stdf(path).table.frame.iloc[:len(result.table)])


@pytest.mark.parametrize("delta", [7, 3000])
def test_corrupt_record_length(tmp_path, delta):
    """A PTR whose REC_LEN is too long: parts before it are kept, a problem names where reading stopped."""
    path, _, _ = _good_file(tmp_path)
    data = bytearray(path.read_bytes())
    ptrs = [(pos, length) for pos, length, typ, sub in _records(bytes(data), "<") if (typ, sub) == (15, 10)]
    bad, length = ptrs[len(ptrs) // 3]
    struct.pack_into("<H", data, bad, length + delta)
    damaged = tmp_path / "corrupt.stdf"
    damaged.write_bytes(bytes(data))
    result = read_stdf(damaged)
    full = read_stdf(path).table.frame
    kept = _parts_before(bytes(data), bad)
    assert len(result.table) == kept
    pd.testing.assert_frame_equal(result.table.frame, full.iloc[:kept])
    offsets = [int(m.group(1).replace(",", "")) for m in map(re.compile(r"^byte offset ([\d,]+)").match,
                                                               result.problems) if m]
    assert offsets and offsets[0] >= bad, result.problems


def test_corrupt_text_length_is_named(tmp_path):
    path = tmp_path / "text.stdf"
    with open(path, "wb") as f:
        w = StdfWriter(f)
        w.far(), w.mir(lot="L")
        for i in range(3):
            w.pir(1, 1), w.ptr(1, "A", float(i), defaults=i == 0), w.prr(1, 1, part_id=str(i))
        w.pir(1, 1)
        bad = w.record(15, 10, struct.pack("<IBBBBf", 1, 1, 1, 0, 0, 9.0) + bytes([200]) + b"A")
        w.prr(1, 1, part_id="3"), w.mrr()
    result = read_stdf(path)
    assert len(result.table) == 3
    assert any(f"byte offset {bad:,}, record PTR: a text field's length runs past" in p for p in result.problems)


def test_unknown_record_types_are_skipped(tmp_path):
    frame, tests = _lot(n=10)
    clean, dirty = tmp_path / "clean.stdf", tmp_path / "dirty.stdf"
    write_stdf(clean, frame, tests)
    data = clean.read_bytes()
    records = _records(data, "<")
    out, inserted = bytearray(), []
    for i, (pos, length, typ, sub) in enumerate(records):
        if (typ, sub) in ((5, 10), (15, 10)) and i % 3 == 0:                 # before PIRs and inside parts
            inserted.append(len(out))
            out += struct.pack("<HBB", 5, 99, 7) + b"vendr"
        out += data[pos:pos + 4 + length]
    dirty.write_bytes(bytes(out))
    result = read_stdf(dirty)
    pd.testing.assert_frame_equal(result.table.frame, read_stdf(clean).table.frame)
    assert result.problems == [f"skipped {len(inserted)} records of unknown type (99, 7), "
                               f"the first at byte offset {inserted[0]:,}"]


def test_missing_limits_and_carried_forward_defaults(tmp_path):
    path = tmp_path / "limits.stdf"
    with open(path, "wb") as f:
        w = StdfWriter(f)
        w.far(), w.mir(lot="L")
        for i in range(3):
            w.pir(1, 1)
            w.ptr(1, "no_low", 1.0 + i, defaults=i == 0, high=5.0, units="V")
            w.ptr(2, "no_limits", 2.0 + i, defaults=i == 0, units="V")
            w.ptr(3, "never_defaults", 3.0 + i)                                # no OPT_FLAG ever
            w.ptr(4, "late_defaults", 4.0 + i, defaults=i == 1, low=0.5, high=9.0, units="A")
            w.ptr(5, "", 6.0 + i) if i else w.ptr(5, "named_once", 6.0, defaults=True, low=1.0, high=2.0)
            w.prr(1, 1, x=i, y=0)
        w.mrr()
    result = read_stdf(path)
    tests = {t.name: t for t in result.table.tests}
    assert (tests["no_low"].low, tests["no_low"].high) == (None, 5.0)
    assert (tests["no_limits"].low, tests["no_limits"].high, tests["no_limits"].units) == (None, None, "V")
    assert (tests["never_defaults"].low, tests["never_defaults"].units) == (None, "")
    assert (tests["late_defaults"].low, tests["late_defaults"].high, tests["late_defaults"].units) == (0.5, 9.0, "A")
    assert list(tests) == ["no_low", "no_limits", "never_defaults", "late_defaults", "named_once"]
    assert result.table.frame["5:named_once"].tolist() == [6.0, 7.0, 8.0]     # empty TEST_TXT -> same test
    assert_matches_reference(result, reference(path))


def test_retests_are_counted(tmp_path):
    frame, tests = _lot(n=12)
    frame.loc[5, ["wafer", "x", "y"]] = frame.loc[2, ["wafer", "x", "y"]].to_numpy()
    frame.loc[9, ["wafer", "x", "y"]] = frame.loc[2, ["wafer", "x", "y"]].to_numpy()
    path = tmp_path / "retest.stdf"
    write_stdf(path, frame, tests)
    retest = read_stdf(path).table.frame["retest"]
    assert retest[2] == 0 and retest[5] == 1 and retest[9] == 2
    assert retest.drop([5, 9]).eq(0).all()

    final = frame.drop(columns=["x", "y", "wafer"]).assign(part_id=["A", "B", "A"] * 4, retest=0)
    write_stdf(path, final, tests)
    frame = read_stdf(path).table.frame
    assert frame["x"].isna().all()                                         # so part ids identify parts
    assert frame.loc[frame["part_id"] == "A", "retest"].tolist() == list(range(8))
    assert frame.loc[frame["part_id"] == "B", "retest"].tolist() == list(range(4))


def test_supersede_flag_marks_a_retest(tmp_path):
    path = tmp_path / "flag.stdf"
    with open(path, "wb") as f:
        w = StdfWriter(f)
        w.far(), w.mir(lot="L")
        w.pir(1, 1), w.prr(1, 1, part_id="new", x=1, y=1, part_flg=0x02)       # supersedes an earlier x, y
        w.mrr()
    assert read_stdf(path).table.frame["retest"].tolist() == [1]


def test_mpr_gives_one_column_per_pin(tmp_path):
    path = tmp_path / "mpr.stdf"
    with open(path, "wb") as f:
        w = StdfWriter(f)
        w.far(), w.mir(lot="L")
        for index, pin in ((11, "DQ0"), (12, "DQ1"), (13, "DQ2")):
            w.pmr(index, pin)
        for i in range(4):
            w.pir(1, 1)
            if i == 0:
                w.mpr(7, "leak", [1e-6, 2e-6, 3e-6], pin_indexes=[11, 12, 13], low=-5e-6, high=5e-6, units="A",
                      scale=6)
            else:
                w.mpr(7, "leak", [1e-6 * i, 2e-6 * i, 3e-6 * i], test_flg=0x10 if i == 2 else 0)
            w.ptr(8, "vdd", 1.2, defaults=i == 0, units="V")
            w.prr(1, 1, x=i, y=0)
        w.mrr()
    result = read_stdf(path)
    assert result.problems == []
    columns = result.table.test_columns
    assert columns == ["7:leak@DQ0", "7:leak@DQ1", "7:leak@DQ2", "8:vdd"]
    pins = {t.column: t for t in result.table.tests}
    assert (pins["7:leak@DQ1"].pin, pins["7:leak@DQ1"].units, pins["7:leak@DQ1"].low) == ("DQ1", "uA", -5.0)
    leak = result.table.frame["7:leak@DQ2"]
    assert leak[0] == pytest.approx(3.0) and np.isnan(leak[2]) and leak[3] == pytest.approx(9.0)
    assert_matches_reference(result, reference(path))


def test_test_flg_invalid_or_not_executed_is_missing(tmp_path):
    path = tmp_path / "flags.stdf"
    with open(path, "wb") as f:
        w = StdfWriter(f)
        w.far(), w.mir(lot="L")
        for i, flag in enumerate((0x00, 0x02, 0x10, 0x80, 0x04)):  # ok, invalid, not executed, failed, unreliable
            w.pir(1, 1), w.ptr(1, "A", 10.0 + i, test_flg=flag, defaults=i == 0), w.prr(1, 1, x=i, y=0)
        w.mrr()
    values = read_stdf(path).table.frame["1:A"].tolist()
    assert values[0] == 10.0 and np.isnan(values[1]) and np.isnan(values[2])
    assert values[3] == 13.0 and values[4] == 14.0


def test_res_scal_applied_only_where_valid(tmp_path):
    path = tmp_path / "scal.stdf"
    with open(path, "wb") as f:
        w = StdfWriter(f)
        w.far(), w.mir(lot="L")
        w.pir(1, 1)
        w.ptr(1, "milli", 0.0123, defaults=True, low=0.01, high=0.02, units="A", scale=3)
        w.ptr(2, "kilo", 4700.0, defaults=True, low=1000.0, units="Ohm", scale=-3)
        w.ptr(3, "invalid_scale", 0.5, defaults=True, units="V", scale=6, opt_flag=0x0E | 0x01 | 0xC0)
        w.ptr(4, "nano", 4.2e-7, defaults=True, low=4e-7, high=5e-7, units="s", scale=9)
        w.prr(1, 1, x=0, y=0)
        w.mrr()
    result = read_stdf(path)
    tests = {t.name: t for t in result.table.tests}
    row = result.table.frame.iloc[0]
    assert row["1:milli"] == pytest.approx(12.3, rel=1e-6) and tests["milli"].units == "mA"
    assert (tests["milli"].low, tests["milli"].high) == (10.0, 20.0)
    assert row["2:kilo"] == pytest.approx(4.7, rel=1e-6) and tests["kilo"].units == "KOhm"
    assert tests["kilo"].low == 1.0 and tests["kilo"].high is None
    assert row["3:invalid_scale"] == 0.5 and tests["invalid_scale"].units == "V"
    assert row["4:nano"] == pytest.approx(420.0, rel=1e-6) and tests["nano"].units == "ns"
    assert_matches_reference(result, reference(path))


# ----------------------------------------------------------------------------------------------
# refusals and odd structure


@pytest.mark.parametrize("content, words", [
    (b"", "an empty file"),
    (b"lot,wafer,x,y\nL1,1,2,3\n", "does not start with a FAR"),
    (b"\x89PNG\r\n\x1a\n" + bytes(32), "does not start with a FAR"),
    (b"\x02\x00\x00\x0a\x00\x04", "CPU_TYP"),
    (b"\x02\x00\x00\x0a\x02\x03", "STDF version"),
])
def test_non_stdf_is_refused(tmp_path, content, words):
    path = tmp_path / "input.stdf"
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        read_stdf(path)
    assert words in str(error.value) and str(path) in str(error.value)
    assert error.value.file == str(path)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_stdf(tmp_path / "absent.stdf")


def test_stray_records_and_open_parts_are_reported(tmp_path):
    path = tmp_path / "stray.stdf"
    with open(path, "wb") as f:
        w = StdfWriter(f)
        w.far(), w.mir(lot="L")
        w.ptr(1, "A", 9.0, site=3, defaults=True)                             # outside any part
        w.prr(1, 2)                                                            # no PIR
        w.pir(1, 1), w.ptr(1, "A", 1.0), w.prr(1, 1, part_id="ok")
        w.pir(1, 1), w.ptr(1, "A", 2.0)                                        # never finished
        w.mrr()
    result = read_stdf(path)
    assert result.table.frame["part_id"].tolist() == ["ok"]
    text = " | ".join(result.problems)
    assert "1 valid PTR/MPR results lie outside any PIR/PRR" in text
    assert "1 PRRs have no open PIR" in text
    assert "1 parts have a PIR but no PRR" in text


def test_second_far_stops_reading(tmp_path):
    path, _, _ = _good_file(tmp_path)
    data = path.read_bytes()
    joined = tmp_path / "joined.stdf"
    joined.write_bytes(data + data)
    result = read_stdf(joined)
    assert len(result.table) == 30
    assert any(f"byte offset {len(data):,}, record FAR: a second FAR" in p for p in result.problems)


def test_writer_streams_chunks(tmp_path):
    frame, tests = _lot(n=20)
    path = tmp_path / "chunks.stdf.gz"
    written = write_stdf(path, (frame.iloc[i:i + 7] for i in range(0, 20, 7)), tests)
    assert written.parts == 20
    assert written.results == int(frame[[t.column for t in tests]].notna().to_numpy().sum())
    result = read_stdf(path)
    np.testing.assert_array_equal(result.table.readings(), frame[[t.column for t in tests]].to_numpy(np.float64))
    for column in ("wafer", "passed", "part_id", "hard_bin", "soft_bin"):
        assert result.table.frame[column].tolist() == frame[column].tolist(), column


def test_writer_pin_tests_become_mpr_or_named_ptrs(tmp_path):
    """Pins sharing limits -> one MPR (PMR names the pins); pins with their own limits -> PTRs "name@pin"."""
    rng = np.random.default_rng(3)
    tests = ([Meta(f"5:IDD@P{i}", "IDD", 5, "uA", None, 4.0, f"P{i}") for i in range(3)]
             + [Meta(f"6:CONT@P{i}", "CONT", 6, "V", -0.7 - i / 100, -0.5, f"P{i}") for i in range(2)]
             + [Meta("7:VOH", "VOH", 7, "V", 2.4, None)])
    frame = pd.DataFrame(rng.normal(size=(9, len(tests))).astype(np.float32), columns=[t.column for t in tests])
    frame.iloc[4, 1] = np.nan                                                 # one pin of the MPR missing
    frame.iloc[5, :3] = np.nan                                                # the whole MPR missing
    path = tmp_path / "pins.stdf"
    write_stdf(path, frame.assign(x=np.arange(9), y=0), tests)
    kinds = [(typ, sub) for _, _, typ, sub in _records(path.read_bytes(), "<")]
    assert kinds.count((15, 15)) == 8 and kinds.count((1, 60)) == 3          # 8 MPRs (one part has none), 3 PMRs
    result = read_stdf(path)
    assert result.table.test_columns == [t.column for t in tests]
    np.testing.assert_array_equal(result.table.readings(), frame.to_numpy(np.float64))
    meta = {t.column: t for t in result.table.tests}
    assert (meta["5:IDD@P1"].name, meta["5:IDD@P1"].pin, meta["5:IDD@P1"].high) == ("IDD", "P1", 4.0)
    assert (meta["6:CONT@P1"].name, meta["6:CONT@P1"].pin) == ("CONT@P1", None)
    assert meta["6:CONT@P1"].low == pytest.approx(-0.71, rel=1e-6)
    assert_matches_reference(result, reference(path))


def test_writer_refuses_a_second_lot_and_leaves_no_file(tmp_path):
    frame, tests = _lot(n=10)
    frame.loc[6:, "lot"] = "L8"
    path = tmp_path / "two_lots.stdf"
    with pytest.raises(DataError, match="one lot"):
        write_stdf(path, (frame.iloc[i:i + 5] for i in (0, 5)), tests)
    assert list(tmp_path.iterdir()) == []


def test_damaged_bytes_never_escape_as_raw_errors(tmp_path):
    """Random byte flips, cuts and insertions: a result with problems, or a DataError; nothing else."""
    path, _, _ = _good_file(tmp_path)
    good = path.read_bytes()
    rng = np.random.default_rng(11)
    damaged = tmp_path / "fuzz.stdf"
    outcomes = {"read": 0, "refused": 0}
    for _ in range(150):
        data = bytearray(good)
        for _ in range(int(rng.integers(1, 6))):
            at, size = int(rng.integers(0, len(data))), int(rng.integers(1, 40))
            choice = rng.integers(0, 3)
            if choice == 0:
                data[at] = int(rng.integers(0, 256))
            elif choice == 1:
                del data[at:at + size]
            else:
                data[at:at] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        damaged.write_bytes(bytes(data))
        try:
            result = read_stdf(damaged)
        except DataError:
            outcomes["refused"] += 1
            continue
        outcomes["read"] += 1
        assert len(result.table) <= 40
    assert outcomes["read"] > 100


def test_synthetic_floor_written_one_file_per_lot(tmp_path):
    """trainer.synth's chunks (two lots, 4 sites, per-pin tests) -> one STDF per lot -> the same table."""
    from trainer import synth
    from trainer.stdf_writer import write_stdf_lots
    config = synth.SynthConfig(parts=600, tests=60, lots=2, seed=5)
    tests = synth.test_catalog(config)
    frame = pd.concat(list(synth.generate(config, chunk_parts=250)), ignore_index=True)
    written = write_stdf_lots(tmp_path / "{lot}.stdf", synth.generate(config, chunk_parts=250), tests,
                              sites_per_touchdown=config.sites)
    assert [w.lot for w in written] == config.lot_names()
    columns = [t.column for t in tests]
    for w in written:
        expected = frame[frame["lot"] == w.lot].reset_index(drop=True)
        table = read_stdf(w.path).table
        assert table.test_columns == columns
        np.testing.assert_array_equal(table.readings(), expected[columns].to_numpy(np.float32).astype(np.float64))
        for column in ("wafer", "x", "y", "site", "part_id", "hard_bin", "soft_bin", "passed", "tester", "job"):
            assert table.frame[column].astype(object).tolist() == expected[column].astype(object).tolist(), column
        limits = {t.column: (t.low, t.high) for t in table.tests}
        for t in tests:                                          # limits come back as R*4
            assert limits[t.column] == tuple(None if v is None else float(np.float32(v)) for v in (t.low, t.high))
