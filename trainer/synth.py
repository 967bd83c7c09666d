"""Synthetic wafer-sort floor: a seeded, reproducible parametric table with recorded ground truth.

Parts are dies on round wafers, probed in serpentine order in touchdowns of ``sites`` dies.
Every test reading is a standardized value ``z`` turned into physical units (normal, log-normal
or an integer trim code). ``z`` mixes four latent factors per part (process speed, leakage,
temperature, supply) so related tests correlate (Fmax with IDD, IDDQ with ILEAK), plus wafer
patterns (bowl, tilt, edge ring), site offsets, slow tester drift, gross defects that fail limits
and the injected excursions whose ground truth goes into the ``truth_excursion`` column and the
``<output>.truth.json`` file.

What real datalogs do to a table can be turned on (off by default, all on in ``DATALOG_PATHOLOGIES`` and the
demo): tests read in coarse instrument steps (a few distinct values), stop-on-fail programs (a failing part's
later tests missing), sampled datalogs (parts with a part record and bins but no readings), tests whose
spread is 3-5x wider in every other lot, and sublots sharing a lot id (wafer numbers restart in each).
``NEXT_LOT_OFF`` is the case a next lot breaks PAT on: more quantized tests, each lot further off the others, and
each site's readings on its own calibrated grid.

One floor (``seed``) is one tester with its own sites: its site offsets and drift are drawn once per seed and
stay with it from lot to lot, while each lot (``first_lot_index`` + position) draws its own material. A fleet
is several seeds (``trainer.fleet``); ``tester_shift`` and ``process_shift`` exist for it.

Random numbers come from streams keyed by (seed, lot number, wafer), and the table is built a
wafer at a time, so the same config gives the same data whatever ``chunk_parts`` is. The test
program (catalog: names, numbers, units, limits) depends on ``tests`` (and which pathologies are on) only,
never on the seed, so lots synthesized with different seeds share one test program like lots of one product do.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from edge_agent.checked import Checked, DistinctNames, Instance, Interval, Rule, Satisfies, unusable
from edge_agent.errors import DataError, EdgeError

from .table import LABEL_COLUMNS, PARQUET_METADATA_KEY, ParametricTable, TestMeta, test_column_name

EXCURSIONS = ("drifting_site", "shifted_lot", "latent_outliers")      # the default set
# Also accepted: "tester_shift" (every site of this tester steps late in the first lot: a tester or handler fault)
# and "process_shift" (every lot moved on tests the product chooses, so every floor moves the same tests the same
# way: the process or material moved for the whole fleet).
EXCURSION_NAMES = EXCURSIONS + ("tester_shift", "process_shift")

# The identity columns written (sublot only when lots are split), in trainer.table.IDENTITY_COLUMNS order, then the
# label columns.
IDENTITY = ("lot", "sublot", "wafer", "x", "y", "head", "site", "part_id", "test_time_ms", "timestamp",
            "hard_bin", "soft_bin", "passed", "tester", "job", "probe_card")

PASS_BIN = 1
MAX_WAFERS_PER_LOT = 25          # a FOUP holds 25 wafers: the default die grid grows to respect it
MIN_DIE_RADIUS = 6.0             # in die pitches: about 113 dies, the smallest wafer drawn
CATALOG_SEED = 20240108          # the test program is a product property, not a property of one lot

# Excursion magnitudes in units of a test's standard deviation (z units).
DRIFT_ONSET = 0.6                # drift starts after this fraction of the drifting lot's parts
DRIFT_END_SIGMA = 3.5            # drift reached by the last part of the lot (linear ramp)
LOT_SHIFT_SIGMA = 2.5
TESTER_SHIFT_SIGMA = 2.0         # a step on every site from DRIFT_ONSET of the first lot on
LATENT_SHIFT_SIGMA = (3.5, 5.0)  # each latent outlier moves its signature tests jointly by this much
# Share of the tests in a latent outlier's signature. An Isolation Forest picks split features at
# random, so a shift confined to a few of 200 tests barely shortens its paths: measured with 200 trees
# at a 1 % threshold, 10 % of the tests gave ~5 % recall, 20 % gave 30-50 %, 35 % gives 97-100 %.
LATENT_TEST_SHARE = 0.35
LATENT_LIMIT_MARGIN = 0.5        # latent outliers stay at least this far inside every limit
LATENT_MAX_WAFER_SHARE = 0.1     # a latent cluster covers at most this share of a wafer's eligible dies

# Pathologies of real datalogs (SynthConfig fields; DATALOG_PATHOLOGIES turns them all on, as the demo does).
QUANTUM_SIGMA = (0.8, 1.6)       # a quantized test's instrument step, in its own sigma: 4-9 distinct passing values
SPREAD_FACTOR = (3.0, 5.0)       # a spread-changing test's sigma in its wide lots
SUBLOT_NAMES = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SUBLOT_OFFSET_SIGMA = 0.1        # per-test offsets between the sublots of one lot (z units): one lot's material, no
                                 # further apart than two lots (a lot's per-test offset is 0.1 too)
DATALOG_PATHOLOGIES = {"quantized_share": 0.1, "stop_on_fail": True, "datalog_every": 2,
                       "spread_change_share": 0.03, "sublots": 2}
LOT_OFFSET_SIGMA = 0.1           # each lot's own per-test offset (z units), on top of its process speed
# The next lot slightly off, on quantized tests (issue 28's real next lot): every lot sits off the others by a
# per-test offset of this sd (0.5 sigma: a next lot a little off on many tests, several on a few), and a third of
# the tests are read in instrument steps of 0.8-1.6 sigma, so a one-step move of a lot's median is a whole sigma.
# Each site's instrument channel adds its own calibration offset (a fraction of a step) after quantization, so the
# union of a test's readings over the sites has steps far finer than one site's, which reads a few steps.
NEXT_LOT_OFF = {"quantized_share": 0.3, "lot_offset_sigma": 0.5, "site_calibration": True}

# The final-test lot of a floor (``write(..., final_test=...)``): the dies that passed wafer sort, packaged.
ASSEMBLY_LOSS = 0.004            # passing dies lost between sort and final test (saw, pick, assembly): no record
FINAL_RETEST_RATE = 0.02         # units final test runs twice: a contact failure first, then the result that counts
FINAL_FAIL_BINS = (9, 901)       # hard, soft bin of a final-test failure
FINAL_CONTACT_BINS = (8, 801)    # hard, soft bin of a contact failure (the unit is retested)
FINAL_TEST_DELAY_S = 3 * 86400.0 # final test runs days after wafer sort
FINAL_TEST_SITES = 4             # handler sites

TOUCHDOWN_INDEX_S = 0.35         # prober step between touchdowns
WAFER_LOAD_S = 90.0
LOT_CHANGE_S = 1800.0


class SynthConfigError(EdgeError, ValueError):
    """A synthetic-floor configuration that cannot be generated (a ValueError the CLI prints cleanly)."""


def _every_lot_has_a_part(c: SynthConfig) -> list[str]:
    return [] if c.parts >= c.lots else [f"parts: expected at least lots ({c.lots}) since every lot needs a part, "
                                         f"got {c.parts}"]


def _excursions_fit_the_floor(c: SynthConfig) -> list[str]:
    problems = []
    if "shifted_lot" in c.excursions and c.lots < 2:
        problems.append("excursions: shifted_lot needs lots >= 2 (the last lot is shifted against the others)")
    if "drifting_site" in c.excursions and c.heads * c.sites < 2:
        problems.append("excursions: drifting_site needs at least 2 head/site positions to compare")
    if "shifted_lot" in c.excursions and "process_shift" in c.excursions:
        problems.append("excursions: shifted_lot and process_shift both move lots; choose one")
    return problems


@dataclass(frozen=True)
class SynthConfig(Checked):
    """What to synthesize. ``wafers_per_lot`` and ``die_radius`` are derived from ``parts`` when None.

    Checked when made: a config that exists can be generated, except for the layout limits ``generate`` finds
    (a die grid too small for the parts, latent clusters that do not fit).
    """

    ERROR = SynthConfigError
    CONSTRAINTS = {
        "seed": [Interval(int, 0, None)],
        "parts": [Interval(int, 1, None)],
        "tests": [Interval(int, 8, 5000)],
        "lots": [Interval(int, 1, 1000)],
        "wafers_per_lot": [None, Interval(int, 1, 1000)],
        "die_radius": [None, Interval(float, 2, 1000)],
        "heads": [Interval(int, 1, 8)],
        "sites": [Interval(int, 1, 64)],
        "lot_prefix": [Satisfies(str, re.compile(r"[\w-]+").fullmatch, "letters, digits, '_' or '-'")],
        "first_lot_index": [Interval(int, 0, 9999)],
        "excursions": [DistinctNames(EXCURSION_NAMES)],
        "latent_outlier_fraction": [Interval(float, 0, 0.05, closed="right")],
        "defect_fraction": [Interval(float, 0, 0.5)],
        "missing_fraction": [Interval(float, 0, 0.05)],
        "start_time": [Interval(float, None, None)],       # unix seconds
        "quantized_share": [Interval(float, 0, 1)],
        "stop_on_fail": [Instance(bool)],
        "datalog_every": [Interval(int, 1, 1000)],
        "spread_change_share": [Interval(float, 0, 1)],
        "sublots": [Interval(int, 1, len(SUBLOT_NAMES))],
        "lot_offset_sigma": [Interval(float, 0, 3)],
        "site_calibration": [Instance(bool)],
    }
    RULES = (Rule(("parts", "lots"), _every_lot_has_a_part),
             Rule(("excursions", "lots", "heads", "sites"), _excursions_fit_the_floor))

    seed: int = 7
    parts: int = 20000
    tests: int = 200
    lots: int = 2
    wafers_per_lot: int | None = None      # None: the smallest count <= 25 that the die grid allows
    die_radius: float | None = None        # wafer radius in die pitches; None: sized to the parts per wafer
    heads: int = 1
    sites: int = 4
    lot_prefix: str = "SYN"
    first_lot_index: int = 1
    excursions: tuple[str, ...] = EXCURSIONS
    latent_outlier_fraction: float = 0.003
    defect_fraction: float = 0.02          # parts with a gross defect that fails a limit (x2 at the wafer edge)
    missing_fraction: float = 0.001        # readings left NaN (test did not run)
    start_time: float = 1_704_700_800.0    # tester clock of the first touchdown (unix seconds)
    # What real datalogs do to the table (``FLOOR_PATHOLOGIES``); off by default, the demo turns them on.
    quantized_share: float = 0.0           # share of the tests read in coarse instrument steps (few distinct values)
    stop_on_fail: bool = False             # a failing part's tests after its first failing one did not run
    datalog_every: int = 1                 # only every n-th part of a lot has readings; the others only bins
    spread_change_share: float = 0.0       # share of the tests whose spread is 3-5x wider in every other lot
    sublots: int = 1                       # sublots per lot, sharing its lot id; wafer numbers restart in each
    lot_offset_sigma: float = LOT_OFFSET_SIGMA   # sd of each lot's own per-test offset (z units); NEXT_LOT_OFF raises it
    site_calibration: bool = False         # quantized readings carry their site's calibration offset (off the grid)

    def __post_init__(self) -> None:
        if isinstance(self.excursions, (list, tuple)):
            object.__setattr__(self, "excursions", tuple(self.excursions))
        for name in ("seed", "parts", "tests", "lots", "wafers_per_lot", "heads", "sites", "first_lot_index",
                     "datalog_every", "sublots"):
            if isinstance(getattr(self, name), np.integer):   # numpy integers would not survive json.dumps
                object.__setattr__(self, name, int(getattr(self, name)))
        self.check()

    def lot_names(self) -> list[str]:
        return [f"{self.lot_prefix}{self.first_lot_index + i:04d}" for i in range(self.lots)]


def _unusable(problem: str) -> SynthConfigError:
    """A config that passed its own check but does not fit the floor ``generate`` lays out."""
    return unusable(SynthConfigError, SynthConfig.__name__, [problem])


# ----------------------------------------------------------------------------------------------
# The test program

NORMAL, LOGNORMAL, CODE = 0, 1, 2
CODE_RANGE = (0.0, 31.0)         # a 5-bit trim code; codes 0 and 31 mean the trim ran out of range


@dataclass(frozen=True)
class _Family:
    name: str
    number: int
    units: str
    kind: int
    levels: tuple[tuple[float, float], ...]   # (center, spread) per instance, cycled; LOGNORMAL: log-space spread
    loadings: tuple[float, float, float, float]   # on the latent factors (speed, leakage, temperature, supply)
    low_z: float | str | None                 # None: no limit; TYPICAL: 6..8 sigma from the centre
    high_z: float | str | None
    hard_bin: int
    soft_bin: int
    weight: int                               # share of the test program
    defect_sign: int                          # direction a gross defect pushes readings (0: either)
    per_pin: bool = False                     # one multi-pin test (STDF MPR): shared number, one column per pin


TYPICAL = "typical"
# Flow order of a wafer-sort program: continuity, DC, supply currents, leakage, speed, analog.
FAMILIES = (
    _Family("CONT", 1000, "V", NORMAL, ((-0.62, 0.012),), (0, 0, -0.3, 0), TYPICAL, TYPICAL, 2, 201, 5, 0, True),
    _Family("VREG", 2000, "V", NORMAL, ((0.9, 0.0045), (1.2, 0.006), (1.8, 0.009), (3.3, 0.015)),
            (0, 0, 0.1, 0.6), TYPICAL, TYPICAL, 3, 301, 2, 0),
    _Family("VBG", 2100, "V", NORMAL, ((1.2, 0.003),), (0, 0, 0.45, 0.1), TYPICAL, TYPICAL, 3, 302, 2, 0),
    _Family("VOS", 2200, "mV", NORMAL, ((0.0, 0.8),), (0.1, 0, 0.1, 0), TYPICAL, TYPICAL, 3, 303, 3, 0),
    _Family("IDD_ACT", 3000, "mA", NORMAL, ((45.0, 2.5), (18.0, 1.0), (7.5, 0.45)),
            (0.7, 0.2, 0.2, 0.3), TYPICAL, TYPICAL, 4, 401, 3, 1),
    _Family("IDD_STBY", 3100, "uA", LOGNORMAL, ((120.0, 0.2),), (0.3, 0.75, 0.3, 0), None, 4.5, 4, 402, 2, 1),
    _Family("IDDQ", 3200, "uA", LOGNORMAL, ((2.0, 0.35), (5.0, 0.3)), (0.3, 0.85, 0.2, 0), None, 4.0, 5, 501, 3, 1),
    _Family("ILEAK", 3300, "nA", LOGNORMAL, ((1.5, 0.5),), (0, 0.6, 0.2, 0), None, 4.5, 5, 502, 6, 1, True),
    _Family("FMAX", 4000, "MHz", NORMAL, ((1200.0, 40.0), (800.0, 25.0)), (0.85, 0, -0.2, 0.3), -3.1, None,
            6, 601, 2, -1),
    _Family("RO_FREQ", 4100, "MHz", NORMAL, ((350.0, 8.0), (520.0, 12.0)), (0.9, 0, -0.15, 0.1),
            TYPICAL, TYPICAL, 6, 602, 3, -1),
    _Family("TPD", 4200, "ns", NORMAL, ((1.8, 0.06), (2.4, 0.08)), (-0.75, 0, 0.2, -0.25), TYPICAL, 3.8,
            6, 603, 3, 1),
    _Family("TSU", 4300, "ns", NORMAL, ((0.35, 0.02),), (-0.5, 0, 0.15, 0), TYPICAL, TYPICAL, 6, 604, 2, 1),
    _Family("TSENSE", 5000, "degC", NORMAL, ((30.0, 0.8),), (0, 0, 0.9, 0), TYPICAL, TYPICAL, 7, 701, 1, 0),
    _Family("ADC_INL", 5100, "LSB", NORMAL, ((0.6, 0.12),), (0, 0, 0.1, 0.1), TYPICAL, TYPICAL, 7, 702, 2, 1),
    _Family("ADC_DNL", 5200, "LSB", NORMAL, ((0.35, 0.07),), (0, 0, 0.1, 0.1), TYPICAL, TYPICAL, 7, 703, 2, 1),
    _Family("BG_TRIM", 5300, "code", CODE, ((16.0, 2.2),), (0.3, 0, 0, 0), None, None, 7, 704, 1, 0),
)
# Which families a short program keeps first (the ones the models and the tests lean on).
FAMILY_PRIORITY = ("FMAX", "IDD_ACT", "IDDQ", "VREG", "TPD", "ILEAK", "RO_FREQ", "VOS",
                   "CONT", "IDD_STBY", "VBG", "TSU", "TSENSE", "ADC_INL", "ADC_DNL", "BG_TRIM")


@dataclass
class _Program:
    """The test program as arrays, one entry per test column (catalog order)."""

    meta: list[TestMeta]
    family: np.ndarray        # index into FAMILIES
    kind: np.ndarray
    center: np.ndarray        # float64, as in the family table
    spread: np.ndarray
    loadings: np.ndarray      # (4, tests) float32
    unique: np.ndarray        # (tests,) float32: sd of the test's own noise
    low_z: np.ndarray         # -inf where there is no low limit
    high_z: np.ndarray
    low: np.ndarray           # physical limits, -inf/inf where absent
    high: np.ndarray
    hard_bin: np.ndarray
    soft_bin: np.ndarray
    defect_sign: np.ndarray
    quantum: np.ndarray       # instrument step in units (0: read finely)
    spread_change: np.ndarray  # bool: spread 3-5x wider in every other lot

    @property
    def columns(self) -> list[str]:
        return [m.column for m in self.meta]

    def quantize(self, readings: np.ndarray) -> None:
        """Readings of quantized tests become whole instrument steps, as the instrument reports them."""
        cols = np.flatnonzero(self.quantum)
        if cols.size:
            step = self.quantum[cols].astype(readings.dtype)
            readings[:, cols] = np.round(readings[:, cols] / step) * step

    def to_physical(self, z: np.ndarray) -> np.ndarray:
        """Standardized values -> readings in units, in the dtype of ``z``."""
        out = np.empty_like(z)
        for kind in (NORMAL, LOGNORMAL, CODE):
            cols = np.flatnonzero(self.kind == kind)
            if not cols.size:
                continue
            zc = z[:, cols]
            center, spread = self.center[cols].astype(z.dtype), self.spread[cols].astype(z.dtype)
            if kind == NORMAL:
                out[:, cols] = center + spread * zc
            elif kind == LOGNORMAL:
                out[:, cols] = center * np.exp(spread * zc)
            else:
                out[:, cols] = np.clip(np.rint(center + spread * zc), *CODE_RANGE)
        return out

    def physical_limit(self, z_limit: np.ndarray) -> np.ndarray:
        """Limits in units; an absent limit (+/-inf) stays infinite."""
        with np.errstate(over="ignore"):
            value = np.where(self.kind == LOGNORMAL, self.center * np.exp(self.spread * z_limit),
                             self.center + self.spread * z_limit)
        return np.where(np.isfinite(z_limit), value, z_limit)


def _family_counts(tests: int) -> list[int]:
    """How many tests each family gets: proportional to weight, at least one each when there is room."""
    if tests < len(FAMILIES):
        keep = set(FAMILY_PRIORITY[:tests])
        return [int(f.name in keep) for f in FAMILIES]
    weights = np.array([f.weight for f in FAMILIES], float)
    share = (tests - len(FAMILIES)) * weights / weights.sum()
    counts = 1 + np.floor(share).astype(int)
    remainder_order = np.argsort(-(share - np.floor(share)), kind="stable")
    counts[remainder_order[: tests - counts.sum()]] += 1
    return counts.tolist()


def _program(tests: int, quantized_share: float = 0.0, spread_change_share: float = 0.0) -> _Program:
    rng = np.random.default_rng(CATALOG_SEED)
    index, centers, spreads, low_z, high_z, meta = [], [], [], [], [], []
    for family_index, (family, count) in enumerate(zip(FAMILIES, _family_counts(tests))):
        for i in range(count):
            center, spread = family.levels[i % len(family.levels)]
            low = -rng.uniform(6.0, 8.0) if family.low_z == TYPICAL else family.low_z
            high = rng.uniform(6.0, 8.0) if family.high_z == TYPICAL else family.high_z
            if family.kind == CODE:   # limits sit between codes: 0 and 31 fail
                low, high = (1 - center) / spread, (30 - center) / spread
            if family.per_pin:
                number, name, pin = family.number, family.name, f"P{i}"
            else:
                number, name, pin = family.number + i, family.name if count == 1 else f"{family.name}_{i}", None
            index.append(family_index)
            centers.append(center)
            spreads.append(spread)
            low_z.append(-np.inf if low is None else low)
            high_z.append(np.inf if high is None else high)
            meta.append(TestMeta(column=test_column_name(number, name, pin), name=name, number=number,
                                 units=family.units, pin=pin))
    members = [FAMILIES[i] for i in index]
    loadings = np.array([f.loadings for f in members], np.float32).T
    prog = _Program(
        meta=meta, family=np.array(index), kind=np.array([f.kind for f in members]),
        center=np.array(centers), spread=np.array(spreads), loadings=loadings,
        unique=np.sqrt(np.maximum(0.1, 1.0 - (loadings ** 2).sum(axis=0))).astype(np.float32),
        low_z=np.array(low_z), high_z=np.array(high_z), low=np.empty(0), high=np.empty(0),
        hard_bin=np.array([f.hard_bin for f in members], np.int32),
        soft_bin=np.array([f.soft_bin for f in members], np.int32),
        defect_sign=np.array([f.defect_sign for f in members]),
        quantum=np.zeros(len(members)), spread_change=np.zeros(len(members), bool),
    )
    _instrument_pathologies(prog, quantized_share, spread_change_share)
    prog.low = _round_limit(prog.physical_limit(prog.low_z))
    prog.high = _round_limit(prog.physical_limit(prog.high_z))
    prog.meta = [replace(m, low=_finite(lo), high=_finite(hi)) for m, lo, hi in zip(meta, prog.low, prog.high)]
    return prog


def _instrument_pathologies(prog: _Program, quantized_share: float, spread_change_share: float) -> None:
    """Choose the quantized and the spread-changing tests (a property of the test program, like the catalog).

    Their own random stream, so a floor without them has exactly the catalog it had before they existed. A
    spread-changing test gets limits wide enough for its wide lots: its limits hold its widest lots' parts as the
    other tests' limits hold theirs.
    """
    rng = np.random.default_rng([CATALOG_SEED, 1])
    fine = np.flatnonzero(prog.kind != CODE)
    count = min(len(fine), round(quantized_share * len(prog.kind)))
    if count:
        chosen = np.sort(rng.choice(fine, count, replace=False))
        sigma_units = np.where(prog.kind[chosen] == LOGNORMAL, prog.center[chosen] * prog.spread[chosen],
                               prog.spread[chosen])
        prog.quantum[chosen] = [float(f"{v:.2g}") for v in sigma_units * rng.uniform(*QUANTUM_SIGMA, count)]
    normal = np.flatnonzero(prog.kind == NORMAL)
    count = min(len(normal), round(spread_change_share * len(prog.kind)))
    if count:
        chosen = np.sort(rng.choice(normal, count, replace=False))
        prog.spread_change[chosen] = True
        prog.low_z[chosen] *= SPREAD_FACTOR[1]
        prog.high_z[chosen] *= SPREAD_FACTOR[1]


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _round_limit(values: np.ndarray) -> np.ndarray:
    """Limits as a test engineer writes them: 4 significant digits."""
    return np.array([float(f"{v:.4g}") if np.isfinite(v) else v for v in values])


def test_catalog(config: SynthConfig) -> list[TestMeta]:
    """The test program of ``config``: names, numbers, units and limits, in column order."""
    return list(_program(config.tests, config.quantized_share, config.spread_change_share).meta)


test_catalog.__test__ = False   # its name starts with "test": keep pytest from collecting it where imported


# ----------------------------------------------------------------------------------------------
# The floor: wafer layout, lots, per-floor random state and the excursion plan


@dataclass
class _Layout:
    radius: float
    x: np.ndarray             # die coordinates in probe order (serpentine rows)
    y: np.ndarray
    r: np.ndarray             # distance from the centre / radius, 0..1
    lot_parts: list[int]
    wafer_parts: list[list[int]]   # parts on each wafer of each lot (the last wafer may be partial)

    @property
    def dies(self) -> int:
        return len(self.x)


def _die_grid(radius: float) -> tuple[np.ndarray, np.ndarray]:
    span = np.arange(-math.floor(radius), math.floor(radius) + 1)
    xs, ys = [], []
    for row, y in enumerate(span[::-1]):
        xrow = span[span ** 2 + y ** 2 <= radius ** 2]
        xs.append(xrow if row % 2 == 0 else xrow[::-1])
        ys.append(np.full(len(xrow), y))
    return np.concatenate(xs).astype(np.int32), np.concatenate(ys).astype(np.int32)


def _dies_within(radius: float) -> int:
    span = np.arange(-math.floor(radius), math.floor(radius) + 1)
    return int(((span[:, None] ** 2 + span[None, :] ** 2) <= radius ** 2).sum())


def _layout(config: SynthConfig) -> _Layout:
    base, extra = divmod(config.parts, config.lots)
    lot_parts = [base + (i < extra) for i in range(config.lots)]
    largest = max(lot_parts)
    if config.die_radius is not None:
        radius = float(config.die_radius)
        if config.wafers_per_lot is not None and config.wafers_per_lot * _dies_within(radius) < largest:
            raise _unusable(
                f"wafers_per_lot: {config.wafers_per_lot} wafers of {_dies_within(radius)} dies "
                f"(die_radius {radius}) cannot hold {largest} parts per lot")
    else:
        wafers = config.wafers_per_lot or MAX_WAFERS_PER_LOT
        needed = math.ceil(largest / wafers)
        radius = max(MIN_DIE_RADIUS, math.floor(math.sqrt(needed / math.pi)) - 1.0)
        while _dies_within(radius) < needed:
            radius += 0.25
    x, y = _die_grid(radius)
    if config.heads * config.sites > len(x):
        raise _unusable(f"sites: {config.heads * config.sites} head/site positions "
                        f"exceed the {len(x)} dies of a wafer")
    wafer_parts = [[min(len(x), n - w * len(x)) for w in range(math.ceil(n / len(x)))] for n in lot_parts]
    return _Layout(radius, x, y, np.sqrt(x ** 2.0 + y ** 2.0) / radius, lot_parts, wafer_parts)


def _stream(seed: int, tag: int, a: int = 0, b: int = 0) -> np.random.Generator:
    """Independent random stream per (seed, purpose, lot, wafer); fixed key length avoids collisions."""
    return np.random.default_rng(np.random.SeedSequence([seed, tag, a, b]))


FLOOR, LOT, WAFER, DRIFT_PLAN, SHIFT_PLAN, LATENT_PLAN, FINAL_TEST, LOT_SPREAD, SUBLOT, TESTER_PLAN, SITE_CAL = range(11)


@dataclass
class _LatentCluster:
    """Latent outliers on one wafer of the first lot."""

    wafer: int
    center: tuple[float, float]
    rows: np.ndarray          # die rows (probe order) on that wafer


@dataclass
class _Plan:
    drift_head: int = 0
    drift_site: int = 0
    drift_tests: np.ndarray = field(default_factory=lambda: np.empty(0, int))
    drift_sign: np.ndarray = field(default_factory=lambda: np.empty(0))
    shift_tests: np.ndarray = field(default_factory=lambda: np.empty(0, int))
    shift_sigma: np.ndarray = field(default_factory=lambda: np.empty(0))
    tester_tests: np.ndarray = field(default_factory=lambda: np.empty(0, int))
    tester_sigma: np.ndarray = field(default_factory=lambda: np.empty(0))
    latent_tests: np.ndarray = field(default_factory=lambda: np.empty(0, int))
    latent_sign: np.ndarray = field(default_factory=lambda: np.empty(0))
    latent_clusters: list[_LatentCluster] = field(default_factory=list)


@dataclass
class _Block:
    """Rows of the table as arrays: identity and label columns plus the readings matrix."""

    columns: dict[str, np.ndarray]
    readings: np.ndarray

    def __len__(self) -> int:
        return len(self.readings)

    def rows(self, start: int, stop: int | None = None) -> "_Block":
        return _Block({k: v[start:stop] for k, v in self.columns.items()}, self.readings[start:stop])

    @staticmethod
    def concat(blocks: list["_Block"]) -> "_Block":
        if len(blocks) == 1:
            return blocks[0]
        return _Block({k: np.concatenate([b.columns[k] for b in blocks]) for k in blocks[0].columns},
                      np.concatenate([b.readings for b in blocks]))

    def frame(self, test_columns: list[str]) -> pd.DataFrame:
        head = pd.DataFrame({name: self.columns[name] for name in IDENTITY + LABEL_COLUMNS if name in self.columns})
        tests = pd.DataFrame(self.readings, columns=test_columns, copy=False)
        return pd.concat([head, tests], axis=1)


@dataclass
class _Lot:
    name: str
    position: int             # in this file: 0 is the first lot
    number: int               # first_lot_index + position: keys the lot's random streams
    speed: float              # process speed offset of the whole lot
    offset: np.ndarray        # small per-test lot-to-lot offsets (z units)
    tester: str
    probe_card: str
    spread: np.ndarray        # per-test spread factor (1 except spread-changing tests in their wide lots)
    sublot_offset: np.ndarray  # (sublots, tests) per-test offsets of each sublot (z units)

    @classmethod
    def draw(cls, config: SynthConfig, program: _Program, position: int, name: str) -> "_Lot":
        number = config.first_lot_index + position
        rng = _stream(config.seed, LOT, number)
        speed = float(rng.normal(0.0, 0.3))
        offset = rng.normal(0.0, config.lot_offset_sigma, config.tests).astype(np.float32)
        tester, probe_card = f"93K-{int(rng.integers(1, 40)):02d}", f"PC-{int(rng.integers(100, 999)):03d}"
        # Every other lot is wide on half the spread-changing tests and narrow on the others, so any two
        # consecutive lots show each of them both ways.
        spread = np.ones(config.tests, np.float32)
        changing = np.flatnonzero(program.spread_change)
        wide = changing[(number + np.arange(len(changing))) % 2 == 1]
        spread[wide] = _stream(config.seed, LOT_SPREAD, number).uniform(*SPREAD_FACTOR, len(wide))
        sublot_offset = np.zeros((config.sublots, config.tests), np.float32)
        if config.sublots > 1:
            sublot_offset[:] = _stream(config.seed, SUBLOT, number).normal(0.0, SUBLOT_OFFSET_SIGMA,
                                                                           sublot_offset.shape)
        return cls(name, position, number, speed, offset, tester, probe_card, spread, sublot_offset)


class _Floor:
    """Everything fixed for one config; ``blocks()`` produces the table wafer by wafer."""

    def __init__(self, config: SynthConfig):
        self.config = config
        self.program = _program(config.tests, config.quantized_share, config.spread_change_share)
        self.layout = _layout(config)
        self.lots = config.lot_names()
        tests = config.tests
        rng = _stream(config.seed, FLOOR)
        self.site_offset = rng.normal(0.0, 0.2, (config.heads * config.sites, tests)).astype(np.float32)
        drifts = rng.random(tests) < 0.4
        self.drift_coef = (drifts * rng.normal(0.0, 0.35, tests)).astype(np.float32)
        # A site's calibration offset on each quantized test: within half a step of the grid, fixed per tester.
        self.calibration = (_stream(config.seed, SITE_CAL).uniform(-0.5, 0.5, self.site_offset.shape)
                            * self.program.quantum).astype(np.float32) if config.site_calibration else None
        self.touchdown = np.arange(self.layout.dies) // config.sites
        self.head = (1 + self.touchdown % config.heads).astype(np.int32)
        self.site = (np.arange(self.layout.dies) % config.sites).astype(np.int32)
        fewest = min(len(wafers) for wafers in self.layout.wafer_parts)
        if config.sublots > fewest:
            raise _unusable(f"sublots: {config.sublots} sublots need at least as many wafers per lot, the smallest "
                            f"lot has {fewest}; lower sublots or add parts")
        self.plan = self._plan()

    def wafer_name(self, position: int, wafer: int) -> tuple[str, str]:
        """(sublot, wafer) names of the ``wafer``-th wafer of the lot at ``position``: contiguous groups of wafers
        form the sublots, and wafer numbers restart in each ("" sublot when the lot is not split)."""
        count, sublots = len(self.layout.wafer_parts[position]), self.config.sublots
        sublot = wafer * sublots // count
        first = -(-sublot * count // sublots)   # the first wafer w with w * sublots // count == sublot
        return (SUBLOT_NAMES[sublot] if sublots > 1 else ""), f"W{wafer - first + 1:02d}"

    def _plan(self) -> _Plan:
        c, prog, plan = self.config, self.program, _Plan()
        # Excursions go on tests with wide two-sided limits, so they move distributions without turning
        # into limit failures (a yield crash would be a different, louder excursion).
        wide = np.flatnonzero((prog.kind == NORMAL) & (np.minimum(-prog.low_z, prog.high_z) >= 6.0))
        if "drifting_site" in c.excursions:
            rng = _stream(c.seed, DRIFT_PLAN)
            position = int(rng.integers(c.heads * c.sites))
            plan.drift_head, plan.drift_site = 1 + position // c.sites, position % c.sites
            plan.drift_tests = np.sort(rng.choice(wide, _clamp(round(0.02 * c.tests), 2, 8), replace=False))
            plan.drift_sign = rng.choice([-1.0, 1.0], len(plan.drift_tests))
        if "tester_shift" in c.excursions:
            rng = _stream(c.seed, TESTER_PLAN)
            plan.tester_tests = np.sort(rng.choice(wide, _clamp(round(0.02 * c.tests), 2, 8), replace=False))
            plan.tester_sigma = TESTER_SHIFT_SIGMA * rng.choice([-1.0, 1.0], len(plan.tester_tests))
        if "shifted_lot" in c.excursions or "process_shift" in c.excursions:
            # shifted_lot: this floor's own lot; process_shift: the product's process, the same on every floor.
            rng = _stream(c.seed if "shifted_lot" in c.excursions else CATALOG_SEED, SHIFT_PLAN)
            plan.shift_tests = np.sort(rng.choice(wide, _clamp(round(0.05 * c.tests), 2, 20), replace=False))
            plan.shift_sigma = LOT_SHIFT_SIGMA * rng.choice([-1.0, 1.0], len(plan.shift_tests))
        if "latent_outliers" in c.excursions:
            rng = _stream(c.seed, LATENT_PLAN)
            count = min(len(wide), max(3, round(LATENT_TEST_SHARE * c.tests)))
            plan.latent_tests = np.sort(rng.choice(wide, count, replace=False))
            plan.latent_sign = rng.choice([-1.0, 1.0], len(plan.latent_tests))
            plan.latent_clusters = self._latent_clusters(rng)
        return plan

    def _latent_clusters(self, rng: np.random.Generator) -> list[_LatentCluster]:
        """Clusters of nearby dies on a few wafers of the first lot, before any site drift starts."""
        c, layout = self.config, self.layout
        total = max(1, round(c.latent_outlier_fraction * c.parts))
        cutoff = DRIFT_ONSET * layout.lot_parts[0] if "drifting_site" in c.excursions else layout.lot_parts[0]
        eligible = []   # (wafer, dies on it before the cutoff)
        for wafer, n in enumerate(layout.wafer_parts[0]):
            before = int(min(n, max(0, math.ceil(cutoff) - wafer * layout.dies)))
            if before:
                eligible.append((wafer, before))
        capacity = [max(1, int(LATENT_MAX_WAFER_SHARE * n)) for _, n in eligible]
        if sum(capacity) < total:
            raise _unusable(
                f"latent_outlier_fraction: {total} latent outliers do not fit in clusters of at most "
                f"{LATENT_MAX_WAFER_SHARE:.0%} of the {sum(n for _, n in eligible)} eligible dies of lot "
                f"{self.lots[0]}; lower latent_outlier_fraction or add parts")
        # Spread over at least 3 wafers where possible, dealing dies round-robin within each wafer's room.
        order = rng.permutation(len(eligible))
        room = np.array(capacity)[order]
        wanted = min(len(eligible), total, max(3, math.ceil(total / max(capacity))))
        room = room[:max(wanted, int(np.searchsorted(np.cumsum(room), total)) + 1)]
        counts = np.zeros(len(room), int)
        while counts.sum() < total:
            open_ = np.flatnonzero(counts < room)[: total - counts.sum()]
            counts[open_] += 1
        clusters = []
        for index, take in zip(order, counts):
            wafer, before = eligible[index]
            radius = rng.uniform(0.3, 0.7) * layout.radius
            angle = rng.uniform(0, 2 * math.pi)
            center = (radius * math.cos(angle), radius * math.sin(angle))
            distance = (layout.x[:before] - center[0]) ** 2 + (layout.y[:before] - center[1]) ** 2
            clusters.append(_LatentCluster(wafer, center, np.sort(np.argsort(distance, kind="stable")[:take])))
        return sorted(clusters, key=lambda cl: cl.wafer)

    def blocks(self) -> Iterator[_Block]:
        clock = float(self.config.start_time)
        for position, name in enumerate(self.lots):
            lot = _Lot.draw(self.config, self.program, position, name)
            first_part = 0
            for wafer, n in enumerate(self.layout.wafer_parts[position]):
                block, clock = self._wafer(lot, wafer, n, first_part, clock + WAFER_LOAD_S)
                first_part += n
                yield block
            clock += LOT_CHANGE_S

    def _wafer(self, lot: _Lot, wafer: int, n: int, first_part: int, clock: float) -> tuple[_Block, float]:
        c, prog, layout = self.config, self.program, self.layout
        rng = _stream(c.seed, WAFER, lot.number, wafer)
        x, y, r = layout.x[:n], layout.y[:n], layout.r[:n].astype(np.float32)
        head, site, touchdown = self.head[:n], self.site[:n], self.touchdown[:n]
        position = (first_part + np.arange(n)) / layout.lot_parts[lot.position]

        # Tester time: a touchdown lasts as long as its slowest site, then the prober steps.
        test_time = np.round((30.0 + 1.1 * c.tests) * (1.0 + 0.03 * rng.standard_normal(n)), 2)
        starts = np.flatnonzero(np.r_[True, touchdown[1:] != touchdown[:-1]])
        touchdown_end = clock + np.cumsum(np.maximum.reduceat(test_time, starts) / 1000.0 + TOUCHDOWN_INDEX_S)
        timestamp = touchdown_end[touchdown] + 0.001 * site
        hours = (timestamp - c.start_time) / 3600.0

        # Latent factors: process speed with lot/wafer offsets, bowl and tilt; leakage tied to speed
        # plus an edge ring; temperature and supply shared in part by the parts of one touchdown.
        tilt = rng.uniform(0, 2 * math.pi)
        projected = (x * math.cos(tilt) + y * math.sin(tilt)) / layout.radius
        speed = (lot.speed + rng.normal(0.0, 0.2) + rng.normal(0.0, 0.5) * (r ** 2 - 0.5)
                 + rng.normal(0.0, 0.15) * projected + 0.85 * rng.standard_normal(n))
        ring = rng.uniform(0.5, 1.5) * np.clip((r - 0.85) / 0.15, 0.0, None)
        leakage = 0.5 * speed + 0.75 * rng.standard_normal(n) + ring
        shared = rng.standard_normal((2, touchdown[-1] + 1))
        temperature = 0.6 * shared[0][touchdown] + 0.8 * rng.standard_normal(n)
        supply = 0.5 * shared[1][touchdown] + 0.85 * rng.standard_normal(n)
        factors = np.stack([speed, leakage, temperature, supply], axis=1).astype(np.float32)

        z = rng.standard_normal((n, c.tests), dtype=np.float32)
        z *= prog.unique
        z += factors @ prog.loadings
        z += self.site_offset[(head - 1) * c.sites + site]
        z += lot.offset
        z += np.outer(_tester_drift(hours), self.drift_coef).astype(np.float32)
        sublot, wafer_name = self.wafer_name(lot.position, wafer)
        if c.sublots > 1:
            z += lot.sublot_offset[SUBLOT_NAMES.index(sublot)]
        if prog.spread_change.any():
            z *= lot.spread

        truth = np.full(n, "", dtype=object)
        plan = self.plan
        if plan.drift_tests.size and lot.position == 0:
            rows = np.flatnonzero((head == plan.drift_head) & (site == plan.drift_site) & (position >= DRIFT_ONSET))
            ramp = DRIFT_END_SIGMA * (position[rows] - DRIFT_ONSET) / (1.0 - DRIFT_ONSET)
            z[np.ix_(rows, plan.drift_tests)] += np.outer(ramp, plan.drift_sign).astype(np.float32)
            truth[rows] = "drifting_site"
        if plan.tester_tests.size and lot.position == 0:
            rows = np.flatnonzero(position >= DRIFT_ONSET)
            z[np.ix_(rows, plan.tester_tests)] += plan.tester_sigma.astype(np.float32)
            truth[rows] = "tester_shift"
        moved_process = "process_shift" in c.excursions
        if plan.shift_tests.size and (moved_process or lot.position == len(self.lots) - 1):
            z[:, plan.shift_tests] += plan.shift_sigma.astype(np.float32)
            truth[:] = "process_shift" if moved_process else "shifted_lot"
        latent = np.zeros(n, bool)
        for cluster in plan.latent_clusters:
            if lot.position == 0 and cluster.wafer == wafer:
                latent[cluster.rows] = True
        latent_rows = np.flatnonzero(latent)
        if latent_rows.size:
            magnitude = rng.uniform(*LATENT_SHIFT_SIGMA, latent_rows.size)
            z[np.ix_(latent_rows, plan.latent_tests)] += np.outer(magnitude, plan.latent_sign).astype(np.float32)
            truth[latent_rows] = "latent_outliers"

        self._gross_defects(rng, z, r, latent)
        if latent_rows.size:   # a latent outlier passes every limit: that is what makes it latent
            z[latent_rows] = np.clip(z[latent_rows], prog.low_z + LATENT_LIMIT_MARGIN,
                                     prog.high_z - LATENT_LIMIT_MARGIN)

        readings = prog.to_physical(z)
        del z
        prog.quantize(readings)
        if self.calibration is not None:
            readings += self.calibration[(head - 1) * c.sites + site]
        if c.missing_fraction:
            cells = rng.integers(0, n * c.tests, rng.binomial(n * c.tests, c.missing_fraction))
            cells = cells[~latent[cells // c.tests]]
            readings.reshape(-1)[cells] = np.nan
        failed = (readings < prog.low) | (readings > prog.high)
        passed = ~failed.any(axis=1)
        first_fail = failed.argmax(axis=1)
        hard_bin = np.where(passed, PASS_BIN, prog.hard_bin[first_fail]).astype(np.int32)
        soft_bin = np.where(passed, PASS_BIN, prog.soft_bin[first_fail]).astype(np.int32)
        final_pass = passed & (rng.random(n) >= _downstream_fail_probability(speed, leakage, latent))
        if c.stop_on_fail:   # the program stops at the first failing test: the later ones did not run
            readings[(~passed)[:, None] & (np.arange(c.tests)[None, :] > first_fail[:, None])] = np.nan
        if c.datalog_every > 1:   # a sampled datalog: the other parts keep their part record and bins only
            readings[(first_part + np.arange(n)) % c.datalog_every != 0] = np.nan

        columns = {
            "lot": np.full(n, lot.name, dtype=object),
            **({"sublot": np.full(n, sublot, dtype=object)} if c.sublots > 1 else {}),
            "wafer": np.full(n, wafer_name, dtype=object),
            "x": x, "y": y, "head": head, "site": site,
            "part_id": np.array([f"{lot.name}-{first_part + i + 1:07d}" for i in range(n)], dtype=object),
            "test_time_ms": test_time,
            "timestamp": timestamp,
            "hard_bin": hard_bin, "soft_bin": soft_bin, "passed": passed,
            "tester": np.full(n, lot.tester, dtype=object),
            "job": np.full(n, f"{c.lot_prefix}_SORT1_REV3", dtype=object),
            "probe_card": np.full(n, lot.probe_card, dtype=object),
            "final_pass": final_pass.astype(np.int8),
            "truth_excursion": truth,
        }
        return _Block(columns, readings), float(touchdown_end[-1])

    def _gross_defects(self, rng: np.random.Generator, z: np.ndarray, r: np.ndarray, latent: np.ndarray) -> None:
        """Opens, shorts and dead blocks: a few tests of one family far outside their limits."""
        c, prog = self.config, self.program
        chance = c.defect_fraction * np.where(r > 0.9, 2.0, 1.0)
        rows = np.flatnonzero((rng.random(len(z)) < chance) & ~latent)
        if not rows.size:
            return
        families = np.unique(prog.family)
        weights = np.array([FAMILIES[f].weight for f in families], float)
        picked = rng.choice(families, rows.size, p=weights / weights.sum())
        for row, family in zip(rows, picked):
            members = np.flatnonzero(prog.family == family)
            hit = rng.choice(members, min(len(members), int(rng.integers(1, 4))), replace=False)
            sign = prog.defect_sign[hit]
            sign = np.where(sign == 0, rng.choice([-1, 1], hit.size), sign)
            z[row, hit] += sign * rng.uniform(10.0, 30.0, hit.size)

    def truth(self, counts: dict[str, int], latent_ids: list[str]) -> dict:
        c, plan, cols = self.config, self.plan, self.program.columns
        spread = {cols[j]: float(self.program.spread[j]) for j in range(len(cols))}
        excursions = []
        if plan.drift_tests.size:
            excursions.append({
                "kind": "drifting_site", "lot": self.lots[0], "head": plan.drift_head, "site": plan.drift_site,
                "tests": [cols[j] for j in plan.drift_tests],
                "direction": [float(s) for s in plan.drift_sign],
                "onset_fraction_of_lot": DRIFT_ONSET, "sigma_at_lot_end": DRIFT_END_SIGMA,
                "sigma_units": {cols[j]: spread[cols[j]] for j in plan.drift_tests},
                "parts": counts.get("drifting_site", 0)})
        if plan.tester_tests.size:
            excursions.append({
                "kind": "tester_shift", "lot": self.lots[0], "tests": [cols[j] for j in plan.tester_tests],
                "shift_sigma": [float(s) for s in plan.tester_sigma], "onset_fraction_of_lot": DRIFT_ONSET,
                "sigma_units": {cols[j]: spread[cols[j]] for j in plan.tester_tests},
                "parts": counts.get("tester_shift", 0)})
        if plan.shift_tests.size and "process_shift" in c.excursions:
            excursions.append({
                "kind": "process_shift", "lots": self.lots, "tests": [cols[j] for j in plan.shift_tests],
                "shift_sigma": [float(s) for s in plan.shift_sigma],
                "sigma_units": {cols[j]: spread[cols[j]] for j in plan.shift_tests},
                "parts": counts.get("process_shift", 0)})
        elif plan.shift_tests.size:
            excursions.append({
                "kind": "shifted_lot", "lot": self.lots[-1], "tests": [cols[j] for j in plan.shift_tests],
                "shift_sigma": [float(s) for s in plan.shift_sigma],
                "sigma_units": {cols[j]: spread[cols[j]] for j in plan.shift_tests},
                "parts": counts.get("shifted_lot", 0)})
        if plan.latent_clusters:
            excursions.append({
                "kind": "latent_outliers", "lot": self.lots[0],
                "tests": [cols[j] for j in plan.latent_tests],
                "direction": [float(s) for s in plan.latent_sign],
                "shift_sigma_range": list(LATENT_SHIFT_SIGMA), "limit_margin_sigma": LATENT_LIMIT_MARGIN,
                "clusters": [self._cluster_truth(cl) for cl in plan.latent_clusters],
                "parts": counts.get("latent_outliers", 0), "part_ids": latent_ids})
        return {"generator": "trainer.synth", "seed": c.seed, "config": asdict(c),
                "derived": {"die_radius": self.layout.radius, "dies_per_wafer": self.layout.dies,
                            "wafers_per_lot": [len(w) for w in self.layout.wafer_parts]},
                "lots": self.lots, "excursions": excursions, "pathologies": self._pathologies()}

    def _cluster_truth(self, cluster: _LatentCluster) -> dict:
        sublot, wafer = self.wafer_name(0, cluster.wafer)
        return {**({"sublot": sublot} if sublot else {}), "wafer": wafer,
                "center_xy": [round(v, 2) for v in cluster.center], "parts": int(cluster.rows.size)}

    def _pathologies(self) -> dict:
        c, prog, cols = self.config, self.program, self.program.columns
        return {"quantized_tests": {cols[j]: float(prog.quantum[j]) for j in np.flatnonzero(prog.quantum)},
                "spread_change_tests": {cols[j]: {lot: float(_Lot.draw(c, prog, i, lot).spread[j])
                                                  for i, lot in enumerate(self.lots)}
                                        for j in np.flatnonzero(prog.spread_change)},
                "stop_on_fail": c.stop_on_fail, "datalog_every": c.datalog_every, "sublots": c.sublots}


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def _tester_drift(hours: np.ndarray) -> np.ndarray:
    """Slow tester drift in sigma: a settling warm-up plus a daily ambient cycle, bounded by 1."""
    return 0.6 * (1.0 - np.exp(-hours / 6.0)) + 0.4 * np.sin(2 * math.pi * hours / 24.0)


def _downstream_fail_probability(speed: np.ndarray, leakage: np.ndarray, latent: np.ndarray) -> np.ndarray:
    """Chance a part that passed here fails final test: latent defects and extreme-tail parts are at risk."""
    def sigmoid(v):
        return 1.0 / (1.0 + np.exp(-v))
    return 0.002 + 0.45 * latent + 0.5 * sigmoid(2.5 * (leakage - 2.8)) + 0.4 * sigmoid(2.5 * (-speed - 2.8))


def _rechunk(blocks: Iterator[_Block], chunk_parts: int) -> Iterator[_Block]:
    pending: list[_Block] = []
    rows = 0
    for block in blocks:
        pending.append(block)
        rows += len(block)
        while rows >= chunk_parts:
            merged = _Block.concat(pending)
            yield merged.rows(0, chunk_parts)
            rest = merged.rows(chunk_parts)
            pending, rows = ([rest], len(rest)) if len(rest) else ([], 0)
    if rows:
        yield _Block.concat(pending)


# ----------------------------------------------------------------------------------------------
# Public API


def generate(config: SynthConfig, chunk_parts: int = 100_000) -> Iterator[pd.DataFrame]:
    """The table in chunks of ``chunk_parts`` rows (the last may be shorter); same data for any chunk size."""
    _check_chunk_parts(chunk_parts)
    return _frames(_Floor(config), chunk_parts)


def excursion_plan(config: SynthConfig) -> list[dict]:
    """The excursions ``generate`` injects for ``config`` (as in the truth file, part counts left out): which
    lot, head, site and tests, by how much."""
    return [{k: v for k, v in entry.items() if k not in ("parts", "part_ids")}
            for entry in _Floor(config).truth({}, [])["excursions"]]


def _check_chunk_parts(chunk_parts: int) -> None:
    if isinstance(chunk_parts, bool) or not isinstance(chunk_parts, int) or chunk_parts < 1:
        raise SynthConfigError(f"chunk_parts must be a positive integer, got {chunk_parts!r}")


def _frames(floor: _Floor, chunk_parts: int) -> Iterator[pd.DataFrame]:
    columns = floor.program.columns
    for block in _rechunk(floor.blocks(), chunk_parts):
        yield block.frame(columns)


def final_test_frames(config: SynthConfig, chunk_parts: int = 100_000) -> Iterator[pd.DataFrame]:
    """The final-test lot of the floor ``config`` describes: its wafer-sort dies after packaging.

    Only dies that passed wafer sort go on (a failing die is inked out), less a few lost in assembly
    (``ASSEMBLY_LOSS``). A unit keeps its die identity (lot, wafer, x, y, part_id: traceability by ECID), and its
    result is the floor's ``final_pass``: latent defects and the tails of the speed and leakage factors fail, which
    the sort readings show only in part (the factors reach each test through its own noise). About
    ``FINAL_RETEST_RATE`` of the units fail contact first and are retested, so they have two records (``retest``
    0 then 1) and the last one counts. No parametric readings: a final-test outcome is a result per unit.
    """
    _check_chunk_parts(chunk_parts)
    floor = _Floor(config)
    pending, rows = [], 0
    for index, block in enumerate(floor.blocks()):    # one wafer per block: streams keyed by wafer, not chunk
        pending.append(_final_test_frame(block, _stream(config.seed, FINAL_TEST, index), config))
        rows += len(pending[-1])
        if rows >= chunk_parts:
            yield pd.concat(pending, ignore_index=True)
            pending, rows = [], 0
    if pending:
        yield pd.concat(pending, ignore_index=True)


def _final_test_frame(block: _Block, rng: np.random.Generator, config: SynthConfig) -> pd.DataFrame:
    c = block.columns
    shipped = np.flatnonzero(c["passed"] & (rng.random(len(block)) >= ASSEMBLY_LOSS))
    retested = rng.random(shipped.size) < FINAL_RETEST_RATE
    records = 1 + retested.astype(int)
    rows = np.repeat(shipped, records)
    first = np.cumsum(records) - records                  # each unit's first record
    contact = np.zeros(rows.size, bool)
    contact[first[retested]] = True
    retest = np.zeros(rows.size, np.int32)
    retest[first[retested] + 1] = 1
    passed = c["final_pass"][rows].astype(bool) & ~contact
    bins = np.where(contact[:, None], FINAL_CONTACT_BINS, np.where(passed[:, None], PASS_BIN, FINAL_FAIL_BINS))
    n = rows.size
    return pd.DataFrame({
        "lot": c["lot"][rows], **({"sublot": c["sublot"][rows]} if "sublot" in c else {}),
        "wafer": c["wafer"][rows], "x": c["x"][rows], "y": c["y"][rows],
        "head": np.ones(n, np.int32), "site": (np.arange(n) % FINAL_TEST_SITES).astype(np.int32),
        "part_id": c["part_id"][rows],
        "test_time_ms": np.round(rng.normal(850.0, 25.0, n), 2),
        "timestamp": c["timestamp"][rows] + FINAL_TEST_DELAY_S,
        "hard_bin": bins[:, 0].astype(np.int32), "soft_bin": bins[:, 1].astype(np.int32), "passed": passed,
        "retest": retest,
        "tester": np.full(n, "FT-HND-01", dtype=object),
        "job": np.full(n, f"{config.lot_prefix}_FT1_REV1", dtype=object),
    })


@dataclass
class SynthSummary:
    """What ``write`` produced; ``str()`` gives the human-readable ``describe()``."""

    path: str
    truth_path: str
    parts: int
    tests: int
    lots: list[str]
    fail_rate: float
    final_fail_rate: float
    excursion_parts: dict[str, int]
    seconds: float
    bytes: int
    final_test: _FinalTally | None = None

    def describe(self) -> str:
        excursions = ", ".join(f"{k} {v:,} parts" for k, v in self.excursion_parts.items()) or "none"
        text = (f"{self.path}: {self.parts:,} parts x {self.tests} tests in {len(self.lots)} lot(s) "
                f"({', '.join(self.lots)}), {self.bytes / 1e6:,.1f} MB in {self.seconds:.1f} s\n"
                f"  fail rate {self.fail_rate:.2%} (limits), {self.final_fail_rate:.2%} (final test label)\n"
                f"  excursions: {excursions}\n"
                f"  ground truth: {self.truth_path}")
        if self.final_test is not None:
            text += "\n" + self.final_test.describe()
        return text

    def __str__(self) -> str:
        return self.describe()


def write(config: SynthConfig, path: str | os.PathLike, chunk_parts: int = 100_000,
          final_test: str | os.PathLike | None = None) -> SynthSummary:
    """Write the floor to ``path`` and its ground truth to ``<path>.truth.json``, streamed chunk by chunk.

    Parquet or CSV: one file. STDF V4 (``.stdf``/``.std``, optionally ``.gz``/``.bz2``/``.xz``): one file per
    lot (per sublot when lots are split), as an STDF file holds one; with several ``path`` names them with
    ``{lot}`` (inserted before the suffix when absent). STDF has no place for the label columns, so each STDF
    file's truth JSON (the whole floor's) is where they live.

    ``final_test``: also write the floor's final-test lot there (``final_test_frames``; same formats). The
    downstream result then lives in that file only, as on a real floor: the wafer-sort file has no
    ``final_pass`` column, and ``edge-train fit --outcomes`` joins the two by die identity.
    """
    start = time.perf_counter()
    _check_chunk_parts(chunk_parts)
    name = str(path)
    for target in (name, *([str(final_test)] if final_test is not None else [])):
        _check_suffix(target)
    floor = _Floor(config)
    tally = _Tally()
    frames = (tally.add(frame) for frame in _frames(floor, chunk_parts))
    if final_test is not None:
        frames = (frame.drop(columns="final_pass") for frame in frames)
    written = _write_frames(frames, floor.program.meta, name, floor)
    finals = None
    if final_test is not None:
        finals = _FinalTally()
        finals.files = _write_frames((finals.add(frame) for frame in final_test_frames(config, chunk_parts)), [],
                                     str(final_test), floor)
    truth = floor.truth(tally.excursions, tally.latent_ids)
    if finals is not None:
        truth["final_test"] = {"files": finals.files, "assembly_loss": ASSEMBLY_LOSS,
                               "retest_rate": FINAL_RETEST_RATE,
                               "result": "the final-test files' pass flag (the last record of a unit counts) is the "
                                         "floor's final_pass; the wafer-sort files leave final_pass out"}
    for file in written:
        Path(f"{file}.truth.json").write_text(json.dumps(truth, indent=1))
    return SynthSummary(path=", ".join(written), truth_path=", ".join(f"{p}.truth.json" for p in written),
                        parts=tally.parts, tests=config.tests, lots=floor.lots,
                        fail_rate=tally.failed / max(1, tally.parts),
                        final_fail_rate=tally.final_failed / max(1, tally.parts),
                        excursion_parts=dict(tally.excursions), seconds=time.perf_counter() - start,
                        bytes=sum(Path(p).stat().st_size for p in written), final_test=finals)


def _check_suffix(name: str) -> None:
    from .ingest import STDF_SUFFIXES
    if not name.lower().endswith(STDF_SUFFIXES) and Path(name).suffix.lower() not in (".parquet", ".csv"):
        raise DataError("cannot write a synthetic table in this format", file=name,
                        expected=".parquet, .csv or .stdf (+ .gz/.bz2/.xz)", got=Path(name).suffix or "no suffix")


def _write_frames(frames: Iterator[pd.DataFrame], tests: list[TestMeta], name: str, floor: _Floor) -> list[str]:
    from .ingest import STDF_SUFFIXES
    if name.lower().endswith(STDF_SUFFIXES):
        return _write_stdf(frames, tests, name, floor, STDF_SUFFIXES)
    return [_write_table(frames, tests, name)]


def _write_table(frames: Iterator[pd.DataFrame], tests: list[TestMeta], name: str) -> str:
    out = Path(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        (_write_parquet if out.suffix.lower() == ".parquet" else _write_csv)(frames, tests, partial)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return name


def _write_stdf(frames: Iterator[pd.DataFrame], tests: list[TestMeta], name: str, floor: _Floor,
                suffixes: tuple[str, ...]) -> list[str]:
    from .stdf_writer import write_stdf, write_stdf_lots

    if (len(floor.lots) > 1 or floor.config.sublots > 1) and "{lot}" not in name:
        suffix = max((s for s in suffixes if name.lower().endswith(s)), key=len)
        name = f"{name[:len(name) - len(suffix)]}_{{lot}}{name[len(name) - len(suffix):]}"
    options = {"sites_per_touchdown": floor.config.heads * floor.config.sites}
    try:
        if "{lot}" not in str(Path(name).parent):
            Path(name).parent.mkdir(parents=True, exist_ok=True)
        if "{lot}" in name:
            written = write_stdf_lots(name, frames, tests, **options)
        else:
            written = [write_stdf(name, frames, tests, **options)]
    except OSError as error:
        raise DataError(f"cannot write: {error.strerror or error}", file=error.filename or name) from None
    return [str(file.path) for file in written]


@dataclass
class _Tally:
    parts: int = 0
    failed: int = 0
    final_failed: int = 0
    excursions: dict[str, int] = field(default_factory=dict)
    latent_ids: list[str] = field(default_factory=list)

    def add(self, frame: pd.DataFrame) -> pd.DataFrame:
        self.parts += len(frame)
        self.failed += int((~frame["passed"]).sum())
        self.final_failed += int((frame["final_pass"] == 0).sum())
        truth = frame["truth_excursion"]
        for kind, count in truth[truth != ""].value_counts().items():
            self.excursions[kind] = self.excursions.get(kind, 0) + int(count)
        self.latent_ids.extend(frame.loc[truth == "latent_outliers", "part_id"].tolist())
        return frame


@dataclass
class _FinalTally:
    """What the final-test lot holds: units, records (retests included), failures by the last record."""

    files: list[str] = field(default_factory=list)
    units: int = 0
    records: int = 0
    retested: int = 0
    failed: int = 0

    def add(self, frame: pd.DataFrame) -> pd.DataFrame:
        retest = frame["retest"].to_numpy() > 0
        self.records += len(frame)
        self.retested += int(retest.sum())
        self.units += len(frame) - int(retest.sum())
        last = np.r_[retest[1:], False] == 0          # a record not followed by its retest is the one that counts
        self.failed += int((~frame["passed"].to_numpy(bool) & last).sum())
        return frame

    def describe(self) -> str:
        return (f"  final test: {', '.join(self.files)}: {self.units:,} units ({self.records:,} records, "
                f"{self.retested:,} retests), final-test fail rate {self.failed / max(1, self.units):.2%}")


def _write_parquet(frames: Iterator[pd.DataFrame], tests: list[TestMeta], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    try:
        for frame in frames:
            if writer is None:
                schema = pa.Schema.from_pandas(frame, preserve_index=False)
                schema = schema.with_metadata({**(schema.metadata or {}),
                                               PARQUET_METADATA_KEY: ParametricTable(frame, tests).tests_json()})
                # Readings are noisy floats: dictionary pages only bloat them (x1.4 measured), while
                # byte-stream-split + zstd shrinks them by a quarter and reads back faster.
                tested = [t.column for t in tests]
                writer = pq.ParquetWriter(path, schema, compression="zstd", compression_level=1,
                                          use_dictionary=list(frame.columns.difference(tested, sort=False)),
                                          use_byte_stream_split=tested)
            writer.write_table(pa.Table.from_pandas(frame, schema=writer.schema, preserve_index=False))
    finally:
        if writer is not None:
            writer.close()


def _write_csv(frames: Iterator[pd.DataFrame], tests: list[TestMeta], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    frames = iter(frames)
    first = next(frames)
    with open(path, "w", newline="") as handle:
        _write_csv_header(handle, list(first.columns), tests)
    # Arrow's writer is ~7x faster than DataFrame.to_csv here; a null (NaN) reading becomes an empty
    # cell. No quoting: every text value is a generated name without commas or quotes.
    schema = pa.Schema.from_pandas(first, preserve_index=False)
    options = pa_csv.WriteOptions(include_header=False, quoting_style="none")
    with pa.OSFile(str(path), "ab") as sink, pa_csv.CSVWriter(sink, schema, write_options=options) as writer:
        for frame in itertools.chain([first], frames):
            writer.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False))


def _write_csv_header(handle, columns: list[str], tests: list[TestMeta]) -> None:
    """Header row plus the #test_number/#units/#low_limit/#high_limit rows the CSV reader understands (docs/data.md)."""
    by_column = {t.column: t for t in tests}
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(columns)
    if not tests:   # a file of results only (the final-test lot): no test metadata to carry
        return
    for tag, value in (("#test_number", lambda t: t.number), ("#units", lambda t: t.units),
                       ("#low_limit", lambda t: t.low), ("#high_limit", lambda t: t.high)):
        row = ["" if c not in by_column or value(by_column[c]) is None else value(by_column[c]) for c in columns]
        row[0] = tag
        writer.writerow(row)
