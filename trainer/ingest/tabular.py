"""CSV and Parquet readers: a file in the format described in docs/data.md -> ParametricTable.

Column names are matched to identity and label columns case-insensitively and through a few
common aliases (``ALIASES``); every other column is a test. Test metadata comes from the
Parquet schema metadata or the CSV metadata rows, else from "number:name" column names.
"""
from __future__ import annotations

import csv
import gzip
import re
from typing import Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from edge_agent.errors import DataError

from ..table import IDENTITY_COLUMNS, LABEL_COLUMNS, PARQUET_METADATA_KEY, ParametricTable, TestMeta, finite_or_none
from ..validate import EXAMPLES, MISSING_TOKENS, Finding, clean_tests

ALIASES = {
    "lot_id": "lot", "lotid": "lot", "sublot_id": "sublot", "wafer_id": "wafer", "waferid": "wafer",
    "x_coord": "x", "die_x": "x", "y_coord": "y", "die_y": "y", "head_num": "head", "site_num": "site",
    "partid": "part_id", "hbin": "hard_bin", "sbin": "soft_bin",
}
CSV_METADATA_ROWS = ("#test_number", "#units", "#low_limit", "#high_limit")
TRUE_TOKENS = frozenset({"true", "t", "1", "1.0", "yes", "y", "pass", "p"})
FALSE_TOKENS = frozenset({"false", "f", "0", "0.0", "no", "n", "fail"})
_NUMBERED = re.compile(r"^\s*(\d+)\s*:\s*(.+?)\s*$")


def read_csv(path: str, set_aside: Sequence[str] = ()) -> tuple[ParametricTable, list[Finding]]:
    """Read a CSV (or .csv.gz); rows with the wrong number of fields are fatal and listed by line. Columns in
    ``set_aside`` are read as text and kept out of the tests (trainer.ingest.read_table)."""
    header, metadata_rows = _peek_csv(path)
    findings: list[Finding] = []
    declared = _csv_metadata(path, header, metadata_rows, findings)
    bad_rows: list[str] = []

    def refuse(row) -> str:
        bad_rows.append(f"line {row.number}: {row.actual_columns} fields")
        return "skip"

    text_columns = {name: pa.string() for name in header
                    if _canonical(name) in LABEL_COLUMNS or IDENTITY_COLUMNS.get(_canonical(name) or "") == "str"
                    or (name in set_aside and _canonical(name) is None)}
    try:
        arrow = pa_csv.read_csv(
            path,
            # single-threaded: only then does pyarrow report the line number of a broken row
            read_options=pa_csv.ReadOptions(use_threads=False, skip_rows_after_names=len(metadata_rows)),
            parse_options=pa_csv.ParseOptions(invalid_row_handler=refuse),
            convert_options=pa_csv.ConvertOptions(column_types=text_columns, strings_can_be_null=True))
    except (pa.ArrowException, OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read as CSV: {_first_line(error)}", file=path) from None
    if bad_rows:
        raise DataError(f"{len(bad_rows)} rows do not have the header's {len(header)} fields: "
                        + "; ".join(bad_rows[:EXAMPLES]) + (" ..." if len(bad_rows) > EXAMPLES else ""),
                        file=path)
    first_data_line = 2 + len(metadata_rows)
    # Line numbers assume one physical line per row (no blank lines or quoted line breaks before the row).
    return _build(arrow.to_pandas(), path, declared, lambda i: f"line {first_data_line + i}", findings, set_aside)


def read_parquet(path: str, set_aside: Sequence[str] = ()) -> tuple[ParametricTable, list[Finding]]:
    """Read a Parquet file; test metadata from the schema metadata key if present; ``set_aside`` as for CSV."""
    try:
        arrow = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"not a readable Parquet file: {_first_line(error)}", file=path) from None
    findings: list[Finding] = []
    declared: dict[str, TestMeta] = {}
    raw = (arrow.schema.metadata or {}).get(PARQUET_METADATA_KEY)
    if raw is not None:
        try:
            declared = {t.column: t for t in ParametricTable.tests_from_json(raw)}
        except (ValueError, TypeError, AttributeError) as error:
            findings.append(Finding.at("warning", "BAD_METADATA",
                                       f"test metadata under {PARQUET_METADATA_KEY.decode()} is unusable "
                                       f"({_first_line(error)}); tests inferred from column names", files=path))
    try:
        frame = arrow.to_pandas(ignore_metadata=True)
    except (pa.ArrowException, TypeError, ValueError) as error:
        raise DataError(f"Parquet columns cannot be converted: {_first_line(error)}", file=path) from None
    frame = frame.drop(columns=[c for c in frame.columns if str(c).startswith("__index_level_")])
    return _build(frame, path, declared, lambda i: f"row {i + 1}", findings, set_aside)


