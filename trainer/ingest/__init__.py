"""Reading training data: one file -> ParametricTable (``read_table``); many files -> one validated table (``load_tables``)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from edge_agent.errors import DataError

from ..table import ParametricTable
from ..validate import Finding, ValidationReport, check_readings_share, check_retest_policy, clean_tests, validate

CSV_SUFFIXES = (".csv", ".csv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
STDF_SUFFIXES = tuple(base + packed for base in (".stdf", ".std") for packed in ("", ".gz", ".bz2", ".xz"))
ACCEPTED_SUFFIXES = CSV_SUFFIXES + PARQUET_SUFFIXES + STDF_SUFFIXES


def read_table(path: str, set_aside: Sequence[str] = ()) -> tuple[ParametricTable, list[Finding]]:
    """Read one CSV, Parquet or STDF file, chosen by suffix; DataError names the file on any failure.

    ``set_aside`` names columns that are not measurements although a reader would take them for tests (a label
    column, a join key): they stay in the frame as read and never become model inputs.
    """
    path = str(path)
    name = Path(path).name.lower()
    if not name.endswith(ACCEPTED_SUFFIXES):
        raise DataError("unknown file type", file=path, expected="a name ending in " + ", ".join(ACCEPTED_SUFFIXES),
                        got=repr(Path(path).name))
    _check_readable(path)
    if name.endswith(CSV_SUFFIXES):
        from .tabular import read_csv
        return read_csv(path, set_aside)
    if name.endswith(PARQUET_SUFFIXES):
        from .tabular import read_parquet
        return read_parquet(path, set_aside)
    table, findings = _read_stdf(path)
    return table.set_aside(set_aside), findings


def load_tables(paths: list[str], retest_policy: str = "last", min_rows: int = 200,
                set_aside: Sequence[str] = (), *, min_readings_share: float = 0.5, keep_sparse_parts: bool = False
                ) -> tuple[ParametricTable, ValidationReport]:
    """Read, combine and validate ``paths``; DataError lists every fatal problem (unreadable files included).
    ``set_aside`` as for ``read_table``. Parts with readings for fewer than ``min_readings_share`` of the tests are
    left out unless ``keep_sparse_parts`` (``trainer.validate``)."""
    if not paths:
        raise DataError("no input files given")
    check_retest_policy(retest_policy)
    check_readings_share(min_readings_share)
    labels = [str(p) for p in paths]
    tables, readable, findings = [], [], []
    for label in labels:
        try:
            table, file_findings = read_table(label, set_aside)
        except DataError as error:
            findings.append(Finding("error", "UNREADABLE", str(error), label))
            continue
        tables.append(table)
        readable.append(label)
        findings += file_findings
    table, report = validate(tables, readable, retest_policy, min_rows, findings, min_readings_share,
                             keep_sparse_parts)
    report.files = labels
    report.raise_if_fatal()
    return table, report


def _check_readable(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise DataError("no such file", file=path)
    if not p.is_file():
        raise DataError("not a regular file", file=path)
    try:
        with p.open("rb"):
            pass
    except OSError as error:
        raise DataError(f"cannot open: {error.strerror or error}", file=path) from None


def _read_stdf(path: str) -> tuple[ParametricTable, list[Finding]]:
    from .stdf import read_stdf
    result = read_stdf(path)
    findings = [Finding.at("warning", "STDF_DAMAGED", problem, files=path) for problem in result.problems]
    table = result.table
    frame, tests, test_findings = clean_tests(table.frame, table.tests, path, lambda i: f"part {i + 1}")
    return ParametricTable(frame, tests, [path]), findings + test_findings
