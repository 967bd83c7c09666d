"""The stats protocol (``edge-stats`` version 1): drift windows from an agent to the collector, acknowledged one by one.

Every message type, refusal code and the version live here, and both ends import them (the shape of the ZeroMQ
guide's Majordomo ``MDP.py``): the agent's shipping builds windows and classifies the replies, the collector
validates windows and builds the replies. STATS_PROTOCOL.md beside this file documents every message.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

from .codec import short_repr

VERSION = 1
CLOSED_BY = ("parts", "time", "shutdown", "model_change")   # why a window closed

# Message types: a window (agent -> collector) and the two replies (collector -> agent).
STATS, ACK, ERROR = "stats", "ack", "error"


class Code:
    """Refusal codes: the ``code`` of an ``error`` reply. They never change meaning within a protocol version."""

    INVALID_MESSAGE = "invalid_message"   # the window fails validation: it can never be stored
    UNSTORABLE = "unstorable"             # valid, but its store failed STORE_ATTEMPTS times with the database working
    STORE_FAILED = "store_failed"         # the collector could not write it now (disk full, database locked)
    AGENT_ID_MISMATCH = "agent_id_mismatch"   # agent_id is not the id the sender's CURVE key is bound to


class Reply(enum.Enum):
    """What a reply means for the window the agent is waiting on."""

    ACK = "ack"                 # stored: forget it
    PERMANENT = "permanent"     # can never be stored: drop it, a counted loss reported upstream
    TRANSIENT = "transient"     # not stored now: send it again after the ack timeout
    UNRELATED = "unrelated"     # not about this seq (a late reply to a window already settled): ignore it


# Every refusal code and what the agent does with it. A code missing here (a newer collector's) is transient:
# retrying a window costs a resend, dropping one loses it for good.
REFUSALS: dict[str, Reply] = {Code.INVALID_MESSAGE: Reply.PERMANENT, Code.UNSTORABLE: Reply.PERMANENT,
                              Code.STORE_FAILED: Reply.TRANSIENT, Code.AGENT_ID_MISMATCH: Reply.PERMANENT}


class InvalidMessage(ValueError):
    """A stats message that cannot be stored: says which field and what was expected."""


@dataclass(frozen=True)
class StatsWindow:
    """A validated stats message (protocol edge-stats v1)."""

    message: dict

    def __getitem__(self, key: str) -> Any:
        return self.message[key]

    @property
    def key(self) -> tuple[str, str, int]:
        return self.message["agent_id"], self.message["spool"]["stream"], self.message["seq"]

    @property
    def model_label(self) -> str:
        model = self.message["model"]
        return f"{model['name']}/{model['version']}"


# ---- builders -----------------------------------------------------------------------------------------------

def stats_message(agent_id: str, tester: str, body: dict) -> dict:
    """A window before it is spooled; the spool adds ``seq`` and ``spool`` (drift builds ``body``)."""
    return {"type": STATS, "v": VERSION, "agent_id": agent_id, "tester": tester, **body}


def ack(window: StatsWindow, duplicate: bool) -> dict:
    """The window is stored (committed), or was stored already (``duplicate``): the agent forgets it."""
    return {"type": ACK, "v": VERSION, "agent_id": window["agent_id"], "seq": window["seq"], "duplicate": duplicate}


def refusal(code: str, message: str, seq: int | None) -> dict:
    """An ``error`` reply; ``seq`` is None when the message was too broken to carry a usable one."""
    return {"type": ERROR, "v": VERSION, "code": code, "message": message, "seq": seq}


# ---- the agent's reading of a reply -----------------------------------------------------------------------------

def classify_reply(reply: Any, seq: int) -> Reply:
    """How the agent settles window ``seq`` on ``reply`` (a decoded message).

    >>> classify_reply(refusal(Code.INVALID_MESSAGE, "sites[0].counts: missing", 7), 7)
    <Reply.PERMANENT: 'permanent'>
    >>> classify_reply(refusal(Code.STORE_FAILED, "database is locked", 7), 7)
    <Reply.TRANSIENT: 'transient'>
    >>> classify_reply({"type": "ack", "v": 1, "agent_id": "a", "seq": 6, "duplicate": False}, 7)
    <Reply.UNRELATED: 'unrelated'>
    """
    if not isinstance(reply, dict) or reply.get("seq") != seq:
        return Reply.UNRELATED
    if reply.get("type") == ACK:
        return Reply.ACK
    if reply.get("type") == ERROR:
        return REFUSALS.get(reply.get("code"), Reply.TRANSIENT)
    return Reply.TRANSIENT      # a reply this agent cannot read: as if no ack came


# ---- the collector's validation -----------------------------------------------------------------------------

_NUMBER = (int, float)
MAX_COUNT = 2 ** 53            # counts, parts and seq: far beyond any real window, exact as floats, fit SQLite
MAX_NAME_CHARS = 255           # agent_id, tester, model name/version/checksum, spool stream
MAX_COLUMN_CHARS = 1024        # a test column name
MAX_DROPPED_RANGES = 100       # the latest [first, last] ranges an agent reports
HEAD_SITE_RANGE = (0, 255)     # STDF U1, as the agent's door takes them
MAX_SHADOW_BLOCKS = 16         # (champion, challenger) pairs in one window's shadow field
MAX_PAT_SCREENS = 8            # a package's PAT screen checks (static and dynamic today)
MAX_CONFUSION_CELLS = 4096     # (champion bin, challenger bin) cells of one site


def parse_stats(message: Any) -> StatsWindow:
    """Check every field the store and the alert rules read, its type and its range (what SQLite and the alert sums
    can hold: integers, finite numbers, bounded strings, one entry per (head, site)): a window that passes can be
    stored. InvalidMessage names the first bad field, the limit and the value."""
    m = _fields(message, "message", {"type": str, "v": int, "agent_id": str, "tester": str, "seq": int,
                                     "model": dict, "window": dict, "columns": list, "bins": int,
                                     "expected_outlier_rate": _NUMBER, "reference": dict, "sites": list,
                                     "spool": dict})
    if m["type"] != STATS or m["v"] != VERSION:
        raise InvalidMessage(f"expected type {STATS!r} version {VERSION}, got type {short_repr(m['type'])} version "
                             f"{short_repr(m['v'])}")
    _text(m["agent_id"], "agent_id", MAX_NAME_CHARS)
    _text(m["tester"], "tester", MAX_NAME_CHARS, empty=True)
    _integer(m["seq"], "seq", 1, MAX_COUNT)
    model = _fields(m["model"], "model", {"name": str, "version": str, "checksum": str})
    for key in ("name", "version", "checksum"):
        _text(model[key], f"model.{key}", MAX_NAME_CHARS)
    w = _fields(m["window"], "window", {"start": _NUMBER, "end": _NUMBER, "closed_by": str, "parts": int,
                                        "unobserved_parts": int})
    _finite(w["start"], "window.start")
    _finite(w["end"], "window.end")
    if w["closed_by"] not in CLOSED_BY:
        raise InvalidMessage(f"window.closed_by: expected one of {', '.join(CLOSED_BY)}, got "
                             f"{short_repr(w['closed_by'])}")
    _integer(w["parts"], "window.parts", 0, MAX_COUNT)
    _integer(w["unobserved_parts"], "window.unobserved_parts", 0, MAX_COUNT)
    _check_spool(_fields(m["spool"], "spool", {"stream": str, "dropped_total": int, "dropped_seq_ranges": list,
                                               "unspooled_lost": int}), m["seq"])
    n_tests = len(m["columns"])
    for t, column in enumerate(m["columns"]):
        _text(column, f"columns[{t}]", MAX_COLUMN_CHARS)
    _integer(m["bins"], "bins", 1, MAX_COUNT)
    _finite(m["expected_outlier_rate"], "expected_outlier_rate", 0.0, 1.0)
    reference = _fields(m["reference"], "reference", {"edges": list, "proportions": list, "missing_rate": list,
                                                      "score_edges": list, "score_proportions": list})
    bins = []
    for name in ("edges", "proportions", "missing_rate"):
        _length(reference[name], n_tests, f"reference.{name}")
    for i, (edges, proportions) in enumerate(zip(reference["edges"], reference["proportions"])):
        if not isinstance(proportions, list) or not isinstance(edges, list) or len(proportions) != len(edges) + 1:
            raise InvalidMessage(f"reference.proportions[{i}]: expected one proportion per bin (edges + 1)")
        _finite_list(edges, f"reference.edges[{i}]")
        _finite_list(proportions, f"reference.proportions[{i}]", 0.0, 1.0)
        bins.append(len(proportions))
    _finite_list(reference["missing_rate"], "reference.missing_rate", 0.0, 1.0)
    _finite_list(reference["score_edges"], "reference.score_edges")
    _finite_list(reference["score_proportions"], "reference.score_proportions", 0.0, 1.0)
    screens = reference.get("pat_screens", [])
    if not isinstance(screens, list) or len(screens) > MAX_PAT_SCREENS:
        raise InvalidMessage(f"reference.pat_screens: expected a list of at most {MAX_PAT_SCREENS} screens, got "
                             f"{short_repr(screens)}")
    for i, screen in enumerate(screens):
        where = f"reference.pat_screens[{i}]"
        _fields(screen, where, {"kind": str, "verdict": str, "good_parts": int, "good_flagged": int,
                                "fail_parts": int, "fail_flagged": int})
        for key in ("kind", "verdict"):
            _text(screen[key], f"{where}.{key}", MAX_NAME_CHARS)
        for parts, flagged in (("good_parts", "good_flagged"), ("fail_parts", "fail_flagged")):
            _integer(screen[parts], f"{where}.{parts}", 0, MAX_COUNT)
            _integer(screen[flagged], f"{where}.{flagged}", 0, screen[parts])
    score_bins = len(reference["score_proportions"])
    if score_bins != len(reference["score_edges"]) + 1:
        raise InvalidMessage("reference.score_proportions: expected one proportion per score bin (score_edges + 1)")
    sites = set()
    for i, site in enumerate(m["sites"]):
        where = f"sites[{i}]"
        s = _fields(site, where, {"head": int, "site": int, "parts": int, "outliers": int, "missing": list,
                                  "counts": list, "psi": list, "js": list, "ks": list, "score_counts": list,
                                  "change": dict})
        _integer(s["head"], f"{where}.head", *HEAD_SITE_RANGE)
        _integer(s["site"], f"{where}.site", *HEAD_SITE_RANGE)
        if (s["head"], s["site"]) in sites:
            raise InvalidMessage(f"{where}: head {s['head']} site {s['site']} appears twice in the window")
        sites.add((s["head"], s["site"]))
        _integer(s["parts"], f"{where}.parts", 0, MAX_COUNT)
        _integer(s["outliers"], f"{where}.outliers", 0, MAX_COUNT)
        for name in ("missing", "counts", "psi", "js", "ks"):
            _length(s[name], n_tests, f"{where}.{name}")
        for name in ("psi", "js", "ks"):
            _finite_list(s[name], f"{where}.{name}", nil=True)
        for name in ("outlier_rate", "score_psi"):
            if s.get(name) is not None:
                _finite(s[name], f"{where}.{name}")
        for t, counts in enumerate(s["counts"]):
            if not isinstance(counts, list) or len(counts) != bins[t]:
                raise InvalidMessage(f"{where}.counts[{t}]: expected {bins[t]} bin counts (the reference's bins)")
            _counts(counts, f"{where}.counts[{t}]")
        _counts(s["missing"], f"{where}.missing")
        if len(s["score_counts"]) != score_bins:
            raise InvalidMessage(f"{where}.score_counts: expected {score_bins} counts (the reference's score bins), "
                                 f"got {len(s['score_counts'])}")
        _counts(s["score_counts"], f"{where}.score_counts")
        change = _fields(s["change"], f"{where}.change", {"fired": bool, "fires": int, "statistic": _NUMBER})
        _integer(change["fires"], f"{where}.change.fires", 0, MAX_COUNT)
        _finite(change["statistic"], f"{where}.change.statistic")
    check_shadow(m.get("shadow"))
    return StatsWindow(m)


def check_shadow(blocks: Any) -> None:
    """The optional ``shadow`` field: the challenger's agreement counts (nil or absent: no challenger ran)."""
    if blocks is None:
        return
    if not isinstance(blocks, list) or len(blocks) > MAX_SHADOW_BLOCKS:
        raise InvalidMessage(f"shadow: expected a list of at most {MAX_SHADOW_BLOCKS} blocks, got {short_repr(blocks)}")
    for b, block in enumerate(blocks):
        where = f"shadow[{b}]"
        _fields(block, where, {"champion": dict, "challenger": dict, "skipped": int, "sites": list})
        _integer(block["skipped"], f"{where}.skipped", 0, MAX_COUNT)
        for key in ("champion", "challenger"):
            model = _fields(block[key], f"{where}.{key}", {"name": str, "version": str, "checksum": str})
            for field in ("name", "version", "checksum"):
                _text(model[field], f"{where}.{key}.{field}", MAX_NAME_CHARS)
        seen = set()
        for i, site in enumerate(block["sites"]):
            at = f"{where}.sites[{i}]"
            _fields(site, at, {"head": int, "site": int, "parts": int, "agree": int, "confusion": list,
                               "score_sums": dict, "outliers": list, "fails": list, "pat_disagree": list})
            _integer(site["head"], f"{at}.head", *HEAD_SITE_RANGE)
            _integer(site["site"], f"{at}.site", *HEAD_SITE_RANGE)
            if (site["head"], site["site"]) in seen:
                raise InvalidMessage(f"{at}: head {site['head']} site {site['site']} appears twice in the block")
            seen.add((site["head"], site["site"]))
            _integer(site["parts"], f"{at}.parts", 0, MAX_COUNT)
            _integer(site["agree"], f"{at}.agree", 0, site["parts"])
            sums = _fields(site["score_sums"], f"{at}.score_sums", {"n": int, "sx": _NUMBER, "sy": _NUMBER,
                                                                    "sxx": _NUMBER, "syy": _NUMBER, "sxy": _NUMBER})
            _integer(sums["n"], f"{at}.score_sums.n", 0, MAX_COUNT)
            for key in ("sx", "sy", "sxx", "syy", "sxy"):
                _finite(sums[key], f"{at}.score_sums.{key}")
            for key in ("outliers", "fails", "pat_disagree"):
                if len(site[key]) != 2:
                    raise InvalidMessage(f"{at}.{key}: expected [champion, challenger] counts")
                _counts(site[key], f"{at}.{key}")
            if len(site["confusion"]) > MAX_CONFUSION_CELLS:
                raise InvalidMessage(f"{at}.confusion: expected at most {MAX_CONFUSION_CELLS} cells")
            for c, cell in enumerate(site["confusion"]):
                if not isinstance(cell, list) or len(cell) != 3:
                    raise InvalidMessage(f"{at}.confusion[{c}]: expected [champion bin, challenger bin, parts]")
                _counts(cell, f"{at}.confusion[{c}]")


