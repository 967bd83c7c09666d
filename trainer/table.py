"""The parametric table: one row per tested device, one column per test.

Every path into the trainer (STDF, CSV, Parquet, the synthetic generator) produces a
``ParametricTable``. Identity columns have fixed names (``IDENTITY_COLUMNS``); every other
column is a test whose metadata lives in ``ParametricTable.tests``. A test that did not run
is NaN, never zero.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np
import pandas as pd

# Identity columns and the dtype family each one holds. Order here is the order in files.
IDENTITY_COLUMNS: dict[str, str] = {
    "lot": "str",
    "sublot": "str",
    "wafer": "str",
    "x": "int",
    "y": "int",
    "head": "int",
    "site": "int",
    "part_id": "str",
    "test_time_ms": "float",   # time the part spent in test (PRR TEST_T)
    "timestamp": "float",      # unix seconds when the part finished, where known
    "hard_bin": "int",
    "soft_bin": "int",
    "passed": "bool",
    "retest": "int",           # 0 for the first test of a part, n for the n-th retest
    "tester": "str",
    "job": "str",
    "handler": "str",
    "probe_card": "str",
}

# Columns that are neither identity nor tests but are allowed in a table (labels, ground truth).
LABEL_COLUMNS = ("final_pass", "truth_excursion")

PARQUET_METADATA_KEY = b"edge_inference.tests"


@dataclass(frozen=True)
class TestMeta:
    """Metadata of one parametric test (one table column)."""

    column: str
    name: str
    number: int | None = None
    units: str = ""
    low: float | None = None
    high: float | None = None
    pin: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TestMeta":
        return cls(**{k: d.get(k) for k in ("column", "name", "number", "units", "low", "high", "pin")})


def test_column_name(number: int | None, name: str, pin: str | None = None) -> str:
    """Column name from the STDF test identity: test number + name (+ pin for MPR)."""
    base = name if number is None else f"{number}:{name}"
    return base if pin is None else f"{base}@{pin}"


def finite_or_none(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class ParametricTable:
    frame: pd.DataFrame
    tests: list[TestMeta]
    sources: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        missing = [t.column for t in self.tests if t.column not in self.frame.columns]
        if missing:
            raise ValueError(f"test metadata names columns absent from the table: {missing[:5]}")

    @property
    def test_columns(self) -> list[str]:
        return [t.column for t in self.tests]

    @property
    def identity_columns(self) -> list[str]:
        return [c for c in IDENTITY_COLUMNS if c in self.frame.columns]

    def __len__(self) -> int:
        return len(self.frame)

    def readings(self, columns: Iterable[str] | None = None) -> np.ndarray:
        """Test readings as float64, NaN where a test did not run."""
        cols = self.test_columns if columns is None else list(columns)
        return self.frame[cols].to_numpy(dtype=np.float64, na_value=np.nan)

    def lot_keys(self) -> np.ndarray:
        """Each row's lot as a string ("" where unknown; all "" when the table has no lot column)."""
        if "lot" not in self.frame.columns:
            return np.full(len(self.frame), "", dtype=object)
        lots = self.frame["lot"]
        return lots.astype(object).where(lots.notna(), "").astype(str).to_numpy(dtype=object)

    def wafer_keys(self) -> np.ndarray:
        """Each row's lot/sublot/wafer (None everywhere when the table has no wafer column)."""
        if "wafer" not in self.frame.columns:
            return np.full(len(self.frame), None, dtype=object)
        key = self.frame["wafer"].astype(str)
        for name in ("sublot", "lot"):
            if name in self.frame.columns:
                key = self.frame[name].astype(str) + "/" + key
        return key.to_numpy(dtype=object)

    def site_keys(self) -> np.ndarray:
        """Each row's head * 1000 + site (head 1, site 0 where the table does not say)."""
        frame = self.frame
        head = frame["head"].fillna(1).to_numpy(int) if "head" in frame.columns else np.ones(len(frame), int)
        site = frame["site"].fillna(0).to_numpy(int) if "site" in frame.columns else np.zeros(len(frame), int)
        return head * 1000 + site

    def set_aside(self, columns: Iterable[str]) -> "ParametricTable":
        """The table with ``columns`` no longer tests: kept in the frame as read, never a model input (a label, a
        join key that a reader took for a measurement)."""
        aside = set(columns)
        if not aside & set(self.test_columns):
            return self
        return ParametricTable(self.frame, [t for t in self.tests if t.column not in aside], self.sources)

    def tests_json(self) -> str:
        return json.dumps([t.to_dict() for t in self.tests])

    @staticmethod
    def tests_from_json(text: str | bytes) -> list[TestMeta]:
        return [TestMeta.from_dict(d) for d in json.loads(text)]

    @staticmethod
    def concat(tables: list["ParametricTable"]) -> "ParametricTable":
        """Combine tables (lots); a test's metadata comes from the first table that has it. Columns that are neither
        identity, label nor test (set aside: a label or key named by the user) follow the labels."""
        seen: dict[str, TestMeta] = {}
        for table in tables:
            for meta in table.tests:
                seen.setdefault(meta.column, meta)
        frame = pd.concat([t.frame for t in tables], ignore_index=True, sort=False)
        identity = [c for c in IDENTITY_COLUMNS if c in frame.columns]
        labels = [c for c in LABEL_COLUMNS if c in frame.columns]
        aside = [c for c in frame.columns if c not in IDENTITY_COLUMNS and c not in LABEL_COLUMNS and c not in seen]
        frame = frame[identity + labels + aside + list(seen)]
        return ParametricTable(frame, list(seen.values()), [s for t in tables for s in t.sources])
