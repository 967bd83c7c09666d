"""STDF V4 reader: one file (plain, .gz, .bz2, .xz; either byte order) -> ParametricTable.

Speed comes from one compiled pass (numba) over the byte stream, read in chunks: it walks the
record headers, skips every record it does not need by its length, frames parts by (head, site),
and writes each PTR/MPR result straight into a growing float32 parts x tests matrix. Python only
decodes the few records that carry identity or test metadata (MIR, SDR, WIR, PMR, HBR, SBR and the
first PTR/MPR of each test), so per-record Python work does not grow with the number of results.

Conventions (STDF V4 spec):
- RESULT and limits are stored in base units; RES_SCAL is the display exponent. The table shows a
  test in the display units its first PTR defines (result and limits times 10**RES_SCAL, units with
  the SI prefix), so results and limits of one column always share one unit.
- Limits, units and scaling come from the first PTR/MPR of a test that carries OPT_FLAG; later
  records may omit them (carried forward).
- TEST_FLG bit 1 (result invalid) or bit 4 (not executed) leaves the reading missing (NaN).
- A part is the records between PIR and PRR with the same (head, site); sites may interleave.
- Test identity is test number + TEST_TXT (+ pin position for MPR); a record with an empty TEST_TXT
  belongs to the named test with the same number seen first.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numba as nb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from numba import types
from numba.typed import Dict

from edge_agent.errors import DataError

from ..table import ParametricTable, TestMeta, test_column_name

RECORD_NAMES: dict[tuple[int, int], str] = {
    (0, 10): "FAR", (0, 20): "ATR", (0, 30): "VUR", (1, 10): "MIR", (1, 20): "MRR", (1, 30): "PCR",
    (1, 40): "HBR", (1, 50): "SBR", (1, 60): "PMR", (1, 62): "PGR", (1, 63): "PLR", (1, 70): "RDR",
    (1, 80): "SDR", (1, 90): "PSR", (1, 91): "NMR", (1, 92): "CNR", (1, 93): "SSR", (1, 94): "CDR",
    (2, 10): "WIR", (2, 20): "WRR", (2, 30): "WCR", (5, 10): "PIR", (5, 20): "PRR", (10, 30): "TSR",
    (15, 10): "PTR", (15, 15): "MPR", (15, 20): "FTR", (15, 30): "STR", (20, 10): "BPS", (20, 20): "EPS",
    (50, 10): "GDR", (50, 30): "DTR",
}
CPU_TYPES = {1: ">", 2: "<"}          # FAR CPU_TYP -> byte order (0, DEC VAX floats, is not supported)
TEST_FLG_NO_RESULT = 0x12             # bit 1: RESULT invalid, bit 4: test not executed
# RES_SCAL -> unit prefix (STDF V4, "scaling exponents")
SCALE_PREFIX = {15: "f", 12: "p", 9: "n", 6: "u", 3: "m", 2: "%", 0: "", -3: "K", -6: "M", -9: "G", -12: "T"}
MISSING_COORD = -32768

CHUNK_BYTES = 16 << 20
_MAX_RECORD = 4 + 0xFFFF

# record codes (REC_TYP * 256 + REC_SUB) the compiled pass acts on
_FAR, _MIR, _HBR, _SBR, _PMR, _SDR = 0 * 256 + 10, 1 * 256 + 10, 1 * 256 + 40, 1 * 256 + 50, 1 * 256 + 60, 1 * 256 + 80
_WIR, _PIR, _PRR, _PTR, _MPR = 2 * 256 + 10, 5 * 256 + 10, 5 * 256 + 20, 15 * 256 + 10, 15 * 256 + 15
_KNOWN = np.zeros(65536, np.bool_)
for _typ, _sub in RECORD_NAMES:
    _KNOWN[_typ * 256 + _sub] = True

# kernel return status
_MORE, _ROWS, _COLS, _FLUSH, _CORRUPT, _IDS = 0, 1, 2, 3, 4, 5
# kernel counters (indices into the int64 state array)
(_N_ROWS, _N_COLS, _N_DONE, _N_WAFERS, _N_EVENTS, _N_RARE, _N_RECORDS, _N_RESULTS, _DUPS, _ORPHANS,
 _INVALID, _SUSPECT, _ERR, _ERR_OFF, _ERR_CODE, _ERR_A, _ERR_B, _LAST_OFF, _LAST_CODE, _STRAY_PRR,
 _REOPENED, _N_ID_BYTES, _N_STATE) = range(23)
# corruption kinds
_E_SHORT, _E_TEXT, _E_ARRAY, _E_FAR = 1, 2, 3, 4
# part fields (columns of the int64 parts array)
(_P_HEAD, _P_SITE, _P_FLG, _P_HARD, _P_SOFT, _P_X, _P_Y, _P_TIME, _P_WAFER, _P_PRR_OFF, _P_PID_LEN,
 _N_PART_FIELDS) = range(12)
_PTR_KIND, _MPR_KIND = 0, 1


@dataclass(frozen=True)
class StdfStats:
    bytes: int           # STDF bytes read (after decompression)
    records: int
    parts: int
    tests: int
    results: int         # PTR/MPR results placed in the table
    flagged: int         # results TEST_FLG marks invalid or not executed (left missing)
    seconds: float


@dataclass
class StdfRead:
    table: ParametricTable
    problems: list[str] = field(default_factory=list)
    stats: StdfStats | None = None


# ----------------------------------------------------------------------------------------------
# compiled pass


@nb.njit(inline="always")
def _u16(b, i, big):
    if big:
        return (np.int64(b[i]) << 8) | np.int64(b[i + 1])
    return np.int64(b[i]) | (np.int64(b[i + 1]) << 8)


@nb.njit(inline="always")
def _u32(b, i, big):
    if big:
        return (np.int64(b[i]) << 24) | (np.int64(b[i + 1]) << 16) | (np.int64(b[i + 2]) << 8) | np.int64(b[i + 3])
    return np.int64(b[i]) | (np.int64(b[i + 1]) << 8) | (np.int64(b[i + 2]) << 16) | (np.int64(b[i + 3]) << 24)


@nb.njit(inline="always")
def _i16(b, i, big):
    v = _u16(b, i, big)
    return v - 65536 if v >= 32768 else v


@nb.njit(inline="always")
def _name_hash(b, start, length):
    h = np.uint64(14695981039346656037)
    for i in range(start, start + length):
        h = (h ^ np.uint64(b[i])) * np.uint64(1099511628211)
    return h


@nb.njit(inline="always")
def _test_key(num, name_hash, pin):
    return (name_hash ^ (np.uint64(num) * np.uint64(0x9E3779B97F4A7C15))
            ^ (np.uint64(pin + 2) * np.uint64(0xC2B2AE3D27D4EB4F)))


@nb.njit(inline="always")
def _text_end(b, p, end):
    """End of a C*n field at p: p itself if the record ends there, -1 if its length runs past ``end``."""
    if p >= end:
        return p
    q = p + 1 + np.int64(b[p])
    return q if q <= end else -1


@nb.njit(cache=True)
def _scan(buf, n, pos, base, big, known, st, open_row, wafer_of_head, parts, done_rows, ids, matrix, keys, named,
          cached_keys, cached_cols, col_state, events, rare, unknown_count, unknown_first):
    """Walk complete records of buf[pos:n]; returns (status, position to resume at).

    ``cached_keys``/``cached_cols`` are a direct-mapped cache in front of the ``keys`` dict: most
    lookups hit it, which is several times cheaper than the typed dict.
    """
    cache_mask = np.uint64(cached_keys.shape[0] - 1)
    bits = np.zeros(1, np.uint32)
    as_float = bits.view(np.float32)
    rows_cap = matrix.shape[0]
    cols_cap = matrix.shape[1]
    events_cap = events.shape[0]
    rare_cap = rare.shape[0]
    while True:
        if pos + 4 > n:
            return _MORE, pos
        length = _u16(buf, pos, big)
        body = pos + 4
        end = body + length
        if end > n:
            return _MORE, pos
        code = np.int64(buf[pos + 2]) * 256 + np.int64(buf[pos + 3])
        if code == _PTR or code == _MPR:
            if length < 12:
                st[_ERR] = _E_SHORT
                st[_ERR_A] = length
                break
            num = _u32(buf, body, big)
            slot = np.int64(buf[body + 4]) * 256 + np.int64(buf[body + 5])
            test_flg = buf[body + 6]
            if code == _PTR:
                kind = _PTR_KIND
                n_results = 1
                results_at = body + 8
                text_at = body + 12
            else:
                kind = _MPR_KIND
                n_states = _u16(buf, body + 8, big)
                n_results = _u16(buf, body + 10, big)
                results_at = body + 12 + (n_states + 1) // 2
                text_at = results_at + 4 * n_results
                if text_at > end:
                    st[_ERR] = _E_ARRAY
                    st[_ERR_A] = n_states
                    st[_ERR_B] = n_results
                    break
            name_end = _text_end(buf, text_at, end)
            alarm_end = _text_end(buf, name_end, end) if name_end >= 0 else -1
            if alarm_end < 0:
                st[_ERR] = _E_TEXT
                break
            has_opt = alarm_end < end
            if st[_N_COLS] + n_results > cols_cap:
                return _COLS, pos
            if st[_N_EVENTS] + n_results > events_cap:
                return _FLUSH, pos
            name_len = name_end - text_at - 1 if name_end > text_at else 0
            by_number = num * 2 + kind
            if name_len > 0:
                name_hash = _name_hash(buf, text_at + 1, name_len)
                if by_number not in named:
                    named[by_number] = name_hash
            elif by_number in named:
                name_hash = named[by_number]
            else:
                name_hash = np.uint64(0)
            row = open_row[slot]
            for p in range(n_results):
                key = _test_key(num, name_hash, p if kind == _MPR_KIND else -1)
                cached = np.int64(key & cache_mask)
                if cached_cols[cached] >= 0 and cached_keys[cached] == key:
                    col = cached_cols[cached]
                    emit = col_state[col] == 0 and has_opt
                elif key in keys:
                    col = keys[key]
                    emit = col_state[col] == 0 and has_opt
                else:
                    col = st[_N_COLS]
                    st[_N_COLS] += 1
                    keys[key] = col
                    emit = True
                cached_keys[cached] = key
                cached_cols[cached] = col
                if emit:
                    e = st[_N_EVENTS]
                    events[e, 0] = col
                    events[e, 1] = pos
                    events[e, 2] = p
                    events[e, 3] = 1 if has_opt else 0
                    st[_N_EVENTS] += 1
                    if has_opt:
                        col_state[col] = 1
                if test_flg & TEST_FLG_NO_RESULT:
                    st[_INVALID] += 1
                elif row < 0:
                    st[_ORPHANS] += 1
                else:
                    bits[0] = np.uint32(_u32(buf, results_at + 4 * p, big))
                    if not np.isnan(matrix[row, col]):
                        st[_DUPS] += 1
                    matrix[row, col] = as_float[0]
                    st[_N_RESULTS] += 1
        elif code == _PIR:
            if length < 2:
                st[_ERR] = _E_SHORT
                st[_ERR_A] = length
                break
            if st[_N_ROWS] == rows_cap:
                return _ROWS, pos
            slot = np.int64(buf[body]) * 256 + np.int64(buf[body + 1])
            if open_row[slot] >= 0:
                st[_REOPENED] += 1
            row = st[_N_ROWS]
            st[_N_ROWS] += 1
            open_row[slot] = row
            parts[row, _P_WAFER] = wafer_of_head[buf[body]]
        elif code == _PRR:
            if length < 2:
                st[_ERR] = _E_SHORT
                st[_ERR_A] = length
                break
            pid_end = _text_end(buf, body + 17, end)
            if pid_end < 0:
                st[_ERR] = _E_TEXT
                break
            if st[_N_ID_BYTES] + 256 > ids.shape[0]:
                return _IDS, pos
            slot = np.int64(buf[body]) * 256 + np.int64(buf[body + 1])
            row = open_row[slot]
            if row < 0:
                st[_STRAY_PRR] += 1
            else:
                open_row[slot] = -1
                parts[row, _P_HEAD] = buf[body]
                parts[row, _P_SITE] = buf[body + 1]
                # omitted trailing fields take the spec's "missing" values
                parts[row, _P_FLG] = buf[body + 2] if length > 2 else 0
                parts[row, _P_HARD] = _u16(buf, body + 5, big) if length >= 7 else 65535
                parts[row, _P_SOFT] = _u16(buf, body + 7, big) if length >= 9 else 65535
                parts[row, _P_X] = _i16(buf, body + 9, big) if length >= 11 else -32768
                parts[row, _P_Y] = _i16(buf, body + 11, big) if length >= 13 else -32768
                parts[row, _P_TIME] = _u32(buf, body + 13, big) if length >= 17 else 0
                parts[row, _P_PRR_OFF] = base + pos
                # PART_ID bytes go to one pool, in completion order, decoded at the end in one go
                id_len = pid_end - body - 18 if pid_end > body + 17 else 0
                at = st[_N_ID_BYTES]
                ids[at:at + id_len] = buf[body + 18:body + 18 + id_len]
                st[_N_ID_BYTES] += id_len
                parts[row, _P_PID_LEN] = id_len
                done_rows[st[_N_DONE]] = row
                st[_N_DONE] += 1
        elif code == _MIR or code == _SDR or code == _WIR or code == _PMR or code == _HBR or code == _SBR:
            if st[_N_RARE] == rare_cap:
                return _FLUSH, pos
            rare[st[_N_RARE], 0] = pos
            rare[st[_N_RARE], 1] = code
            st[_N_RARE] += 1
            if code == _WIR:
                if length >= 1:
                    wafer_of_head[buf[body]] = st[_N_WAFERS]
                st[_N_WAFERS] += 1          # counted like Python's list of WAFER_IDs, one per WIR
        elif code == _FAR:
            st[_ERR] = _E_FAR
            break
        elif not known[code]:
            if unknown_count[code] == 0:
                unknown_first[code] = base + pos
            unknown_count[code] += 1
            if st[_SUSPECT] < 0:
                st[_SUSPECT] = base + pos
            st[_N_RECORDS] += 1
            pos = end
            continue
        st[_SUSPECT] = -1
        st[_LAST_OFF] = base + pos
        st[_LAST_CODE] = code
        st[_N_RECORDS] += 1
        pos = end
    st[_ERR_OFF] = base + pos
    st[_ERR_CODE] = np.int64(buf[pos + 2]) * 256 + np.int64(buf[pos + 3])
    return _CORRUPT, pos


# ----------------------------------------------------------------------------------------------
# Python side: the few records decoded field by field


class _Fields:
    """Sequential reader of one record's fields; fields past the record's end read as the spec's missing value."""

    def __init__(self, data, start: int, end: int, order: str):
        self.data, self.pos, self.end, self.order = data, start, end, order

    def _take(self, size: int) -> int | None:
        """Position of the next ``size`` bytes, or None (and the record is used up) if they are not there."""
        if self.pos + size > self.end:
            self.pos = self.end
            return None
        self.pos += size
        return self.pos - size

    def _number(self, code: str, missing):
        at = self._take(struct.calcsize(code))
        return missing if at is None else struct.unpack_from(self.order + code, self.data, at)[0]

    def u1(self, missing=0):
        return self._number("B", missing)

    def u2(self, missing=0):
        return self._number("H", missing)

    def u4(self, missing=0):
        return self._number("I", missing)

    def i1(self, missing=None):
        return self._number("b", missing)

    def r4(self, missing=None):
        return self._number("f", missing)

    def char(self) -> str:
        at = self._take(1)
        return "" if at is None else bytes(self.data[at:at + 1]).decode("latin-1")

    def skip(self, size: int) -> None:
        self.pos = min(self.pos + size, self.end)

    def text(self) -> str:
        size = self.u1(missing=None)
        if not size:
            return ""
        size = min(size, self.end - self.pos)    # a text cut by the record's end keeps what is there
        at = self._take(size)
        return bytes(self.data[at:at + size]).decode("latin-1").strip()

    def u2_array(self, count: int) -> list[int]:
        values = []
        for _ in range(count):
            value = self.u2(missing=None)
            if value is None:
                break
            values.append(value)
        return values