def _check_spool(spool: dict, seq: int) -> None:
    _text(spool["stream"], "spool.stream", MAX_NAME_CHARS)
    _integer(spool["dropped_total"], "spool.dropped_total", 0, MAX_COUNT)
    _integer(spool["unspooled_lost"], "spool.unspooled_lost", 0, MAX_COUNT)
    ranges = spool["dropped_seq_ranges"]
    if len(ranges) > MAX_DROPPED_RANGES:
        raise InvalidMessage(f"spool.dropped_seq_ranges: expected at most {MAX_DROPPED_RANGES} ranges, got "
                             f"{len(ranges)}")
    for i, pair in enumerate(ranges):
        if (not isinstance(pair, list) or len(pair) != 2 or type(pair[0]) is not int or type(pair[1]) is not int
                or not 1 <= pair[0] <= pair[1] < seq):
            raise InvalidMessage(f"spool.dropped_seq_ranges[{i}]: expected [first, last] with 1 <= first <= last < "
                                 f"seq {seq}, got {short_repr(pair)}")


def _fields(value: Any, where: str, spec: dict[str, type | tuple]) -> dict:
    if not isinstance(value, dict):
        raise InvalidMessage(f"{where}: expected a map, got {type(value).__name__}")
    for key, kind in spec.items():
        if key not in value:
            raise InvalidMessage(f"{where}.{key}: missing")
        if not isinstance(value[key], kind) or isinstance(value[key], bool) is not (kind is bool):
            raise InvalidMessage(f"{where}.{key}: expected {getattr(kind, '__name__', 'a number')}, "
                                 f"got {type(value[key]).__name__}")
    return value