def _peek_csv(path: str) -> tuple[list[str], list[list[str]]]:
    """Header and the metadata rows right after it."""
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            metadata_rows = []
            for row in reader:
                if len(metadata_rows) == len(CSV_METADATA_ROWS) or not row or row[0].strip() not in CSV_METADATA_ROWS:
                    break
                metadata_rows.append(row)
    except (OSError, UnicodeDecodeError, csv.Error, EOFError) as error:
        raise DataError(f"cannot read as CSV: {_first_line(error)}", file=path) from None
    if not header or not any(cell.strip() for cell in header):
        raise DataError("empty file: no header row", file=path)
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DataError(f"duplicate column names {duplicates}", file=path)
    return header, metadata_rows


def _csv_metadata(path: str, header: list[str], rows: list[list[str]], findings: list[Finding]) -> dict[str, TestMeta]:
    """TestMeta for the test columns named in the CSV metadata rows; bad values become findings."""
    if not rows:
        return {}
    values: dict[str, dict[str, tuple[str, int]]] = {}  # column -> marker -> (cell, line)
    for line, row in enumerate(rows, start=2):
        marker = row[0].strip()
        for position, name in enumerate(header[1:], start=1):
            cell = row[position].strip() if position < len(row) else ""
            if cell and _canonical(name) is None:
                values.setdefault(name, {})[marker] = (cell, line)
    declared = {}
    for name, given in values.items():
        inferred = _infer_meta(name)
        fields = {"units": given.get("#units", ("", 0))[0]}
        for marker, attr, convert in (("#test_number", "number", _as_int), ("#low_limit", "low", _as_float),
                                      ("#high_limit", "high", _as_float)):
            if marker not in given:
                continue
            cell, line = given[marker]
            try:
                fields[attr] = convert(cell)
            except ValueError:
                findings.append(Finding.at("warning", "BAD_METADATA",
                                           f"{marker} on line {line} is {cell!r}, not a number; ignored",
                                           files=path, column=name, count=1))
        declared[name] = TestMeta(column=name, name=inferred.name, number=fields.get("number", inferred.number),
                                  units=fields["units"], low=fields.get("low"), high=fields.get("high"),
                                  pin=inferred.pin)
    return declared


def _as_int(text: str) -> int:
    value = float(text)
    if not value.is_integer():
        raise ValueError(text)
    return int(value)


def _as_float(text: str) -> float | None:
    return finite_or_none(float(text))


def _canonical(name: str) -> str | None:
    """The identity or label column ``name`` stands for, or None for a test column."""
    key = str(name).strip().lower().replace(" ", "_").replace("-", "_")
    key = ALIASES.get(key, key)
    return key if key in IDENTITY_COLUMNS or key in LABEL_COLUMNS else None


def _infer_meta(column: str) -> TestMeta:
    """"1000:VDD" -> number 1000, name VDD; "1000:IDDQ@P12" also pin P12; anything else is just a name."""
    match = _NUMBERED.match(column)
    if match is None:
        return TestMeta(column=column, name=column)
    name, pin = match.group(2), None
    if "@" in name:
        name, pin = name.rsplit("@", 1)
    return TestMeta(column=column, name=name, number=int(match.group(1)), pin=pin)