@dataclass
class _TestInfo:
    kind: int
    number: int
    name: str
    pin_position: int | None = None
    scale: int = 0
    low: float | None = None
    high: float | None = None
    units: str = ""
    pmr_index: int | None = None


@dataclass
class _Context:
    lot: str = ""
    sublot: str = ""
    tester: str = ""
    job: str = ""
    mirs: int = 0
    wafers: list[str] = field(default_factory=list)
    equipment: dict[int, tuple[str, str]] = field(default_factory=dict)   # site -> (handler, probe card)
    default_equipment: tuple[str, str] | None = None
    pins: dict[int, str] = field(default_factory=dict)                      # PMR index -> pin name
    hard_bin_pass: dict[int, bool] = field(default_factory=dict)
    soft_bin_pass: dict[int, bool] = field(default_factory=dict)


def _record_length(data, start: int, order: str) -> int:
    return struct.unpack_from(order + "H", data, start)[0]


def _decode_rare(ctx: _Context, data, start: int, code: int, order: str) -> None:
    f = _Fields(data, start + 4, start + 4 + _record_length(data, start, order), order)
    if code == _MIR:
        ctx.mirs += 1
        if ctx.mirs > 1:
            return
        f.skip(15)   # SETUP_T START_T STAT_NUM MODE_COD RTST_COD PROT_COD BURN_TIM CMOD_COD
        ctx.lot, _part_type, node, tester_type, ctx.job, _job_rev, ctx.sublot = (f.text() for _ in range(7))
        ctx.tester = node or tester_type
    elif code == _WIR:
        f.skip(6)    # HEAD_NUM SITE_GRP START_T
        ctx.wafers.append(f.text())
    elif code == _SDR:
        f.skip(2)    # HEAD_NUM SITE_GRP
        sites = [f.u1() for _ in range(f.u1())]
        hand_type, hand_id, card_type, card_id = (f.text() for _ in range(4))
        equipment = (hand_id or hand_type, card_id or card_type)
        if ctx.default_equipment is None:
            ctx.default_equipment = equipment
        for site in sites:
            ctx.equipment.setdefault(site, equipment)
    elif code == _PMR:
        index = f.u2()
        f.skip(2)    # CHAN_TYP
        channel = f.text()
        f.text()     # PHY_NAM
        logical = f.text()
        ctx.pins.setdefault(index, logical or channel or str(index))
    else:            # HBR / SBR: HEAD_NUM SITE_NUM BIN_NUM BIN_CNT BIN_PF
        f.skip(2)
        number = f.u2()
        f.skip(4)
        verdict = f.char().upper()
        if verdict in ("P", "F"):
            (ctx.hard_bin_pass if code == _HBR else ctx.soft_bin_pass).setdefault(number, verdict == "P")


