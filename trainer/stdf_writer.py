"""A small STDF V4 writer: parametric tables (or streams of DataFrame chunks) -> STDF files.

``write_stdf`` writes a whole lot: FAR, ATR, MIR, SDR, per wafer WIR/WRR, per part PIR, one PTR
per reading and PRR, then HBR/SBR and MRR. The first PTR of each test carries limits and units,
later ones stop after TEST_TXT (as testers do). Parts can be written as multi-site touchdowns
whose records interleave. Bulk records are packed by a compiled loop, so a 100k-part lot takes
seconds, not minutes.

``StdfWriter`` writes single records in any order, including damaged or unknown ones; tests use
it to build edge-case files.

Values are written as the table holds them (RES_SCAL 0, units as given); STDF stores R*4, so
readings come back rounded to float32.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numba as nb
import numpy as np
import pandas as pd

from edge_agent.errors import DataError

from .table import IDENTITY_COLUMNS, LABEL_COLUMNS, ParametricTable, TestMeta

BYTE_ORDERS = {"<": 2, ">": 1}      # byte order -> FAR CPU_TYP
MISSING_COORD = -32768
_NO_SPEC = 0x02 | 0x04 | 0x08       # OPT_FLAG: reserved bit 1 set, no LO_SPEC, no HI_SPEC
_PTR_GROUP, _MPR_GROUP = 0, 1
ROWS_PER_BLOCK = 4096               # parts packed per compiled call (bounds the output buffer)


@dataclass
class StdfWritten:
    path: str
    lot: str = ""
    sublot: str = ""
    parts: int = 0
    results: int = 0
    bytes: int = 0             # STDF bytes, before any compression
    tests: list[TestMeta] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# compiled record packing (shared by the bulk loop and StdfWriter)


@nb.njit(inline="always")
def _put_u16(out, p, v, big):
    if big:
        out[p], out[p + 1] = (v >> 8) & 255, v & 255
    else:
        out[p], out[p + 1] = v & 255, (v >> 8) & 255
    return p + 2


@nb.njit(inline="always")
def _put_u32(out, p, v, big):
    for i in range(4):
        out[p + (3 - i if big else i)] = (v >> (8 * i)) & 255
    return p + 4


@nb.njit(inline="always")
def _put_r4(out, p, value, big, scratch):
    scratch[0] = value
    return _put_u32(out, p, np.int64(scratch.view(np.uint32)[0]), big)


@nb.njit(inline="always")
def _put_text(out, p, pool, start, length):
    out[p] = length
    out[p + 1:p + 1 + length] = pool[start:start + length]
    return p + 1 + length


@nb.njit(inline="always")
def _close(out, start, p, typ, sub, big):
    """Write the header of the record that began at ``start`` and ends at ``p``."""
    _put_u16(out, start, p - start - 4, big)
    out[start + 2] = typ
    out[start + 3] = sub
    return p


@nb.njit(cache=True)
def _test_header(out, p, big, number, head, site, test_flg):
    """TEST_NUM HEAD_NUM SITE_NUM TEST_FLG PARM_FLG after the record header (PTR and MPR); returns the end."""
    p = _put_u32(out, p + 4, number, big)
    out[p], out[p + 1], out[p + 2], out[p + 3] = head, site, test_flg, 0
    return p + 4


@nb.njit(cache=True)
def _limits(out, p, big, scratch, opt, scale, low, high):
    """ALARM_ID OPT_FLAG RES_SCAL LLM_SCAL HLM_SCAL LO_LIMIT HI_LIMIT (PTR and MPR); returns the end."""
    out[p] = 0                                       # ALARM_ID
    out[p + 1] = opt
    out[p + 2] = out[p + 3] = out[p + 4] = scale & 255
    p = _put_r4(out, p + 5, low, big, scratch)
    return _put_r4(out, p, high, big, scratch)


@nb.njit(cache=True)
def _ptr(out, p, big, scratch, number, head, site, test_flg, result, names, name_at, name_len, full, opt, scale,
         low, high, units, units_at, units_len):
    start = p
    p = _test_header(out, p, big, number, head, site, test_flg)
    p = _put_r4(out, p, result, big, scratch)
    p = _put_text(out, p, names, name_at, name_len)
    if full:
        p = _limits(out, p, big, scratch, opt, scale, low, high)
        p = _put_text(out, p, units, units_at, units_len)
        out[p] = out[p + 1] = out[p + 2] = 0         # C_RESFMT C_LLMFMT C_HLMFMT
        p = _put_r4(out, p + 3, 0.0, big, scratch)   # LO_SPEC HI_SPEC (flagged absent)
        p = _put_r4(out, p, 0.0, big, scratch)
    return _close(out, start, p, 15, 10, big)


@nb.njit(cache=True)
def _pir(out, p, big, head, site):
    out[p + 4], out[p + 5] = head, site
    return _close(out, p, p + 6, 5, 10, big)


@nb.njit(cache=True)
def _prr(out, p, big, head, site, part_flg, num_test, hard, soft, x, y, test_t, ids, id_at, id_len):
    start = p
    out[p + 4], out[p + 5], out[p + 6] = head, site, part_flg
    p = _put_u16(out, p + 7, num_test, big)
    p = _put_u16(out, p, hard, big)
    p = _put_u16(out, p, soft, big)
    p = _put_u16(out, p, x & 0xFFFF, big)
    p = _put_u16(out, p, y & 0xFFFF, big)
    p = _put_u32(out, p, test_t, big)
    p = _put_text(out, p, ids, id_at, id_len)
    out[p] = out[p + 1] = 0                          # PART_TXT, PART_FIX
    return _close(out, start, p + 2, 5, 20, big)


@nb.njit(cache=True)
def _mpr(out, p, big, scratch, number, head, site, test_flg, results, names, name_at, name_len, full, opt, scale,
         low, high, pmr, units, units_at, units_len):
    """An MPR; the full form (first of its test) also carries RTN_INDX (PMR indexes), limits and units."""
    start = p
    k = len(results)
    states = k if full else 0
    p = _test_header(out, p, big, number, head, site, test_flg)
    p = _put_u16(out, p, states, big)
    p = _put_u16(out, p, k, big)
    out[p:p + (states + 1) // 2] = 0                 # RTN_STAT
    p += (states + 1) // 2
    for i in range(k):
        p = _put_r4(out, p, results[i], big, scratch)
    p = _put_text(out, p, names, name_at, name_len)
    if full:
        p = _limits(out, p, big, scratch, opt, scale, low, high)
        p = _put_r4(out, p, 0.0, big, scratch)       # START_IN
        p = _put_r4(out, p, 0.0, big, scratch)       # INCR_IN
        for i in range(k):
            p = _put_u16(out, p, pmr[i], big)
        p = _put_text(out, p, units, units_at, units_len)
        out[p] = out[p + 1] = out[p + 2] = out[p + 3] = 0   # UNITS_IN C_RESFMT C_LLMFMT C_HLMFMT
        p = _put_r4(out, p + 4, 0.0, big, scratch)   # LO_SPEC HI_SPEC (flagged absent)
        p = _put_r4(out, p, 0.0, big, scratch)
    return _close(out, start, p, 15, 15, big)


@nb.njit(cache=True)
def _pack_parts(out, big, touchdowns, values, kinds, numbers, names, name_at, name_len, written, opts, low, high,
                units, units_at, units_len, member_at, members, pmr, heads, sites, part_flg, hard, soft, xs, ys,
                test_t, ids, id_at, id_len, results_written):
    """PIRs, PTR/MPRs (record group by group across the touchdown's sites) and PRRs; returns bytes used."""
    scratch = np.zeros(1, np.float32)
    pin_values = np.empty(values.shape[1], np.float32)
    p = 0
    for g in range(len(touchdowns) - 1):
        first, last = touchdowns[g], touchdowns[g + 1]
        for r in range(first, last):
            p = _pir(out, p, big, heads[r], sites[r])
        counts = np.zeros(last - first, np.int64)
        for t in range(len(kinds)):
            a, b = member_at[t], member_at[t + 1]
            for r in range(first, last):
                present, failed = 0, False
                for m in range(a, b):
                    v = values[r, members[m]]
                    pin_values[m - a] = v
                    if not np.isnan(v):
                        present += 1
                        failed |= (not (opts[t] & 0x40) and v < low[t]) or (not (opts[t] & 0x80) and v > high[t])
                if present == 0:
                    continue
                flag = 0x80 if failed else 0
                if kinds[t] == _PTR_GROUP:
                    p = _ptr(out, p, big, scratch, numbers[t], heads[r], sites[r], flag, pin_values[0], names,
                             name_at[t], name_len[t], not written[t], opts[t], 0, low[t], high[t], units,
                             units_at[t], units_len[t])
                else:
                    p = _mpr(out, p, big, scratch, numbers[t], heads[r], sites[r], flag, pin_values[:b - a], names,
                             name_at[t], name_len[t], not written[t], opts[t], 0, low[t], high[t], pmr[a:b], units,
                             units_at[t], units_len[t])
                written[t] = True
                counts[r - first] += 1
                results_written[0] += present
        for r in range(first, last):
            p = _prr(out, p, big, heads[r], sites[r], part_flg[r], counts[r - first], hard[r], soft[r], xs[r],
                     ys[r], test_t[r], ids, id_at[r], id_len[r])
    return p


# ----------------------------------------------------------------------------------------------
# single records


def _text_bytes(text) -> bytes:
    raw = str(text if text is not None else "").encode("latin-1", errors="replace")
    return raw[:255]


def _pool(texts: Iterable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenated bytes of texts (each cut to 255) with start offsets and lengths."""
    encoded = [_text_bytes(t) for t in texts]
    lengths = np.array([len(b) for b in encoded], np.int64)
    starts = np.zeros(len(encoded), np.int64)
    if len(encoded) > 1:
        starts[1:] = np.cumsum(lengths)[:-1]
    pool = np.frombuffer(b"".join(encoded) or b"\0", np.uint8)
    return pool, starts, lengths


class StdfWriter:
    """Writes STDF V4 records one call at a time to a binary stream, in the given byte order."""

    def __init__(self, stream: BinaryIO, byte_order: str = "<"):
        if byte_order not in BYTE_ORDERS:
            raise ValueError(f"byte_order must be '<' or '>', got {byte_order!r}")
        self.stream, self.order, self.big = stream, byte_order, byte_order == ">"
        self.bytes = 0
        self._scratch = np.zeros(1, np.float32)

    # generic -------------------------------------------------------------------------------------
    def record(self, typ: int, sub: int, payload: bytes, *, length: int | None = None) -> int:
        """Any record; ``length`` overrides REC_LEN (to build damaged files). Returns its byte offset."""
        offset = self.bytes
        declared = len(payload) if length is None else length
        self.write_raw(struct.pack(self.order + "HBB", declared, typ, sub) + payload)
        return offset

    def write_raw(self, data: bytes) -> None:
        self.stream.write(data)
        self.bytes += len(data)

    def pack(self, fields: str, *values) -> bytes:
        """Fields by STDF type letter: B U1, H U2, I U4, b I1, h I2, f R4, C text (C*n)."""
        out = bytearray()
        for kind, value in zip(fields, values):
            if kind == "C":
                raw = _text_bytes(value)
                out += bytes([len(raw)]) + raw
            else:
                out += struct.pack(self.order + kind, value)
        return bytes(out)

    # records ---------------------------------------------------------------------------------------
    def far(self) -> int:
        return self.record(0, 10, bytes([BYTE_ORDERS[self.order], 4]))

    def atr(self, command_line: str, time: int = 0) -> int:
        return self.record(0, 20, self.pack("IC", time, command_line))

    def mir(self, *, lot: str = "", sublot: str = "", tester: str = "", tester_type: str = "", job: str = "",
            part_type: str = "", start_time: int = 0) -> int:
        # SETUP_T START_T STAT_NUM MODE_COD RTST_COD PROT_COD BURN_TIM CMOD_COD, then the names
        payload = (self.pack("IIB", start_time, start_time, 1) + b"P  " + self.pack("H", 65535) + b" "
                   + self.pack("CCCCCCC", lot, part_type, tester, tester_type, job, "", sublot))
        return self.record(1, 10, payload)

    def sdr(self, *, head: int = 1, sites: Iterable[int] = (), handler: str = "", probe_card: str = "") -> int:
        sites = list(sites)
        payload = self.pack("BBB", head, 0, len(sites)) + bytes(sites) + self.pack("CCCC", "", handler, "",
                                                                                       probe_card)
        return self.record(1, 80, payload)

    def pmr(self, index: int, name: str, *, head: int = 1, site: int = 1) -> int:
        return self.record(1, 60, self.pack("HHCCCBB", index, 0, name, "", name, head, site))

    def wir(self, wafer: str, *, head: int = 1, start_time: int = 0) -> int:
        return self.record(2, 10, self.pack("BBIC", head, 255, start_time, wafer))

    def wrr(self, wafer: str, *, head: int = 1, parts: int = 0, good: int = 0, finish_time: int = 0) -> int:
        return self.record(2, 20, self.pack("BBIIIIIIC", head, 255, finish_time, parts, 0xFFFFFFFF, 0xFFFFFFFF,
                                            good, 0xFFFFFFFF, wafer))

    def pir(self, head: int, site: int) -> int:
        offset = self.bytes
        out = np.zeros(6, np.uint8)
        self.write_raw(out[:_pir(out, 0, self.big, head, site)].tobytes())
        return offset

    def ptr(self, number: int, name: str, result: float, *, head: int = 1, site: int = 1, test_flg: int = 0,
            defaults: bool = False, low: float | None = None, high: float | None = None, units: str = "",
            scale: int = 0, opt_flag: int | None = None) -> int:
        """A PTR; with ``defaults`` it carries OPT_FLAG, RES_SCAL (=LLM/HLM_SCAL), limits and units.

        ``result``, ``low`` and ``high`` are in base units (as STDF stores them); ``opt_flag`` defaults to
        'no spec limits' plus 'no low/high limit' for a limit given as None.
        """
        names, _, name_len = _pool([name])
        unit_pool, _, units_len = _pool([units])
        opt = opt_flag if opt_flag is not None else (
            _NO_SPEC | (0x40 if low is None else 0) | (0x80 if high is None else 0))
        out = np.zeros(64 + int(name_len[0]) + int(units_len[0]), np.uint8)
        offset = self.bytes
        end = _ptr(out, 0, self.big, self._scratch, number, head, site, test_flg, result, names, 0,
                   int(name_len[0]), defaults, opt, scale, 0.0 if low is None else low,
                   0.0 if high is None else high, unit_pool, 0, int(units_len[0]))
        self.write_raw(out[:end].tobytes())
        return offset

    def mpr(self, number: int, name: str, results: list[float], *, head: int = 1, site: int = 1,
            test_flg: int = 0, pin_indexes: list[int] | None = None, low: float | None = None,
            high: float | None = None, units: str = "", scale: int = 0) -> int:
        """An MPR; with ``pin_indexes`` (PMR indexes, one per result) it also carries defaults (limits, units)."""
        full = pin_indexes is not None
        if full and len(pin_indexes) != len(results):
            raise ValueError(f"one PMR index per result: {len(pin_indexes)} indexes for {len(results)} results")
        names, _, name_len = _pool([name])
        unit_pool, _, units_len = _pool([units])
        opt = _NO_SPEC | (0x40 if low is None else 0) | (0x80 if high is None else 0)
        pmr = np.array(pin_indexes if full else [0] * len(results), np.int64)
        out = np.zeros(96 + 6 * len(results) + int(name_len[0]) + int(units_len[0]), np.uint8)
        offset = self.bytes
        end = _mpr(out, 0, self.big, self._scratch, number, head, site, test_flg, np.array(results, np.float32),
                   names, 0, int(name_len[0]), full, opt, scale, 0.0 if low is None else low,
                   0.0 if high is None else high, pmr, unit_pool, 0, int(units_len[0]))
        self.write_raw(out[:end].tobytes())
        return offset

    def prr(self, head: int, site: int, *, hard_bin: int = 1, soft_bin: int = 1, x: int = MISSING_COORD,
            y: int = MISSING_COORD, part_id: str = "", passed: bool = True, num_test: int = 0, test_time_ms: int = 0,
            part_flg: int | None = None) -> int:
        ids, _, id_len = _pool([part_id])
        flags = part_flg if part_flg is not None else (0 if passed else 0x08)
        out = np.zeros(32 + int(id_len[0]), np.uint8)
        offset = self.bytes
        end = _prr(out, 0, self.big, head, site, flags, num_test, hard_bin, soft_bin, x, y, test_time_ms, ids, 0,
                   int(id_len[0]))
        self.write_raw(out[:end].tobytes())
        return offset

    def bin_summary(self, hard: bool, number: int, count: int, passed: bool, name: str = "") -> int:
        """HBR (hard=True) or SBR for all sites (HEAD_NUM 255)."""
        payload = self.pack("BBHI", 255, 0, number, count) + (b"P" if passed else b"F") + self.pack("C", name)
        return self.record(1, 40 if hard else 50, payload)

    def mrr(self, finish_time: int = 0) -> int:
        return self.record(1, 20, self.pack("I", finish_time) + b" " + self.pack("CC", "", ""))


# ----------------------------------------------------------------------------------------------
# whole lots


def _open_out(path: str, final_name: str) -> BinaryIO:
    """``path`` opened for writing, compressed as the suffix of ``final_name`` says."""
    lower = final_name.lower()
    if lower.endswith(".gz"):
        return gzip.open(path, "wb", compresslevel=6)
    if lower.endswith(".bz2"):
        return bz2.open(path, "wb")
    if lower.endswith(".xz"):
        return lzma.open(path, "wb")
    return open(path, "wb")


def _chunks(data) -> tuple[Iterable[pd.DataFrame], list[TestMeta] | None]:
    if isinstance(data, ParametricTable):
        return [data.frame], list(data.tests)
    if isinstance(data, pd.DataFrame):
        return [data], None
    return data, None


@dataclass
class _RecordGroups:
    """What one part's test records look like: each group is one PTR test or all pins of one MPR test."""

    kinds: np.ndarray
    numbers: np.ndarray
    names: tuple[np.ndarray, np.ndarray, np.ndarray]
    units: tuple[np.ndarray, np.ndarray, np.ndarray]
    opts: np.ndarray
    low: np.ndarray
    high: np.ndarray
    member_at: np.ndarray      # group g's members are members[member_at[g]:member_at[g + 1]]
    members: np.ndarray        # indexes into the test list (the columns of the values matrix)
    pmr: np.ndarray            # per member: its PMR index (MPR pins)
    pins: dict[str, int]       # pin name -> PMR index

    @staticmethod
    def of(tests: list[TestMeta]) -> "_RecordGroups":
        """Pins of one test (number + name) become one MPR if they share limits and units (an MPR has one
        set); otherwise each pin is a PTR named "name@pin", which reads back as the same column."""
        by_test: dict[tuple, list[int]] = {}
        for i, t in enumerate(tests):
            key = (t.number, t.name) if t.pin is not None else ("ptr", i)
            by_test.setdefault(key, []).append(i)
        groups: list[tuple[int, list[int], str]] = []
        for key, indexes in by_test.items():
            shared = {(tests[i].low, tests[i].high, tests[i].units) for i in indexes}
            if key[0] != "ptr" and len(shared) == 1:
                groups.append((_MPR_GROUP, indexes, tests[indexes[0]].name))
            else:
                groups += [(_PTR_GROUP, [i], tests[i].name if tests[i].pin is None
                            else f"{tests[i].name}@{tests[i].pin}") for i in indexes]
        pins: dict[str, int] = {}
        pmr = np.zeros(len(tests), np.int64)
        for kind, indexes, _ in groups:
            if kind == _MPR_GROUP:
                for i in indexes:
                    pmr[i] = pins.setdefault(tests[i].pin, len(pins) + 1)
        heads = [tests[indexes[0]] for _, indexes, _ in groups]
        members = [i for _, indexes, _ in groups for i in indexes]
        return _RecordGroups(
            kinds=np.array([kind for kind, _, _ in groups], np.int64),
            # STDF needs a test number: a test without one gets its position (1-based)
            numbers=np.array([t.number if t.number is not None else indexes[0] + 1
                              for t, (_, indexes, _) in zip(heads, groups)], np.int64),
            names=_pool(name for _, _, name in groups), units=_pool(t.units for t in heads),
            opts=np.array([_NO_SPEC | (0x40 if t.low is None else 0) | (0x80 if t.high is None else 0) for t in heads],
                          np.uint8),
            # an absent limit is written as 0.0 and flagged absent in OPT_FLAG
            low=np.array([0.0 if t.low is None else t.low for t in heads], np.float64),
            high=np.array([0.0 if t.high is None else t.high for t in heads], np.float64),
            member_at=np.cumsum([0] + [len(indexes) for _, indexes, _ in groups]).astype(np.int64),
            members=np.array(members, np.int64), pmr=pmr[members] if members else pmr, pins=pins)


class _LotWriter:
    """State carried across chunks: which tests have had their defaults written, wafers, bins, part count."""

    def __init__(self, writer: StdfWriter, path: str, tests: list[TestMeta], sites_per_touchdown: int):
        self.w = writer
        self.path = path
        self.tests = tests
        self.groups = _RecordGroups.of(tests)
        self.sites_per_touchdown = sites_per_touchdown
        self.written = np.zeros(len(self.groups.kinds), np.bool_)
        self.results = np.zeros(1, np.int64)
        self.lot: str | None = None
        self.sublot: str | None = None
        self.wafer_of_head: dict[int, str] = {}
        self.wafer_counts: dict[tuple[int, str], list[int]] = {}
        self.bins: dict[tuple[bool, int], list[int]] = {}     # (hard?, bin) -> [parts, passed parts]
        self.parts = 0

    def header(self, first: pd.DataFrame, **mir) -> None:
        row = first.iloc[0] if len(first) else pd.Series(dtype=object)

        def text(column: str) -> str:
            value = row.get(column)
            return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)

        self.lot, self.sublot = text("lot"), text("sublot")
        stamp = row.get("timestamp")
        start = int(stamp) if stamp is not None and not pd.isna(stamp) else 0
        self.w.far()
        self.w.atr("edge-inference trainer.stdf_writer", start)
        self.w.mir(lot=mir.get("lot", self.lot), sublot=mir.get("sublot", self.sublot),
                   tester=mir.get("tester", text("tester")), job=mir.get("job", text("job")), start_time=start)
        self.w.sdr(handler=text("handler"), probe_card=text("probe_card"))
        for pin, index in self.groups.pins.items():
            self.w.pmr(index, pin)

    def chunk(self, frame: pd.DataFrame) -> None:
        if len(frame) == 0:
            return
        for column, held in (("lot", self.lot), ("sublot", self.sublot)):
            others = set(frame[column].dropna().astype(str)) - {held} if column in frame.columns else set()
            if others:
                raise DataError(f"an STDF file holds one {column} (MIR); write one file per {column}",
                                file=self.path, column=column, expected=repr(held), got=", ".join(sorted(others))[:200])
        heads = _int_column(frame, "head", 1)
        sites = _int_column(frame, "site", -1)
        wafers = (frame["wafer"].astype(object).where(frame["wafer"].notna(), "").astype(str).to_numpy()
                  if "wafer" in frame.columns else None)
        breaks = self._wafer_breaks(heads, wafers)
        for start, stop in zip(breaks[:-1], breaks[1:]):
            if wafers is not None:
                self._switch_wafer(int(heads[start]), wafers[start])
            self._parts(frame.iloc[start:stop], heads[start:stop], sites[start:stop],
                        None if wafers is None else wafers[start:stop])

    def _wafer_breaks(self, heads: np.ndarray, wafers: np.ndarray | None) -> list[int]:
        """Row positions where a new WIR is due (a head's wafer changes), plus 0 and n."""
        n = len(heads)
        if wafers is None:
            return [0, n]
        cuts = {0, n}
        for head in np.unique(heads):
            rows = np.flatnonzero(heads == head)
            seq = wafers[rows]
            changed = np.flatnonzero(seq[1:] != seq[:-1]) + 1
            cuts.update(int(rows[i]) for i in changed)
        return sorted(cuts)

    def _switch_wafer(self, head: int, wafer: str) -> None:
        current = self.wafer_of_head.get(head)
        if current == wafer:
            return
        if current is not None:
            self._close_wafer(head, current)
        self.w.wir(wafer, head=head)
        self.wafer_of_head[head] = wafer

    def _close_wafer(self, head: int, wafer: str) -> None:
        parts, good = self.wafer_counts.pop((head, wafer), [0, 0])
        self.w.wrr(wafer, head=head, parts=parts, good=good)

    def _parts(self, frame: pd.DataFrame, heads: np.ndarray, sites: np.ndarray, wafers) -> None:
        n, g = len(frame), self.groups
        touchdowns, sites = _touchdowns(heads, sites, self.sites_per_touchdown)
        values = (frame[[t.column for t in self.tests]].to_numpy(np.float32, na_value=np.nan) if self.tests
                  else np.zeros((n, 0), np.float32))
        passed = frame["passed"].astype(bool).to_numpy() if "passed" in frame.columns else np.ones(n, bool)
        hard = _int_column(frame, "hard_bin", 1)
        soft = _int_column(frame, "soft_bin", 65535)
        xs = _int_column(frame, "x", MISSING_COORD)
        ys = _int_column(frame, "y", MISSING_COORD)
        retest = _int_column(frame, "retest", 0)
        has_xy = (xs != MISSING_COORD) & (ys != MISSING_COORD)
        # PART_FLG bit 3: failed; bit 1 / bit 0: supersedes an earlier part with the same x, y / part id
        part_flg = np.where(passed, 0, 0x08) | np.where(retest > 0, np.where(has_xy, 0x02, 0x01), 0)
        test_t = (np.nan_to_num(frame["test_time_ms"].to_numpy(np.float64, na_value=np.nan)).round().astype(np.int64)
                  if "test_time_ms" in frame.columns else np.zeros(n, np.int64))
        if "part_id" in frame.columns:
            ids = frame["part_id"].astype(object).where(frame["part_id"].notna(), "").astype(str).tolist()
        else:
            ids = [str(self.parts + i + 1) for i in range(n)]
        id_pool, id_at, id_len = _pool(ids)
        names, name_at, name_len = g.names
        units, units_at, units_len = g.units
        member_count = np.diff(g.member_at)
        # exact upper bound of one part's bytes: PIR + PRR + every group's short record; defaults come once
        part_bytes = 6 + 4 + 21 + int(id_len.max(initial=0)) + int((4 + 13 + name_len + 4 * member_count).sum())
        defaults_bytes = int((48 + units_len + 2 * member_count).sum())
        block_starts = touchdowns[::max(1, ROWS_PER_BLOCK // max(1, self.sites_per_touchdown))]
        if block_starts[-1] != touchdowns[-1]:
            block_starts = np.append(block_starts, touchdowns[-1])
        for first, last in zip(block_starts[:-1], block_starts[1:]):
            block = touchdowns[(touchdowns >= first) & (touchdowns <= last)]
            out = np.empty((last - first) * part_bytes + defaults_bytes, np.uint8)
            used = _pack_parts(out, self.w.big, block - first, values[first:last], g.kinds, g.numbers, names,
                               name_at, name_len, self.written, g.opts, g.low, g.high, units, units_at,
                               units_len, g.member_at, g.members, g.pmr, heads[first:last], sites[first:last],
                               part_flg[first:last], hard[first:last], soft[first:last], xs[first:last],
                               ys[first:last], test_t[first:last], id_pool, id_at[first:last], id_len[first:last],
                               self.results)
            self.w.write_raw(out[:used].tobytes())
        self.parts += n
        self._count(hard, soft, passed, heads, wafers)

    def _count(self, hard, soft, passed, heads, wafers) -> None:
        tallies = pd.DataFrame({"hard": hard, "soft": soft, "ok": passed.astype(np.int64), "head": heads,
                                "wafer": wafers if wafers is not None else ""})
        for is_hard, column in ((True, "hard"), (False, "soft")):
            for number, (parts, good) in tallies.groupby(column)["ok"].agg(["size", "sum"]).iterrows():
                counts = self.bins.setdefault((is_hard, int(number)), [0, 0])
                counts[0] += int(parts)
                counts[1] += int(good)
        if wafers is not None:
            per_wafer = tallies.groupby(["head", "wafer"])["ok"].agg(["size", "sum"])
            for (head, wafer), (parts, good) in per_wafer.iterrows():
                counts = self.wafer_counts.setdefault((int(head), wafer), [0, 0])
                counts[0] += int(parts)
                counts[1] += int(good)

    def finish(self) -> None:
        for head, wafer in list(self.wafer_of_head.items()):
            self._close_wafer(head, wafer)
        for (hard, number), (count, good) in sorted(self.bins.items()):
            self.w.bin_summary(hard, number, count, passed=good * 2 >= count)
        self.w.mrr()


def _int_column(frame: pd.DataFrame, name: str, missing: int) -> np.ndarray:
    if name not in frame.columns:
        return np.full(len(frame), missing, np.int64)
    values = pd.to_numeric(frame[name], errors="coerce").to_numpy(np.float64, na_value=np.nan)
    return np.where(np.isnan(values), missing, values).astype(np.int64)


def _touchdowns(heads: np.ndarray, sites: np.ndarray, per_touchdown: int) -> tuple[np.ndarray, np.ndarray]:
    """Boundaries of consecutive rows tested together, and each row's site.

    A touchdown takes up to ``per_touchdown`` consecutive rows with distinct (head, site); rows without
    a site (-1) get their position in the touchdown.
    """
    n = len(heads)
    if per_touchdown <= 1:
        return np.arange(n + 1, dtype=np.int64), np.where(sites < 0, 1, sites)
    bounds, taken, start = [0], set(), 0
    assigned = sites.copy()
    for r in range(n):
        site = sites[r] if sites[r] >= 0 else r - start + 1
        if r - start == per_touchdown or (heads[r], site) in taken:
            bounds.append(r)
            start, taken = r, set()
            site = sites[r] if sites[r] >= 0 else 1
        assigned[r] = site
        taken.add((heads[r], site))
    bounds.append(n)
    return np.array(bounds, np.int64), assigned


def _tests_for(frame: pd.DataFrame, tests: list[TestMeta] | None) -> list[TestMeta]:
    if tests is None:
        tests = [TestMeta(column=c, name=str(c)) for c in frame.columns
                 if c not in IDENTITY_COLUMNS and c not in LABEL_COLUMNS]
    missing = [t.column for t in tests if t.column not in frame.columns]
    if missing:
        raise DataError("tests name columns absent from the data", expected="columns " + ", ".join(missing[:5]),
                        got=f"{len(frame.columns)} columns")
    return list(tests)


def write_stdf(path: str | Path, data: ParametricTable | pd.DataFrame | Iterable[pd.DataFrame],
               tests: list[TestMeta] | None = None, *, byte_order: str = "<", sites_per_touchdown: int = 1,
               lot: str | None = None, tester: str | None = None, job: str | None = None) -> StdfWritten:
    """Write a lot as STDF V4 (.gz/.bz2/.xz compress by suffix).

    ``data``: a ParametricTable, a DataFrame, or an iterable of DataFrame chunks (streamed; each chunk's
    identity columns as in trainer.table.IDENTITY_COLUMNS, label columns ignored). ``tests`` names the
    test columns (default: the table's tests, else every non-identity, non-label column of the first
    chunk). Per-pin tests (``pin`` set) sharing number, name, limits and units become one MPR; pins
    with their own limits become PTRs named "name@pin" (same column name when read back).
    ``sites_per_touchdown`` > 1 groups consecutive parts into multi-site touchdowns whose records
    interleave. ``lot``/``tester``/``job`` override the first row's values in the MIR. The file is
    written under a temporary name and renamed when complete.
    """
    path = str(path)
    chunks, table_tests = _chunks(data)
    tests = tests if tests is not None else table_tests
    mir = {k: v for k, v in (("lot", lot), ("tester", tester), ("job", job)) if v is not None}
    result = StdfWritten(path)
    partial = Path(path + ".partial")
    try:
        with _open_out(str(partial), path) as stream:
            writer = StdfWriter(stream, byte_order)
            lot_writer = None
            for frame in chunks:
                if lot_writer is None:
                    result.tests = _tests_for(frame, tests)
                    lot_writer = _LotWriter(writer, path, result.tests, sites_per_touchdown)
                    lot_writer.header(frame, **mir)
                lot_writer.chunk(frame)
            if lot_writer is None:
                raise DataError("nothing to write: no data chunks", file=path)
            lot_writer.finish()
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    result.lot, result.sublot = lot_writer.lot, lot_writer.sublot
    result.parts, result.results, result.bytes = lot_writer.parts, int(lot_writer.results[0]), writer.bytes
    return result


def write_stdf_lots(pattern: str | Path, data: ParametricTable | pd.DataFrame | Iterable[pd.DataFrame],
                    tests: list[TestMeta] | None = None, **options) -> list[StdfWritten]:
    """Write one STDF file per lot, or per sublot where the data has sublots (an STDF file's MIR names one lot and
    one sublot), streaming.

    ``pattern`` names the files with a ``{lot}`` placeholder, e.g. ``"out/{lot}.stdf.gz"``; a sublot's file puts
    ``<lot>_<sublot>`` there. Rows must come lot after lot (a lot that comes back later is refused).
    ``options`` as for ``write_stdf``.
    """
    pattern = str(pattern)
    if "{lot}" not in pattern:
        raise DataError("the output name needs a {lot} placeholder, one file is written per lot", file=pattern)
    chunks, table_tests = _chunks(data)
    tests = tests if tests is not None else table_tests
    pieces = _single_lot_pieces(chunks)
    ahead = next(pieces, None)
    written: list[StdfWritten] = []
    while ahead is not None:
        lot = ahead[0]
        if any(_file_lot(w.lot, w.sublot) == lot for w in written):
            raise DataError(f"lot {lot!r} comes back after another lot; rows must come lot after lot",
                            file=pattern, column="lot")

        def this_lot():
            nonlocal ahead
            while ahead is not None and ahead[0] == lot:
                yield ahead[1]
                ahead = next(pieces, None)

        written.append(write_stdf(pattern.format(lot=_file_safe(lot)), this_lot(), tests, **options))
    return written


def _single_lot_pieces(chunks: Iterable[pd.DataFrame]):
    """(lot, frame) pieces of the chunks, each piece one lot's (or sublot's: lot "<lot>_<sublot>") consecutive rows."""
    for frame in chunks:
        if "lot" not in frame.columns or len(frame) == 0:
            yield "", frame
            continue
        lots = np.array([_file_lot(lot, sublot) for lot, sublot in zip(_text(frame, "lot"), _text(frame, "sublot"))],
                        dtype=object)
        cuts = [0, *(np.flatnonzero(lots[1:] != lots[:-1]) + 1), len(lots)]
        for start, stop in zip(cuts[:-1], cuts[1:]):
            yield lots[start], frame.iloc[start:stop]


def _text(frame: pd.DataFrame, column: str) -> np.ndarray:
    if column not in frame.columns:
        return np.full(len(frame), "", dtype=object)
    return frame[column].astype(object).where(frame[column].notna(), "").astype(str).to_numpy()


def _file_lot(lot: str | None, sublot: str | None) -> str:
    return f"{lot}_{sublot}" if sublot else (lot or "")


def _file_safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "lot"
