"""Downstream outcomes: a later test step's result (final test), joined to the training parts by part identity.

A yield model is worth having for what happens to a part after this step; trained on this step's own pass flag it
only relearns the test limits (trainer.labels). ``edge-train fit --outcomes FILE`` (repeatable) reads the later
step's results with the product's own readers (trainer.ingest.read_table):

- an STDF file of the later step: a part's result is its pass/fail flag (PRR PART_FLG);
- a CSV or Parquet file of part identity and result: the result column is ``--outcome-column``, else the first of
  ``RESULT_COLUMNS`` the file has, coded as labels are (0/1, booleans, or ``--label-pass-value``).

Join keys (``--join-on``): by default lot, wafer, x, y where both sides have them (wafer sort to final test of the
same dies), else lot and part_id, else part_id. Key values compare as text, so die x 3 in an STDF file and 3.0 in
a CSV are the same die. A part tested more than once downstream (retests) has several outcome rows; the last one
counts, ordered by the retest column where present, then by file (as given) and row. A training part without an
outcome (it failed here and never went on, was lost in assembly, or its later test is not in the files) keeps no
label and stays out of the yield model; the match counts say how many, on stderr and in the manifest.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from edge_agent.errors import DataError

from .labels import encode, number_text
from .table import ParametricTable

OUTCOME_COLUMN = "downstream_pass"     # the joined label column: 1 pass, 0 fail, NaN no outcome
RESULT_COLUMNS = ("final_pass", "passed", "result", "outcome")
DEFAULT_JOIN_KEYS = (("lot", "wafer", "x", "y"), ("lot", "part_id"), ("part_id",))
KEY_SEPARATOR = "\x1f"


@dataclass
class OutcomeJoin:
    """What the join found: the counts a person checks before trusting a model of the joined label."""

    files: list[str]
    join_on: list[str]
    result_columns: dict[str, str]     # file -> the column its result came from
    outcome_rows: int                  # rows read from the outcome files
    outcome_parts: int                 # distinct parts among them (by the join keys)
    outcome_rows_without_key: int      # rows missing a key value: cannot be joined
    duplicate_outcomes: int            # parts with more than one outcome row (retests): the last one counts
    training_parts: int
    matched: int                       # training parts with an outcome
    training_without_outcome: int
    training_without_outcome_failed_here: int   # of them: parts that failed this step (never sent on)
    outcomes_without_part: int         # outcome parts no training part matches
    training_sharing_a_key: int        # training parts whose key another training part has too (all get its outcome)
    matched_fail_rate: float | None
    problems: list[str] = field(default_factory=list)   # reader warnings about the outcome files

    def summary(self) -> str:
        rate = "n/a" if self.matched_fail_rate is None else f"{self.matched_fail_rate:.2%}"
        lines = [f"outcomes: {len(self.files)} file(s), {self.outcome_rows:,} rows, {self.outcome_parts:,} parts, "
                 f"joined on {', '.join(self.join_on)}",
                 f"  matched {self.matched:,} of {self.training_parts:,} training parts (downstream fail rate "
                 f"among them {rate})",
                 f"  training parts without outcome {self.training_without_outcome:,} (of them "
                 f"{self.training_without_outcome_failed_here:,} failed this step), outcomes without a training "
                 f"part {self.outcomes_without_part:,}",
                 f"  duplicates: {self.duplicate_outcomes:,} parts with more than one outcome row (the last counts), "
                 f"{self.training_sharing_a_key:,} training parts sharing a key, {self.outcome_rows_without_key:,} "
                 "outcome rows without a complete key"]
        lines += [f"  warning: {problem}" for problem in self.problems[:10]]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


def join_outcomes(table: ParametricTable, paths: Sequence[str], *, join_on: Sequence[str] | None = None,
                  outcome_column: str | None = None,
                  pass_value: str | None = None) -> tuple[ParametricTable, OutcomeJoin]:
    """``table`` with the joined outcome in column ``OUTCOME_COLUMN``, and the join's counts."""
    if OUTCOME_COLUMN in table.frame.columns:
        raise DataError("the training data already has the column the joined outcome goes into",
                        column=OUTCOME_COLUMN, expected="no such column in the training files", got="present")
    outcomes, result_columns, problems = _read_outcomes(paths, join_on, outcome_column, pass_value)
    keys = _join_keys(table.frame, outcomes, join_on, paths)

    outcome_key = _key(outcomes, keys)
    has_key = outcome_key.notna().to_numpy()
    ordered = outcomes.assign(_key=outcome_key)[has_key].sort_values(["_file", "_retest", "_row"], kind="stable")
    repeated = ordered.duplicated("_key", keep=False)
    latest = ordered.drop_duplicates("_key", keep="last").set_index("_key")["_result"]

    training_key = _key(table.frame, keys)
    found = latest.index.get_indexer(training_key)
    found[training_key.isna().to_numpy()] = -1
    matched = found >= 0
    label = np.where(matched, latest.to_numpy()[found], np.nan)
    passed_here = (table.frame["passed"].to_numpy(bool) if "passed" in table.frame.columns
                   else np.ones(len(table), bool))
    sharing = training_key.duplicated(keep=False).to_numpy() & training_key.notna().to_numpy()
    known = label[~np.isnan(label)]
    report = OutcomeJoin(
        files=[str(p) for p in paths], join_on=list(keys), result_columns=result_columns,
        outcome_rows=len(outcomes), outcome_parts=len(latest), outcome_rows_without_key=int((~has_key).sum()),
        duplicate_outcomes=int(ordered.loc[repeated.to_numpy(), "_key"].nunique()), training_parts=len(table),
        matched=int(matched.sum()), training_without_outcome=int((~matched).sum()),
        training_without_outcome_failed_here=int((~matched & ~passed_here).sum()),
        outcomes_without_part=int((~latest.index.isin(training_key.dropna())).sum()),
        training_sharing_a_key=int(sharing.sum()),
        matched_fail_rate=float(1.0 - known.mean()) if known.size else None, problems=problems)
    if report.matched == 0:
        raise DataError(f"no training part matches an outcome on {', '.join(keys)}; e.g. training part "
                        f"{_example(table.frame, keys)} and outcome {_example(outcomes, keys)}",
                        file=", ".join(map(str, paths)),
                        expected="the same parts on both sides (check --join-on and the key spellings)",
                        got=f"{report.outcome_parts:,} outcome parts, {report.training_parts:,} training parts")
    frame = table.frame.assign(**{OUTCOME_COLUMN: label})
    return ParametricTable(frame, table.tests, table.sources), report