def _decode_test(info: _TestInfo | None, data, start: int, kind: int, pin_position: int, has_opt: bool,
                 order: str, names: dict[tuple[int, int], str], problems: list[str]) -> _TestInfo:
    """Test identity from a PTR/MPR; with has_opt also its defaults (scale, limits, units, pin)."""
    f = _Fields(data, start + 4, start + 4 + _record_length(data, start, order), order)
    number = f.u4()
    f.skip(4)                      # HEAD_NUM SITE_NUM TEST_FLG PARM_FLG
    n_states = 0
    if kind == _MPR_KIND:
        n_states, n_results = f.u2(), f.u2()
        f.skip((n_states + 1) // 2 + 4 * n_results)
    else:
        f.skip(4)                  # RESULT
    name = f.text()
    if info is None:
        if name:
            names.setdefault((kind, number), name)
        info = _TestInfo(kind, number, name or names.get((kind, number), ""),
                         pin_position if kind == _MPR_KIND else None)
    if not has_opt:
        return info
    f.text()                       # ALARM_ID
    opt = f.u1(missing=0xFF)
    res_scale = f.i1()
    f.skip(2)                      # LLM_SCAL HLM_SCAL: limits are shown in the results' units
    low, high = f.r4(), f.r4()
    if kind == _MPR_KIND:
        f.skip(8)                  # START_IN INCR_IN
        indexes = f.u2_array(n_states)
        if pin_position < len(indexes):
            info.pmr_index = indexes[pin_position]
    units = f.text()
    info.scale = res_scale if (res_scale is not None and not opt & 0x01) else 0
    if info.scale not in SCALE_PREFIX:   # not an exponent STDF defines: show base units, say so
        problems.append(f"test {number} {info.name!r}: RES_SCAL {info.scale} is not an STDF scaling exponent; "
                        "its results and limits are shown unscaled")
        info.scale = 0
    info.low = low if (low is not None and not opt & 0x50) else None
    info.high = high if (high is not None and not opt & 0xA0) else None
    info.units = units
    return info


# ----------------------------------------------------------------------------------------------
# the reading loop


class _Scan:
    """Kernel state and its growth; the arrays the compiled pass fills."""

    def __init__(self, big: bool):
        self.big = big
        self.state = np.zeros(_N_STATE, np.int64)
        self.state[_SUSPECT] = -1
        self.state[_LAST_OFF] = -1
        self.open_row = np.full(65536, -1, np.int64)
        self.wafer_of_head = np.full(256, -1, np.int64)
        self.parts = np.zeros((1024, _N_PART_FIELDS), np.int64)
        self.done_rows = np.zeros(1024, np.int64)
        self.ids = np.zeros(1 << 16, np.uint8)
        self.cached_keys = np.zeros(4096, np.uint64)
        self.cached_cols = np.full(4096, -1, np.int64)
        self.matrix = np.full((1024, 64), np.nan, np.float32)
        self.keys = Dict.empty(key_type=types.uint64, value_type=types.int64)
        self.named = Dict.empty(key_type=types.int64, value_type=types.uint64)
        self.col_state = np.zeros(64, np.int8)
        self.events = np.zeros((4096, 4), np.int64)
        self.rare = np.zeros((1024, 2), np.int64)
        self.unknown_count = np.zeros(65536, np.int64)
        self.unknown_first = np.zeros(65536, np.int64)

    def run(self, buf, n: int, pos: int, base: int) -> tuple[int, int]:
        status, pos = _scan(buf, n, pos, base, self.big, _KNOWN, self.state, self.open_row, self.wafer_of_head,
                            self.parts, self.done_rows, self.ids, self.matrix, self.keys, self.named,
                            self.cached_keys, self.cached_cols, self.col_state,
                            self.events, self.rare, self.unknown_count, self.unknown_first)
        return int(status), int(pos)

    def grow_rows(self, target: int = 0) -> None:
        """Room for ``target`` parts, at least twice the current room."""
        rows, cols = self.matrix.shape
        new_rows = max(rows * 2, target)
        matrix = np.full((new_rows, cols), np.nan, np.float32)
        matrix[:rows] = self.matrix
        self.matrix = matrix
        self.parts = np.concatenate([self.parts, np.zeros((new_rows - rows, _N_PART_FIELDS), np.int64)])
        self.done_rows = np.concatenate([self.done_rows, np.zeros(new_rows - rows, np.int64)])

    def grow_ids(self) -> None:
        self.ids = np.concatenate([self.ids, np.zeros_like(self.ids)])

    def grow_cols(self) -> None:
        """Double the test columns (an MPR needing more comes back and doubles again)."""
        rows, cols = self.matrix.shape
        new_cols = cols * 2
        matrix = np.full((rows, new_cols), np.nan, np.float32)
        matrix[:, :cols] = self.matrix
        self.matrix = matrix
        self.col_state = np.concatenate([self.col_state, np.zeros(new_cols - cols, np.int8)])


class _Reader:
    def __init__(self, path: str):
        self.path = path
        self.problems: list[str] = []
        self.ctx = _Context()
        self.tests: list[_TestInfo | None] = []
        self.names: dict[tuple[int, int], str] = {}
        self.order = "<"
        self.scan: _Scan | None = None
        self.bytes_read = 0
        self.damage_at: int | None = None
        self.plain_size: int | None = None     # bytes of an uncompressed file, to size the table early
        self.rows_sized = False

    # -- input --------------------------------------------------------------------------------
    def _open(self):
        with open(self.path, "rb") as handle:
            magic = handle.read(6)
        if magic[:2] == b"\x1f\x8b":
            return gzip.open(self.path, "rb")
        if magic[:3] == b"BZh":
            return bz2.open(self.path, "rb")
        if magic[:6] == b"\xfd7zXZ\x00":
            return lzma.open(self.path, "rb")
        self.plain_size = Path(self.path).stat().st_size
        return open(self.path, "rb")

    def _fill(self, stream, view) -> tuple[int, bool]:
        """Read into view until full or end of data; a broken compressed stream ends the data with a problem."""
        filled = 0
        while filled < len(view):
            try:
                # readinto1: what a decompressor produced before damage is returned, not lost with the error
                got = stream.readinto1(view[filled:])
            except (EOFError, OSError, zlib.error, lzma.LZMAError, ValueError) as error:
                at = self.bytes_read + filled
                self.problems.append(f"the compressed stream is damaged after {at:,} decompressed bytes "
                                     f"({str(error) or type(error).__name__}); what came before was read")
                self.damage_at = at if self.damage_at is None else self.damage_at
                return filled, True
            if not got:
                return filled, True
            filled += got
        return filled, False

    def _check_far(self, head: bytes) -> None:
        if len(head) < 6 or head[2] != 0 or head[3] != 10:
            shown = head[:16].hex(" ") if head else "an empty file"
            raise DataError("not an STDF file: it does not start with a FAR record", file=self.path,
                            expected="a FAR (REC_TYP 0, REC_SUB 10) in the first 6 bytes", got=shown)
        cpu, version = head[4], head[5]
        if cpu not in CPU_TYPES:
            raise DataError("unsupported FAR CPU_TYP", file=self.path, record="FAR", offset=4,
                            expected="1 (big-endian) or 2 (little-endian)", got=str(cpu))
        if version != 4:
            raise DataError("unsupported STDF version", file=self.path, record="FAR", offset=5,
                            expected="4", got=str(version))
        self.order = CPU_TYPES[cpu]

    # -- main loop ----------------------------------------------------------------------------
    def read(self) -> StdfRead:
        started = time.perf_counter()
        try:
            stream = self._open()
        except OSError as error:
            raise DataError(f"cannot open: {error.strerror or error}", file=self.path) from None
        chunk = min(CHUNK_BYTES, self.plain_size + 1) if self.plain_size is not None else CHUNK_BYTES
        with stream:
            buf = np.empty(chunk + _MAX_RECORD, np.uint8)
            view = memoryview(buf)
            n, eof = self._fill(stream, view[:chunk])
            self.bytes_read = n
            self._check_far(bytes(buf[:min(n, 6)]))
            self.scan = _Scan(self.order == ">")
            base, pos = 0, 6   # the FAR itself is done
            if _record_length(buf, 0, self.order) != 2:
                self.problems.append(f"byte offset 0, record FAR: it declares {_record_length(buf, 0, self.order)} "
                                     "bytes, the spec's FAR has 2; read as 2")
            self.scan.state[_N_RECORDS] = 1
            while True:
                pos, stop = self._scan_chunk(buf, n, pos, base)
                if stop:
                    break
                left = n - pos
                buf[:left] = buf[pos:n]
                base += pos
                pos = 0
                if eof:
                    if left:
                        self._truncated(buf, left, base)
                    break
                self._expect_parts(base)
                got, eof = self._fill(stream, view[left:left + chunk])
                self.bytes_read += got
                n = left + got
        table = self._table()
        stats = StdfStats(bytes=self.bytes_read, records=int(self.scan.state[_N_RECORDS]), parts=len(table),
                          tests=len(table.tests), results=int(self.scan.state[_N_RESULTS]),
                          flagged=int(self.scan.state[_INVALID]),
                          seconds=time.perf_counter() - started)
        return StdfRead(table, self.problems, stats)

    def _expect_parts(self, done_bytes: int) -> None:
        """After the first chunk of a plain file, make room for the parts its size suggests (saves regrowing)."""
        scan = self.scan
        if self.rows_sized or self.plain_size is None or scan.state[_N_ROWS] == 0 or done_bytes == 0:
            return
        self.rows_sized = True
        expected = int(scan.state[_N_ROWS] * self.plain_size / done_bytes * 1.05) + 1024
        if expected > scan.matrix.shape[0]:
            scan.grow_rows(expected)

    def _scan_chunk(self, buf, n: int, pos: int, base: int) -> tuple[int, bool]:
        scan = self.scan
        while True:
            status, pos = scan.run(buf, n, pos, base)
            self._collect(buf)
            if status == _MORE:
                return pos, False
            if status == _CORRUPT:
                self._corrupt()
                return pos, True
            if status == _ROWS:
                scan.grow_rows()
            elif status == _IDS:
                scan.grow_ids()
            elif status == _COLS:
                scan.grow_cols()
            # _FLUSH needs nothing more: _collect has emptied the event and record lists

    def _collect(self, buf) -> None:
        """Decode what the pass left for Python while the chunk is still in the buffer."""
        scan, st = self.scan, self.scan.state
        for i in range(int(st[_N_RARE])):
            _decode_rare(self.ctx, buf, int(scan.rare[i, 0]), int(scan.rare[i, 1]), self.order)
        st[_N_RARE] = 0
        for i in range(int(st[_N_EVENTS])):
            col, start, pin, has_opt = (int(v) for v in scan.events[i])
            kind = _PTR_KIND if buf[start + 2] == 15 and buf[start + 3] == 10 else _MPR_KIND
            while len(self.tests) <= col:
                self.tests.append(None)
            self.tests[col] = _decode_test(self.tests[col], buf, start, kind, pin, bool(has_opt), self.order,
                                           self.names, self.problems)
        st[_N_EVENTS] = 0

    # -- damage -------------------------------------------------------------------------------
    def _damage(self, offset: int, what: str) -> None:
        st = self.scan.state
        suspect = int(st[_SUSPECT])
        start = suspect if 0 <= suspect < offset else offset
        self.damage_at = start
        detail = what
        if start != offset:
            detail += (f"; the damage probably starts at byte offset {start:,}, the first unrecognised record "
                       f"after the last good one")
        if st[_LAST_OFF] >= 0:
            code = int(st[_LAST_CODE])
            detail += f" (last good record: {_record_name(code)} at byte offset {int(st[_LAST_OFF]):,})"
        self.problems.append(detail)

    def _truncated(self, buf, left: int, base: int) -> None:
        if left < 4:
            self._damage(base, f"byte offset {base:,}: the file ends inside a record header ({left} of 4 bytes)")
            return
        length = _record_length(buf, 0, self.order)
        name = _record_name(int(buf[2]) * 256 + int(buf[3]))
        self._damage(base, f"byte offset {base:,}, record {name}: the record declares {length} bytes but the "
                           f"file ends after {left - 4}; the file is truncated (or this record's length is corrupt)")

    def _corrupt(self) -> None:
        st = self.scan.state
        offset, kind, name = int(st[_ERR_OFF]), int(st[_ERR]), _record_name(int(st[_ERR_CODE]))
        reasons = {
            _E_SHORT: f"it is only {int(st[_ERR_A])} bytes long, shorter than its fixed fields",
            _E_TEXT: "a text field's length runs past the end of the record",
            _E_ARRAY: (f"its arrays ({int(st[_ERR_A])} pin states, {int(st[_ERR_B])} results) run past "
                       "the end of the record"),
            _E_FAR: "a second FAR (concatenated files are not supported)",
        }
        self._damage(offset, f"byte offset {offset:,}, record {name}: {reasons[kind]}; reading stopped there")

    # -- result ---------------------------------------------------------------------------------
    def _table(self) -> ParametricTable:
        scan, st = self.scan, self.scan.state
        done = scan.done_rows[:int(st[_N_DONE])]
        open_parts = int((scan.open_row >= 0).sum())
        keep = np.ones(len(done), bool)
        if self.damage_at is not None:
            keep = scan.parts[done, _P_PRR_OFF] < self.damage_at
            dropped = int((~keep).sum())
            self.problems.append(f"kept {int(keep.sum()):,} parts completed before the damage; dropped "
                                 f"{open_parts:,} parts still open there" +
                                 (f" and {dropped:,} completed after it" if dropped else ""))
        elif open_parts:
            self.problems.append(f"{open_parts:,} parts have a PIR but no PRR at the end of the file; dropped")
        rows = done[keep]                # PRR offsets grow with completion order: ``keep`` is a prefix
        self._report_oddities()
        frame = self._identity(rows, _part_ids(scan.ids, scan.parts[rows, _P_PID_LEN]))
        tests, columns = self._test_columns(rows)
        frame = pd.concat([frame, columns], axis=1)
        frame["retest"] = _retest_counts(frame, scan.parts[rows, _P_FLG])
        return ParametricTable(frame, tests, [self.path])

    def _report_oddities(self) -> None:
        st, scan = self.scan.state, self.scan
        for code in np.flatnonzero(scan.unknown_count):
            self.problems.append(f"skipped {int(scan.unknown_count[code]):,} records of unknown type "
                                 f"({code >> 8}, {code & 255}), the first at byte offset "
                                 f"{int(scan.unknown_first[code]):,}")
        notes = [
            (_DUPS, "results repeat a test already seen in the same part; the last one is kept"),
            (_ORPHANS, "valid PTR/MPR results lie outside any PIR/PRR of their head and site; ignored"),
            (_STRAY_PRR, "PRRs have no open PIR on their head and site; ignored"),
            (_REOPENED, "PIRs arrive while a part is still open on their head and site; the open part "
                        "was dropped"),
        ]
        for index, text in notes:
            if st[index]:
                self.problems.append(f"{int(st[index]):,} {text}")
        if self.ctx.mirs > 1:
            self.problems.append(f"{self.ctx.mirs} MIRs in one file; lot, tester and job come from the first")

    def _identity(self, rows: np.ndarray, part_ids: pd.Series) -> pd.DataFrame:
        ctx, parts = self.ctx, self.scan.parts[rows]
        n = len(rows)
        wafers = np.array(ctx.wafers + [""], dtype=object)   # index -1 (no WIR) -> ""
        sites = parts[:, _P_SITE]
        default = ctx.default_equipment or ("", "")
        equipment = [ctx.equipment.get(int(s), default) for s in sites]
        x = pd.array(parts[:, _P_X], dtype="Int32")
        y = pd.array(parts[:, _P_Y], dtype="Int32")
        x[parts[:, _P_X] == MISSING_COORD] = pd.NA
        y[parts[:, _P_Y] == MISSING_COORD] = pd.NA
        test_time = parts[:, _P_TIME].astype(np.float64)
        test_time[test_time == 0] = np.nan                      # TEST_T 0 means "not recorded"
        return pd.DataFrame({
            "lot": pd.Series([ctx.lot] * n, dtype="str"),
            "sublot": pd.Series([ctx.sublot] * n, dtype="str"),
            "wafer": pd.Series(wafers[parts[:, _P_WAFER]], dtype="str"),
            "x": x, "y": y,
            "head": parts[:, _P_HEAD].astype(np.int32),
            "site": sites.astype(np.int32),
            "part_id": part_ids,
            "test_time_ms": test_time,
            "hard_bin": parts[:, _P_HARD].astype(np.int32),
            "soft_bin": parts[:, _P_SOFT].astype(np.int32),
            "passed": self._passed(parts),
            "retest": np.zeros(n, np.int32),
            "tester": pd.Series([ctx.tester] * n, dtype="str"),
            "job": pd.Series([ctx.job] * n, dtype="str"),
            "handler": pd.Series([e[0] for e in equipment], dtype="str"),
            "probe_card": pd.Series([e[1] for e in equipment], dtype="str"),
        })

    def _passed(self, parts: np.ndarray) -> np.ndarray:
        """PART_FLG bit 3 (failed), unless bit 4 says it is not valid: then the bin's P/F from SBR or HBR."""
        flags = parts[:, _P_FLG]
        passed = (flags & 0x08) == 0
        unknown = np.flatnonzero(flags & 0x10)
        guessed = 0
        for i in unknown:
            soft, hard = int(parts[i, _P_SOFT]), int(parts[i, _P_HARD])
            verdict = self.ctx.soft_bin_pass.get(soft, self.ctx.hard_bin_pass.get(hard))
            if verdict is None:
                verdict, guessed = hard == 1, guessed + 1
            passed[i] = verdict
        if guessed:
            self.problems.append(f"{guessed:,} parts have no valid pass/fail flag and no SBR/HBR verdict for "
                                 "their bin; passed = (hard bin == 1) for them")
        return passed

    def _test_columns(self, rows: np.ndarray) -> tuple[list[TestMeta], pd.DataFrame]:
        n_cols, n = int(self.scan.state[_N_COLS]), len(rows)
        matrix = self.scan.matrix
        source = matrix[:n, :n_cols] if np.array_equal(rows, np.arange(n)) else matrix[rows, :n_cols]
        values = np.empty((n_cols, n), np.float64)    # column-major, as pandas keeps a float block
        values[...] = source.T
        metas, names_seen = [], set()
        for col in range(n_cols):
            info = self.tests[col]
            column = test_column_name(info.number, info.name, self._pin_name(info))
            if column in names_seen:   # two pins named alike by PMR: keep them apart by position
                column = test_column_name(info.number, info.name, f"{self._pin_name(info)}#{info.pin_position}")
            names_seen.add(column)
            values[col] = _scaled(values[col], info.scale)
            low, high = (None if v is None else float(_scaled(np.float64(v), info.scale))
                         for v in (info.low, info.high))
            metas.append(TestMeta(column=column, name=info.name, number=info.number,
                                  units=_scaled_units(info.units, info.scale), low=low, high=high,
                                  pin=self._pin_name(info)))
        self.scan.matrix = None        # the float32 matrix is no longer needed
        frame = pd.DataFrame(values.T, columns=[m.column for m in metas], copy=False)
        return metas, frame

    def _pin_name(self, info: _TestInfo) -> str | None:
        if info.kind != _MPR_KIND:
            return None
        if info.pmr_index is None:
            return f"#{info.pin_position}"
        return self.ctx.pins.get(info.pmr_index, str(info.pmr_index))


def _part_ids(pool: np.ndarray, lengths: np.ndarray) -> pd.Series:
    """PART_IDs from the pool of their bytes (in completion order); empty ids are missing."""
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    data = pool[:offsets[-1]]
    if data.size and data.max() >= 128:       # not ASCII: decode as Latin-1, as every other STDF text
        texts = [bytes(data[a:b]).decode("latin-1") for a, b in zip(offsets[:-1], offsets[1:])]
        array = pa.array(texts, pa.string())
    else:
        array = pa.StringArray.from_buffers(len(lengths), pa.py_buffer(offsets), pa.py_buffer(data.tobytes()))
    array = pc.utf8_trim_whitespace(array)
    array = pc.if_else(pc.equal(array, ""), pa.scalar(None, pa.string()), array)
    return pd.Series(array, dtype="str")


def _record_name(code: int) -> str:
    typ, sub = code >> 8, code & 255
    return RECORD_NAMES.get((typ, sub), f"of unknown type ({typ}, {sub})")


def _scaled(values, scale: int):
    """Base units -> display units (times 10**scale), rounded back to the record's float32 precision.

    Rounding keeps what the tester wrote: 0.035 A (float32) shows as 35.0 mA, not 35.00000014901161.
    """
    if scale == 0:
        return values
    scaled = values * 10.0 ** scale if scale >= 0 else values / 10.0 ** -scale
    return np.asarray(scaled, np.float32).astype(np.float64)


def _scaled_units(units: str, scale: int) -> str:
    return SCALE_PREFIX[scale] + units


def _retest_counts(frame: pd.DataFrame, part_flags: np.ndarray) -> np.ndarray:
    """0 for a part's first test, n for its n-th retest: same (lot, sublot, wafer, x, y), else same part id.

    A part whose PART_FLG says it supersedes an earlier one (bits 0/1) counts as a retest even when the
    earlier one is not in this file.
    """
    counts = np.zeros(len(frame), np.int64)
    scope = ["lot", "sublot", "wafer"]
    has_xy = frame["x"].notna().to_numpy() & frame["y"].notna().to_numpy()
    for mask, key in ((has_xy, scope + ["x", "y"]), (~has_xy & frame["part_id"].notna().to_numpy(),
                                                    scope + ["part_id"])):
        if mask.any():
            counts[mask] = frame.loc[mask, key].groupby(key, sort=False, dropna=False).cumcount().to_numpy()
    supersedes = (part_flags & 0x03) != 0
    counts[supersedes & (counts == 0)] = 1
    return counts.astype(np.int32)


def read_stdf(path: str | Path) -> StdfRead:
    """Read an STDF V4 file into a ParametricTable; damage becomes ``problems``, non-STDF a DataError."""
    path = str(path)
    if not Path(path).is_file():
        raise DataError("no such file", file=path)
    return _Reader(path).read()
