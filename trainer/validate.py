"""Validation of parametric tables before training: every problem becomes a ``Finding``.

Two stages. ``clean_tests`` runs on each file as it is read (it knows the file's row numbers):
non-numeric cells and infinities. ``validate`` runs on all files together: mismatched tests,
duplicate parts and retests, pass/fail information, empty/constant/sparse tests, and the fatal
checks (no tests, too few rows). Nothing raises until ``ValidationReport.raise_if_fatal``, so a
person sees every fatal problem at once.

Policies, and why:
- A test column whose non-empty cells are at least half numbers is a measurement with some bad
  cells: those cells become missing. Below half it is not a measurement (a comment, a status
  text, an unrecognised id column) and is dropped. Either way the cells are counted and shown.
- Infinities are missing readings (an ATE writes them for overflowed or failed measurements);
  leaving them in would break the imputer's median and every distance.
- Tests with no reading at all, or a single constant reading, carry no information and are dropped.
- A part is identified by (lot, sublot, wafer, x, y), else by (lot, sublot, wafer, part_id), using
  the columns present; without a lot column the source file stands in for the lot, because two
  files without lot names are usually two lots. Rows identical in every column are duplicates
  (the same data read twice) and are always dropped. Other repeats of a part are retests, ordered
  by the retest column, then timestamp, then position in the input; the retest policy keeps the
  last test ("last", what binning uses), the first ("first") or all of them ("all").
- A part with readings for fewer than ``min_readings_share`` (default half) of the tests that have any reading
  (a sampled datalog's unlogged parts, parts with functional results only, a stop-on-fail program's failing
  parts) is left out of training and reported per file: the models would learn it as a median part (its
  missing readings are imputed with medians). ``keep_sparse_parts`` keeps them.
- ``passed`` missing but ``hard_bin`` present: ``passed = hard_bin == 1`` (bin 1 is the pass bin
  by STDF convention); a part without a hard bin then counts as failing. With neither column
  every part counts as passing, as the trainer assumes.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from edge_agent.errors import DataError

from .table import IDENTITY_COLUMNS, ParametricTable, TestMeta

SEVERITIES = ("error", "warning", "info")
RETEST_POLICIES = ("last", "first", "all")
HIGH_MISSING_RATE = 0.5
MOSTLY_NUMERIC = 0.5
EXAMPLES = 3
SUMMARY_LINES_PER_CODE = 5

# Text that means "no value" in test data; the same tokens pyarrow's CSV reader treats as null.
MISSING_TOKENS = frozenset({"", "#n/a", "#n/a n/a", "#na", "-1.#ind", "-1.#qnan", "-nan", "1.#ind", "1.#qnan",
                            "n/a", "na", "null", "nan", "none"})


@dataclass(frozen=True)
class Finding:
    """One problem found in the data. ``message`` is a complete sentence naming file and column."""

    severity: str
    code: str
    message: str
    file: str | None = None
    column: str | None = None
    count: int | None = None

    @classmethod
    def at(cls, severity: str, code: str, text: str, *, files: str | Sequence[str] | None = None,
           column: str | None = None, count: int | None = None) -> "Finding":
        """A finding whose message starts with where it was found, like a DataError."""
        if severity not in SEVERITIES:
            raise ValueError(f"unknown severity {severity!r}")
        names = [files] if isinstance(files, str) else list(files or [])
        where = []
        if names:
            where.append(("file " if len(names) == 1 else "files ") + ", ".join(names))
        if column is not None:
            where.append(f"column {column!r}")
        message = f"{', '.join(where)}: {text}" if where else text
        return cls(severity, code, message, ", ".join(names) or None, column,
                   None if count is None else int(count))

    def __str__(self) -> str:
        return f"{self.severity} {self.code}: {self.message}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ValidationReport:
    findings: list[Finding]
    files: list[str]
    retest_policy: str
    min_rows: int
    min_readings_share: float = 0.5
    sparse_parts: int = 0       # parts below min_readings_share (left out unless kept)
    sparse_parts_kept: bool = False
    rows_in: int = 0
    rows_out: int = 0
    tests_in: int = 0
    tests_out: int = 0
    missing_rate: dict[str, float] = field(default_factory=dict)
    dropped_tests: dict[str, str] = field(default_factory=dict)

    def by_code(self, code: str) -> list[Finding]:
        return [f for f in self.findings if f.code == code]

    def summary(self) -> str:
        """A few lines for a person: counts, then findings (errors first), long runs of one code cut short."""
        counts = Counter(f.severity for f in self.findings)
        lines = [f"validated {len(self.files)} file(s): {self.rows_in:,} rows in -> {self.rows_out:,} rows out, "
                 f"{self.tests_in:,} tests in -> {self.tests_out:,} tests out (retest policy {self.retest_policy!r}); "
                 + ", ".join(f"{counts[s]} {s}(s)" for s in SEVERITIES)]
        shown: Counter = Counter()
        for finding in sorted(self.findings, key=lambda f: SEVERITIES.index(f.severity)):
            shown[finding.code] += 1
            if shown[finding.code] <= SUMMARY_LINES_PER_CODE:
                lines.append(f"  {finding}")
        total = Counter(f.code for f in self.findings)
        lines += [f"  ... and {total[code] - SUMMARY_LINES_PER_CODE} more {code} finding(s)"
                  for code in total if total[code] > SUMMARY_LINES_PER_CODE]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "files": list(self.files),
            "retest_policy": self.retest_policy,
            "min_rows": int(self.min_rows),
            "min_readings_share": float(self.min_readings_share),
            "sparse_parts": int(self.sparse_parts),
            "sparse_parts_kept": bool(self.sparse_parts_kept),
            "rows_in": int(self.rows_in),
            "rows_out": int(self.rows_out),
            "tests_in": int(self.tests_in),
            "tests_out": int(self.tests_out),
            "counts": {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES},
            "findings": [f.to_dict() for f in self.findings],
            "dropped_tests": dict(self.dropped_tests),
            "missing_rate": {k: round(float(v), 6) for k, v in self.missing_rate.items()},
        }

    def raise_if_fatal(self) -> None:
        errors = [f for f in self.findings if f.severity == "error"]
        if errors:
            lines = "\n".join(f"  {f}" for f in errors)
            # warnings often explain an error (columns dropped as non-numeric leave no tests), so show them too
            context = [f for f in self.findings if f.severity == "warning"]
            if context:
                lines += f"\nwarnings ({len(context)}):\n" + "\n".join(f"  {f}" for f in context[:10])
                lines += f"\n  ... and {len(context) - 10} more" if len(context) > 10 else ""
            raise DataError(f"{len(errors)} fatal problem(s) in the training data:\n{lines}")


# ---------------------------------------------------------------- per file, while reading

def clean_tests(frame: pd.DataFrame, tests: list[TestMeta], file: str,
                row_name: Callable[[int], str]) -> tuple[pd.DataFrame, list[TestMeta], list[Finding]]:
    """Make every test column float64: non-numeric cells and infinities become NaN (or the column goes).

    ``row_name(i)`` names the i-th row of ``frame`` the way a person finds it in the file ("line 7").
    """
    findings: list[Finding] = []
    kept: list[TestMeta] = []
    columns: dict[str, np.ndarray] = {}
    for meta in tests:
        values, finding = _numeric(frame[meta.column], file, meta.column, row_name)
        if finding is not None:
            findings.append(finding)
        if values is None:
            continue
        infinite = np.isinf(values)
        if infinite.any():
            values = np.where(infinite, np.nan, values)
            findings.append(Finding.at(
                "warning", "INFINITE",
                f"{int(infinite.sum())} infinite readings treated as missing "
                f"({_examples(np.flatnonzero(infinite), values=None, row_name=row_name)})",
                files=file, column=meta.column, count=int(infinite.sum())))
        columns[meta.column] = values
        kept.append(meta)
    others = frame.drop(columns=[t.column for t in tests])
    frame = pd.concat([others, pd.DataFrame(columns, index=frame.index)], axis=1)
    return frame, kept, findings


def _numeric(column: pd.Series, file: str, name: str,
             row_name: Callable[[int], str]) -> tuple[np.ndarray | None, Finding | None]:
    """The column as float64, or None if it is mostly not numbers; plus the finding that says so."""
    if pd.api.types.is_numeric_dtype(column.dtype) or pd.api.types.is_bool_dtype(column.dtype):
        return column.to_numpy(dtype=np.float64, na_value=np.nan), None
    text = column.astype(object).where(column.notna(), "").astype(str).str.strip()
    present = ~text.str.lower().isin(MISSING_TOKENS).to_numpy()
    values = pd.to_numeric(text.where(present, ""), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = present & np.isnan(values)
    n_bad, n_present = int(bad.sum()), int(present.sum())
    if n_bad == 0:
        return values, None
    examples = _examples(np.flatnonzero(bad), text.to_numpy(), row_name)
    if n_present - n_bad >= MOSTLY_NUMERIC * n_present:
        return np.where(bad, np.nan, values), Finding.at(
            "warning", "NON_NUMERIC",
            f"{n_bad} of {n_present} non-empty cells are not numbers ({examples}); those cells are treated as missing",
            files=file, column=name, count=n_bad)
    return None, Finding.at(
        "warning", "NON_NUMERIC",
        f"{n_bad} of {n_present} non-empty cells are not numbers ({examples}); "
        "the column is not a measurement and was dropped", files=file, column=name, count=n_bad)


def _examples(positions: np.ndarray, values: np.ndarray | None, row_name: Callable[[int], str]) -> str:
    shown = [row_name(int(i)) if values is None else f"{values[i]!r} at {row_name(int(i))}"
             for i in positions[:EXAMPLES]]
    more = f", and {len(positions) - EXAMPLES} more" if len(positions) > EXAMPLES else ""
    return ("e.g. " if values is not None else "at ") + ", ".join(shown) + more


# ---------------------------------------------------------------- all files together

def validate(tables: list[ParametricTable], labels: list[str], retest_policy: str = "last", min_rows: int = 200,
             findings: Sequence[Finding] = (), min_readings_share: float = 0.5,
             keep_sparse_parts: bool = False) -> tuple[ParametricTable, ValidationReport]:
    """Combine ``tables`` (read from the files ``labels``) and check them; never raises on data problems.

    ``findings`` are those already found while reading; the report holds them first.
    """
    check_retest_policy(retest_policy)
    check_readings_share(min_readings_share)
    report = ValidationReport(list(findings), list(labels), retest_policy, min_rows, min_readings_share,
                              sparse_parts_kept=keep_sparse_parts)
    if not tables:
        return ParametricTable(pd.DataFrame(), []), report
    report.findings += _mismatched_tests(tables, labels)
    combined = ParametricTable.concat(tables)
    row_source = np.concatenate([np.full(len(t), label, dtype=object) for t, label in zip(tables, labels)])
    report.rows_in, report.tests_in = len(combined), len(combined.tests)

    keep, part_findings = _parts(combined.frame, row_source, retest_policy)
    report.findings += part_findings
    frame = combined.frame[keep].reset_index(drop=True)
    row_source = row_source[keep]
    frame, pass_findings = _pass_info(frame, row_source)
    report.findings += pass_findings
    sparse, sparse_findings = _sparse_parts(frame, combined.test_columns, row_source, min_readings_share,
                                            keep_sparse_parts)
    report.findings += sparse_findings
    report.sparse_parts = int(sparse.sum())
    if not keep_sparse_parts:
        frame, row_source = frame[~sparse].reset_index(drop=True), row_source[~sparse]

    dropped, column_findings, report.missing_rate = _test_columns(frame, combined.test_columns, row_source)
    report.findings += column_findings
    report.dropped_tests = dropped
    tests = [t for t in combined.tests if t.column not in dropped]
    table = ParametricTable(frame.drop(columns=list(dropped)), tests, combined.sources)
    report.rows_out, report.tests_out = len(table), len(tests)
    report.findings += _fatal(report, labels)
    return table, report


def check_readings_share(share: float) -> None:
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise DataError("the minimum share of readings per part must be a fraction", expected="0 .. 1",
                        got=repr(share))


def check_retest_policy(policy: str) -> None:
    if policy not in RETEST_POLICIES:
        raise DataError("unknown retest policy", expected=" | ".join(RETEST_POLICIES), got=repr(policy))


def _mismatched_tests(tables: list[ParametricTable], labels: list[str]) -> list[Finding]:
    """Tests some files lack (NaN there after combining) and tests whose units or limits differ."""
    findings = []
    if len(tables) < 2:
        return findings
    union: dict[str, None] = {}
    first_meta: dict[str, tuple[TestMeta, str]] = {}
    for table, label in zip(tables, labels):
        for meta in table.tests:
            union.setdefault(meta.column)
            first_meta.setdefault(meta.column, (meta, label))
    for table, label in zip(tables, labels):
        have = set(table.test_columns)
        absent = [c for c in union if c not in have]
        if absent:
            names = ", ".join(repr(c) for c in absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
            findings.append(Finding.at(
                "warning", "MISMATCHED_TESTS",
                f"lacks {len(absent)} of the {len(union)} tests found across the input files ({names}); "
                f"they are missing for its {len(table):,} rows",
                files=label, column=absent[0] if len(absent) == 1 else None, count=len(absent)))
    for table, label in zip(tables, labels):
        for meta in table.tests:
            reference, ref_label = first_meta[meta.column]
            differences = [f"{attr} {getattr(reference, attr)!r} in {ref_label} but {getattr(meta, attr)!r} here"
                           for attr in ("units", "low", "high") if getattr(reference, attr) != getattr(meta, attr)]
            if differences:
                findings.append(Finding.at(
                    "warning", "MISMATCHED_LIMITS",
                    "; ".join(differences) + f"; the model uses the metadata of {ref_label}",
                    files=label, column=meta.column, count=1))
    return findings


def part_keys(frame: pd.DataFrame, row_source: np.ndarray) -> pd.DataFrame | None:
    """Per row, what identifies the physical part (see module docstring); None if the table has nothing.

    x/y where a row has them, else part_id, so wafer-sort and final-test files can be combined. Missing
    key cells compare equal (pandas ``duplicated``), so a row without a wafer matches only rows without one.
    """
    has_xy = {"x", "y"} <= set(frame.columns)
    has_id = "part_id" in frame.columns
    if not has_xy and not has_id:
        return None
    keys = frame[[c for c in ("lot", "sublot", "wafer") if c in frame.columns]].copy()
    if "lot" not in frame.columns:
        keys["file"] = row_source
    xy_known = frame[["x", "y"]].notna().all(axis=1) if has_xy else pd.Series(False, index=frame.index)
    if has_xy:
        keys["x"], keys["y"] = frame["x"].where(xy_known), frame["y"].where(xy_known)
    if has_id:
        keys["part_id"] = frame["part_id"].where(~xy_known)
    return keys


def _parts(frame: pd.DataFrame, row_source: np.ndarray, policy: str) -> tuple[np.ndarray, list[Finding]]:
    """Which rows to keep after dropping exact duplicates and applying the retest policy."""
    keep = np.ones(len(frame), bool)
    keys = part_keys(frame, row_source)
    if keys is None:
        return keep, [Finding.at(
            "warning", "NO_IDENTITY",
            "no part identity columns (x and y, or part_id): duplicate parts and retests cannot be detected, "
            "every row counts as a different part", files=_files(row_source))]
    identified = [c for c in ("x", "y", "part_id") if c in keys.columns]
    has_key = keys[identified].notna().any(axis=1).to_numpy()
    findings = []

    exact = np.zeros(len(frame), bool)
    exact[has_key] = frame[has_key].duplicated(keep="first").to_numpy()
    if exact.any():
        findings.append(Finding.at(
            "warning", "DUPLICATE_PART",
            f"{int(exact.sum())} rows repeat another row exactly (same part, same readings), "
            f"e.g. {_describe(keys, np.flatnonzero(exact)[0])}; the repeats were dropped",
            files=_files(row_source[exact]), count=int(exact.sum())))
        keep &= ~exact

    candidates = np.flatnonzero(has_key & ~exact)
    order_by = [c for c in ("retest", "timestamp") if c in frame.columns]
    work = keys.iloc[candidates].assign(**{f"_{c}": frame[c].iloc[candidates] for c in order_by},
                                        _position=candidates)
    work = work.sort_values([f"_{c}" for c in order_by] + ["_position"], kind="stable")
    key_columns = list(keys.columns)
    repeated = work.duplicated(subset=key_columns, keep=False).to_numpy()
    if not repeated.any():
        return keep, findings
    retested = work[repeated]
    n_parts = int((~retested.duplicated(subset=key_columns)).sum())
    extra = len(retested) - n_parts
    example = _describe(keys, int(retested["_position"].iloc[0]))
    if "retest" in frame.columns:
        clash = retested.duplicated(subset=key_columns + ["_retest"], keep=False).to_numpy()
        if clash.any():
            clashing = retested[clash]
            n_clash = int((~clashing.duplicated(subset=key_columns)).sum())
            findings.append(Finding.at(
                "warning", "DUPLICATE_PART",
                f"{n_clash} parts appear more than once with the same retest number but different readings, "
                f"e.g. {_describe(keys, int(clashing['_position'].iloc[0]))}; which one is right is unknown, "
                "they are ordered by position in the input like retests",
                files=_files(row_source[clashing["_position"].to_numpy()]), count=n_clash))
    if policy == "all":
        dropped = np.array([], dtype=int)
        action = f"retest policy 'all' kept all {len(retested):,} of their rows"
    else:
        dropped = work["_position"].to_numpy()[work.duplicated(subset=key_columns, keep=policy).to_numpy()]
        action = f"retest policy {policy!r} kept each part's {policy} test and dropped {len(dropped):,} rows"
    keep[dropped] = False
    ordering = ", then ".join(order_by + ["position in the input"])
    findings.append(Finding.at(
        "info", "RETEST",
        f"{n_parts:,} parts were tested more than once ({extra:,} extra rows), e.g. {example}; "
        f"tests ordered by {ordering}; {action}",
        files=_files(row_source[retested["_position"].to_numpy()]), count=n_parts))
    return keep, findings


def _sparse_parts(frame: pd.DataFrame, columns: list[str], row_source: np.ndarray, share: float,
                  keep: bool) -> tuple[np.ndarray, list[Finding]]:
    """Parts with readings for fewer than ``share`` of the tests that have any reading, and one finding per file."""
    if not columns or frame.empty:
        return np.zeros(len(frame), bool), []
    present = frame[columns].notna().to_numpy()
    tested = present.any(axis=0)
    counts = present[:, tested].sum(axis=1)
    needed = share * int(tested.sum())
    sparse = counts < needed
    action = "kept (--keep-sparse-parts); their missing readings are imputed" if keep else \
        "left out of training (--keep-sparse-parts keeps them)"
    findings = []
    for file in _files(row_source[sparse]):
        mine = sparse & (row_source == file)
        none = int(np.sum(mine & (counts == 0)))
        findings.append(Finding.at(
            "warning", "SPARSE_PARTS",
            f"{int(mine.sum()):,} of {int(np.sum(row_source == file)):,} parts have readings for fewer than "
            f"{share:.0%} of the {int(tested.sum())} tests ({none:,} with none: a sampled datalog, functional "
            f"results only, or a program that stopped at a failing test); {action}",
            files=file, count=int(mine.sum())))
    return sparse, findings


def _describe(keys: pd.DataFrame, position: int) -> str:
    row = keys.iloc[position]
    return " ".join(f"{name}={row[name]}" for name in keys.columns if not pd.isna(row[name]))


def _files(sources: np.ndarray) -> list[str]:
    """Distinct files in first-seen order."""
    return list(dict.fromkeys(sources.tolist()))


def _by_file(mask: np.ndarray, row_source: np.ndarray) -> str:
    """' (a.csv: 3, b.csv: 5)' when the rows of ``mask`` come from more than one file."""
    counts = Counter(row_source[mask].tolist())
    return "" if len(counts) < 2 else " (" + ", ".join(f"{f}: {n:,}" for f, n in counts.items()) + ")"


def _pass_info(frame: pd.DataFrame, row_source: np.ndarray) -> tuple[pd.DataFrame, list[Finding]]:
    """Complete the ``passed`` column from ``hard_bin`` where it is missing (see module docstring)."""
    files = _files(row_source)
    has_passed, has_bin = "passed" in frame.columns, "hard_bin" in frame.columns
    if not has_passed and not has_bin:
        return frame, [Finding.at("info", "NO_PASS_INFO",
                                  "no passed or hard_bin column: every part counts as passing", files=files)]
    passed = frame["passed"] if has_passed else pd.Series(pd.NA, index=frame.index, dtype=object)
    unknown = passed.isna().to_numpy()
    findings = []
    if unknown.any() and has_bin:
        from_bin = (frame["hard_bin"] == 1).fillna(False).to_numpy(bool)
        passed = passed.astype(object).where(~unknown, from_bin)
        no_bin = unknown & frame["hard_bin"].isna().to_numpy()
        findings.append(Finding.at(
            "info", "PASSED_FROM_BIN",
            f"{int(unknown.sum()):,} parts have no pass/fail flag; passed = (hard_bin == 1) for them: "
            f"{int((from_bin & unknown).sum()):,} pass" + (f", {int(no_bin.sum()):,} without a hard bin count as failing"
                                                          if no_bin.any() else ""),
            files=_files(row_source[unknown]), column="passed", count=int(unknown.sum())))
        unknown = np.zeros(len(frame), bool)
    if unknown.any():
        findings.append(Finding.at(
            "warning", "NO_PASS_INFO",
            f"{int(unknown.sum()):,} parts have no pass/fail flag and no hard bin; they count as passing"
            + _by_file(unknown, row_source), files=_files(row_source[unknown]), column="passed",
            count=int(unknown.sum())))
        passed = passed.astype(object).where(~unknown, True)
    frame = frame.assign(passed=passed.astype(bool).to_numpy())
    order = [c for c in IDENTITY_COLUMNS if c in frame.columns]
    return frame[order + [c for c in frame.columns if c not in order]], findings


def _test_columns(frame: pd.DataFrame, columns: list[str],
                  row_source: np.ndarray) -> tuple[dict[str, str], list[Finding], dict[str, float]]:
    """Drop tests without information; report sparse ones. Returns dropped {column: reason}, findings, rates."""
    n = len(frame)
    if n == 0 or not columns:
        return {}, [], {c: 1.0 for c in columns}
    readings = frame[columns].to_numpy(dtype=np.float64, na_value=np.nan)
    missing = np.isnan(readings)
    n_missing = missing.sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN columns: handled below as ALL_MISSING
        low, high = np.nanmin(readings, axis=0), np.nanmax(readings, axis=0)
    files = _files(row_source)
    dropped: dict[str, str] = {}
    findings = []
    for j, column in enumerate(columns):
        if n_missing[j] == n:
            dropped[column] = "all missing"
            findings.append(Finding.at("warning", "ALL_MISSING", f"no readings in any of the {n:,} rows; dropped",
                                       files=files, column=column, count=n))
        elif low[j] == high[j]:
            dropped[column] = "constant"
            findings.append(Finding.at(
                "warning", "CONSTANT", f"every one of its {n - n_missing[j]:,} readings is {low[j]:g}; dropped",
                files=_files(row_source[~missing[:, j]]), column=column, count=int(n - n_missing[j])))
        elif n_missing[j] > HIGH_MISSING_RATE * n:
            findings.append(Finding.at(
                "warning", "HIGH_MISSING",
                f"missing in {n_missing[j]:,} of {n:,} rows ({n_missing[j] / n:.1%}, above "
                f"{HIGH_MISSING_RATE:.0%}){_by_file(missing[:, j], row_source)}; kept, missing readings are imputed",
                files=_files(row_source[missing[:, j]]), column=column, count=int(n_missing[j])))
    return dropped, findings, {c: float(n_missing[j] / n) for j, c in enumerate(columns)}


def _fatal(report: ValidationReport, files: list[str]) -> list[Finding]:
    findings = []
    if report.tests_out == 0:
        reasons = Counter(report.dropped_tests.values())
        why = ("; dropped: " + ", ".join(f"{n} {reason}" for reason, n in reasons.items())) if reasons else ""
        findings.append(Finding.at("error", "NO_TESTS",
                                   f"no usable test columns ({report.tests_in} found{why})",
                                   files=files, count=0))
    if report.rows_out < report.min_rows:
        findings.append(Finding.at(
            "error", "TOO_FEW_ROWS",
            f"only {report.rows_out:,} rows left after validation ({report.rows_in:,} read); "
            f"at least {report.min_rows:,} are needed (min_rows)", files=files, count=report.rows_out))
    return findings