def _read_outcomes(paths: Sequence[str], join_on: Sequence[str] | None, outcome_column: str | None,
                   pass_value: str | None) -> tuple[pd.DataFrame, dict[str, str], list[str]]:
    """Every outcome row: its identity columns, ``_result`` (1/0/NaN), ``_file``, ``_retest`` and ``_row``."""
    from .ingest import read_table

    candidates = (outcome_column,) if outcome_column else RESULT_COLUMNS
    frames, result_columns, problems = [], {}, []
    for index, path in enumerate(paths):
        table, findings = read_table(str(path), set_aside=(*candidates, *(join_on or ())))
        problems += [finding.message for finding in findings if finding.severity != "info"]
        frame = table.frame
        column = next((c for c in candidates if c in frame.columns), None)
        if column is None:
            raise DataError("no result column in the outcome file", file=str(path),
                            expected=f"a column named {' or '.join(candidates)}"
                                     + ("" if outcome_column else " (or name it with --outcome-column)"),
                            got="columns " + ", ".join(map(str, [c for c in frame.columns
                                                                 if c not in table.test_columns][:12])))
        result_columns[str(path)] = column
        identity = frame[[c for c in frame.columns if c not in table.test_columns and c != column]]
        frames.append(identity.assign(
            _result=encode(frame[column], column, pass_value, file=str(path)), _file=index,
            _retest=frame["retest"].fillna(0).to_numpy() if "retest" in frame.columns else 0,
            _row=np.arange(len(frame))))
    return pd.concat(frames, ignore_index=True, sort=False), result_columns, problems


def _join_keys(training: pd.DataFrame, outcomes: pd.DataFrame, join_on: Sequence[str] | None,
               paths: Sequence[str]) -> list[str]:
    if join_on:
        for side, frame, where in (("training data", training, None), ("outcome files", outcomes, paths)):
            absent = [key for key in join_on if key not in frame.columns]
            if absent:
                raise DataError(f"--join-on names columns the {side} lack",
                                file=None if where is None else ", ".join(map(str, where)),
                                expected=", ".join(join_on), got="no column " + ", ".join(absent))
        return list(join_on)
    for keys in DEFAULT_JOIN_KEYS:
        if all(_usable(training, key) and _usable(outcomes, key) for key in keys):
            return list(keys)
    raise DataError("the outcome files and the training data share no part identity to join on",
                    file=", ".join(map(str, paths)),
                    expected=" or ".join(", ".join(keys) for keys in DEFAULT_JOIN_KEYS) + " on both sides, or "
                             "name the key columns with --join-on",
                    got=f"training columns with values: {_identity_present(training)}; outcome columns with "
                        f"values: {_identity_present(outcomes)}")


def _usable(frame: pd.DataFrame, column: str) -> bool:
    return column in frame.columns and bool(frame[column].notna().any())


def _identity_present(frame: pd.DataFrame) -> str:
    return ", ".join(c for c in ("lot", "sublot", "wafer", "x", "y", "part_id") if _usable(frame, c)) or "none"


def _key(frame: pd.DataFrame, keys: list[str]) -> pd.Series:
    """One text per row from the key columns (None where a key value is missing)."""
    parts = [_key_text(frame[key]) for key in keys]
    joined = parts[0]
    for part in parts[1:]:
        joined = joined.str.cat(part, sep=KEY_SEPARATOR)
    return joined


def _key_text(column: pd.Series) -> pd.Series:
    """Key values as text, numbers written one way (3, 3.0 and "3" in a text column read alike)."""
    if pd.api.types.is_numeric_dtype(column.dtype) and not pd.api.types.is_bool_dtype(column.dtype):
        numbers = column.to_numpy(dtype=float, na_value=np.nan)
        finite = np.isfinite(numbers)
        whole = finite & (numbers == np.round(numbers))
        text = np.where(whole, np.where(whole, numbers, 0).astype(np.int64).astype(str), numbers.astype(str))
        return pd.Series(np.where(finite, text, None), index=column.index, dtype=object)
    text = column.astype(object).where(column.notna(), None)
    return text.map(lambda value: number_text(str(value).strip()), na_action="ignore")


def _example(frame: pd.DataFrame, keys: list[str]) -> str:
    row = frame[keys].dropna().head(1)
    return "(none with every key)" if row.empty else " ".join(f"{k}={row.iloc[0][k]}" for k in keys)