def _integer(value: int, where: str, low: int, high: int) -> None:
    if not low <= value <= high:
        raise InvalidMessage(f"{where}: expected an integer in {low}..{high}, got {short_repr(value)}")


def _text(value: str, where: str, max_chars: int, *, empty: bool = False) -> None:
    if not isinstance(value, str) or len(value) > max_chars or not (value or empty):
        raise InvalidMessage(f"{where}: expected a {'' if empty else 'non-empty '}string of at most {max_chars} "
                             f"characters, got {short_repr(value)}"
                             + (f" ({len(value)} characters)" if isinstance(value, str) else ""))


def _finite(value: Any, where: str, low: float = -math.inf, high: float = math.inf) -> None:
    if (not isinstance(value, _NUMBER) or isinstance(value, bool) or not math.isfinite(value)
            or not low <= value <= high):
        raise InvalidMessage(f"{where}: expected a finite number" + (f" in [{low}, {high}]" if low > -math.inf else "")
                             + f", got {short_repr(value)}")


def _finite_list(values: list, where: str, low: float = -math.inf, high: float = math.inf, *,
                 nil: bool = False) -> None:
    if not isinstance(values, list):
        raise InvalidMessage(f"{where}: expected an array of numbers, got {type(values).__name__}")
    for i, value in enumerate(values):
        if not (nil and value is None):
            _finite(value, f"{where}[{i}]", low, high)


def _counts(values: list, where: str) -> None:
    if not isinstance(values, list):
        raise InvalidMessage(f"{where}: expected an array of counts, got {type(values).__name__}")
    for i, value in enumerate(values):
        if type(value) is not int or not 0 <= value <= MAX_COUNT:
            raise InvalidMessage(f"{where}[{i}]: expected a count (an integer in 0..{MAX_COUNT}), got "
                                 f"{short_repr(value)}")


def _length(value: list, n: int, where: str) -> None:
    if not isinstance(value, list) or len(value) != n:
        raise InvalidMessage(f"{where}: expected {n} entries (one per test in columns), got "
                             f"{len(value) if isinstance(value, list) else type(value).__name__}")
