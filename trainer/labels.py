"""The yield model's label: which column it is, how its values read as pass/fail, and what a model of it means.

Values are read as they are only when they cannot be misread: 0/1 and booleans (1 and true mean pass). Any other
coding (-1/1, PASS/FAIL, P/F, good/bad) needs the value that means pass named (``--label-pass-value``); the column
must then hold exactly that value and one other, which means fail. Which of two codes means pass is never guessed:
a wrong guess gives a model that predicts the opposite of what its users read.

A part whose label is missing (an empty cell, no downstream outcome joined to it) is left out of the yield model
only; the outlier model needs no label.

What the label is decides what the model is worth. The user says it (``--label-kind``): an ``outcome`` (a later
step's result, such as final test or a line test, which the readings can only partly foresee: the purpose of a
yield model) or a ``test-flag`` (this step's own pass flag). A model of a flag that the test limits set from the
very readings it gets relearns the limits: its AUC is high and it tells the engineer nothing the limits did not.
That warning is given only where the data shows it: the readings have limits and the label equals "every reading
within its limits" on (nearly) every part (``limits_agreement``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from edge_agent.errors import DataError

from .table import ParametricTable
from .validate import MISSING_TOKENS

PASS_FLAG = "passed"               # this test step's own pass/fail flag (trainer.table)
DOWNSTREAM_LABEL = "final_pass"    # the conventional name of a downstream result given with the data
NATIVE_PASS, NATIVE_FAIL = frozenset({"1", "true"}), frozenset({"0", "false"})
SHOWN_VALUES = 6

LABEL_KINDS = ("outcome", "test-flag")
RELEARNS_LIMITS = 0.99           # label equal to "all readings within limits" on at least this share: relearning
RELEARNS_LIMITS_WARNING = (
    "The label equals \"every reading within its test limits\" on {share:.1%} of the {parts:,} parts, so the model "
    "relearns the test limits: a high AUC only says it can redraw them, and its pass probability adds nothing the "
    "limits do not already decide. To predict later failures, train with the downstream outcomes (edge-train fit "
    "--outcomes FILE).")


@dataclass(frozen=True)
class Label:
    """The yield label of every row of a table: 1.0 pass, 0.0 fail, NaN unknown."""

    column: str
    source: str                  # "outcomes" (joined from a later step), "pass_flag" (this step's), "column"
    meaning: str                 # one sentence for the manifest and the model card
    values: np.ndarray
    pass_value: str | None = None

    @property
    def known(self) -> np.ndarray:
        return ~np.isnan(self.values)


def label_column(table: ParametricTable, configured: str | None) -> str:
    """The column the yield model learns: the configured one, else ``final_pass`` if present, else ``passed``."""
    name = configured or (DOWNSTREAM_LABEL if DOWNSTREAM_LABEL in table.frame.columns else PASS_FLAG)
    if name not in table.frame.columns:
        shown = [c for c in table.frame.columns if c not in table.test_columns][:12]
        raise DataError("the yield label column is missing", column=name,
                        expected=f"one of the table's non-test columns ({', '.join(map(str, shown))})",
                        got="no such column")
    return name


def read_label(table: ParametricTable, column: str, pass_value: str | None, *, source: str | None = None,
               meaning: str | None = None, kind: str | None = None) -> Label:
    """The label in ``column`` of ``table``; ``source``/``meaning`` default to what ``kind`` (LABEL_KINDS, given by
    the user) or else the column name says, with the relearning warning only where the data shows it."""
    values = encode(table.frame[column], column, pass_value)
    if source is None:
        source = {"outcome": "outcome", "test-flag": "pass_flag"}.get(kind) or (
            "pass_flag" if column == PASS_FLAG else "column")
    if meaning is None:
        meaning = _column_meaning(column, pass_value, source, kind)
        agreement = limits_agreement(table, values)
        if agreement is not None and agreement[0] >= RELEARNS_LIMITS:
            meaning += " " + RELEARNS_LIMITS_WARNING.format(share=agreement[0], parts=agreement[1])
    return Label(column, source, meaning, values, pass_value)


def limits_agreement(table: ParametricTable, values: np.ndarray) -> tuple[float, int] | None:
    """(share of labelled parts whose label equals "every reading within its limits", parts), or None when no test
    has a limit."""
    limited = [t for t in table.tests if t.low is not None or t.high is not None]
    if not limited:
        return None
    readings = table.readings([t.column for t in limited])
    low = np.array([-np.inf if t.low is None else t.low for t in limited])
    high = np.array([np.inf if t.high is None else t.high for t in limited])
    within = np.all(np.isnan(readings) | ((readings >= low) & (readings <= high)), axis=1)
    known = ~np.isnan(values)
    if not known.any():
        return None
    return float(np.mean(within[known] == (values[known] == 1))), int(known.sum())


def encode(values: pd.Series, column: str, pass_value: str | None, file: str | None = None) -> np.ndarray:
    """1.0 pass, 0.0 fail, NaN missing; DataError naming the column, its values and the fix for any other coding."""
    if pass_value is None and (pd.api.types.is_bool_dtype(values.dtype) or pd.api.types.is_numeric_dtype(values.dtype)):
        numbers = values.to_numpy(dtype=float, na_value=np.nan)
        if np.isin(numbers[~np.isnan(numbers)], (0.0, 1.0)).all():   # the common case, without a pass per value
            return numbers
    text = values.map(_normal, na_action="ignore").astype(object).where(values.notna(), None)
    present = text.notna() & ~text.isin(MISSING_TOKENS)
    codes = text[present]
    distinct = list(dict.fromkeys(codes.tolist()))
    shown = ", ".join(repr(v) for v in _original(values[present], distinct)[:SHOWN_VALUES])
    more = f" and {len(distinct) - SHOWN_VALUES} more" if len(distinct) > SHOWN_VALUES else ""
    encoded = np.full(len(values), np.nan)
    if pass_value is None:
        if not set(distinct) <= NATIVE_PASS | NATIVE_FAIL:
            raise DataError("the yield label is not coded 0/1 or true/false", file=file, column=column,
                            expected="0/1 or booleans (1/true = pass); for any other coding name the value that "
                                     "means pass with --label-pass-value, e.g. --label-pass-value "
                                     f"{_original(values[present], distinct)[0] if distinct else 'PASS'}",
                            got=f"values {shown}{more}")
        encoded[present.to_numpy()] = codes.isin(NATIVE_PASS).to_numpy(float)
        return encoded
    wanted = _normal(pass_value)
    if wanted not in distinct:
        raise DataError(f"--label-pass-value {pass_value!r} is not one of the yield label's values", file=file,
                        column=column, expected=f"one of {shown}{more}", got=repr(pass_value))
    if len(distinct) > 2:
        raise DataError("the yield label holds more than two values, so which ones mean fail is not clear",
                        file=file, column=column,
                        expected=f"two values: {pass_value!r} (pass, from --label-pass-value) and one that means fail",
                        got=f"{len(distinct)} values: {shown}{more}")
    encoded[present.to_numpy()] = (codes == wanted).to_numpy(float)
    return encoded


def _normal(value) -> str:
    """One spelling per label value: 1, 1.0, "1" and True read alike; text compares without case or spaces."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    return number_text(str(value).strip().lower())