def _build(frame: pd.DataFrame, path: str, declared: dict[str, TestMeta], row_name, findings: list[Finding],
           set_aside: Sequence[str]) -> tuple[ParametricTable, list[Finding]]:
    """Rename identity/label columns, give them their types, take test metadata, clean the tests."""
    renames = {column: _canonical(column) for column in frame.columns if _canonical(column)}
    targets = list(renames.values())
    clashes = sorted({t for t in targets if targets.count(t) > 1})
    if clashes:
        raise DataError("several columns stand for the same identity column: "
                        + "; ".join(f"{t} <- {[c for c, v in renames.items() if v == t]}" for t in clashes), file=path)
    frame = frame.rename(columns=renames)
    for column in targets:
        frame[column] = _typed(frame[column], column, path, row_name, findings)
    aside = [c for c in frame.columns if c in set_aside and c not in renames.values()]
    tests = [declared.get(c) or _infer_meta(c) for c in frame.columns if c not in renames.values() and c not in aside]
    frame, tests, test_findings = clean_tests(frame, tests, path, row_name)
    findings += test_findings
    if len(frame) == 0:
        findings.append(Finding.at("warning", "NO_ROWS", "the file has a header but no data rows", files=path,
                                   count=0))
    order = ([c for c in IDENTITY_COLUMNS if c in frame.columns] + [c for c in LABEL_COLUMNS if c in frame.columns]
             + aside)
    return ParametricTable(frame[order + [t.column for t in tests]].reset_index(drop=True), tests, [path]), findings


def _typed(column: pd.Series, name: str, path: str, row_name, findings: list[Finding]) -> pd.Series:
    """An identity or label column in its type; unreadable values become missing and a BAD_VALUE finding.

    ``final_pass`` is a number where every value is one, else kept as text: a label coded -1/1 or PASS/FAIL is
    mapped (or refused, naming its values) by trainer.labels, never half turned into missing cells here."""
    if name == "final_pass":
        numbers = pd.to_numeric(column, errors="coerce")
        return numbers if numbers.notna().sum() == column.notna().sum() else column
    kind = IDENTITY_COLUMNS.get(name, "str")
    if kind == "str":
        text = column.astype(object).where(column.notna(), None)
        text = text.map(lambda v: v if v is None else (str(int(v)) if isinstance(v, float) and v.is_integer()
                                                        else str(v)))
        return text.fillna("") if name == "truth_excursion" else text
    raw = column.astype(object).where(column.notna(), "").astype(str).str.strip()
    present = ~raw.str.lower().isin(MISSING_TOKENS)
    if kind == "bool":
        lowered = raw.str.lower()
        values = pd.Series(pd.NA, index=column.index, dtype=object)
        values[lowered.isin(TRUE_TOKENS)] = True
        values[lowered.isin(FALSE_TOKENS)] = False
        bad = present & values.isna()
        result = values if values.isna().any() else values.astype(bool)
    else:
        result = pd.to_numeric(raw.where(present, ""), errors="coerce")
        bad = present & result.isna()
        if kind == "int" and not result.isna().any() and (result == result.round()).all():
            result = result.astype("int64")
    if bad.any():
        examples = ", ".join(f"{raw.iloc[i]!r} at {row_name(i)}" for i in bad.to_numpy().nonzero()[0][:EXAMPLES])
        findings.append(Finding.at("warning", "BAD_VALUE",
                                   f"{int(bad.sum())} values are not {'pass/fail flags' if kind == 'bool' else 'numbers'}"
                                   f" (e.g. {examples}); treated as missing",
                                   files=path, column=name, count=int(bad.sum())))
    return result


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]



def use_time_column(table: ParametricTable, column: str) -> ParametricTable:
    """The table with ``column`` (set aside when read: ISO times or unix seconds, under the file's own name) as the
    parts' ``timestamp``; DataError naming the column and the values that are neither."""
    if column not in table.frame.columns:
        raise DataError("the time column is missing", column=column, expected="a column of the data",
                        got="no such column")
    if column != "timestamp" and "timestamp" in table.frame.columns:
        raise DataError("the data has a timestamp column already", column=column,
                        expected="--time-column naming the only time column", got="timestamp and " + column)
    raw = table.frame[column]
    seconds = pd.to_numeric(raw, errors="coerce")
    if seconds.notna().sum() < raw.notna().sum():
        parsed = pd.to_datetime(raw, errors="coerce", utc=True)
        seconds = (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    bad = raw.notna() & seconds.isna()
    if bad.any():
        shown = ", ".join(repr(v) for v in raw[bad].head(EXAMPLES))
        raise DataError(f"{int(bad.sum())} values are neither times nor numbers", column=column,
                        expected="ISO times (2008-07-19 11:55:00) or unix seconds", got=shown)
    frame = table.frame.drop(columns=[column]).assign(timestamp=seconds.to_numpy(float))
    return ParametricTable(frame, table.tests, table.sources)