def number_text(text: str) -> str:
    """A number written one way ("3", "3.0" and "3e0" -> "3"; "2.50" -> "2.5"); other text as it is."""
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else repr(number)


def _original(values: pd.Series, codes: list[str]) -> list:
    """The values as the file spells them, one per code (messages show what the user typed)."""
    first: dict[str, object] = {}
    for value in values:
        first.setdefault(_normal(value), value)
        if len(first) == len(codes):
            break
    return [first[code] for code in codes]


def _column_meaning(column: str, pass_value: str | None, source: str, kind: str | None) -> str:
    coding = f"{pass_value!r} = pass, the other value = fail" if pass_value is not None else "1/true = pass"
    if source == "outcome":
        return (f"column `{column}` of the training data ({coding}), an outcome (--label-kind outcome): a later "
                "step's result, so the model predicts whether a part measured here passes that step.")
    if source == "pass_flag":
        given = "--label-kind test-flag" if kind else "the test step's own pass flag by its name"
        return (f"column `{column}` ({coding}), a test flag ({given}): this test step's own pass/fail, so the "
                "model predicts this step's verdict from its own readings.")
    if column == DOWNSTREAM_LABEL:
        return (f"column `{column}` of the training data ({coding}): by convention the downstream (final test) "
                "result, given with the data rather than joined by part identity.")
    return (f"column `{column}` of the training data as given ({coding}); what it records was not said "
            "(--label-kind outcome|test-flag).")
