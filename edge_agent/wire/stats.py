"""The stats protocol (``edge-stats`` version 1): drift windows from an agent to the collector, acknowledged one by one.

Every message type, refusal code and the version live here, and both ends import them (the shape of the ZeroMQ
guide's Majordomo ``MDP.py``): the agent's shipping builds windows and classifies the replies, the collector
validates windows and builds the replies. STATS_PROTOCOL.md beside this file documents every message.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

VERSION = 1

# Message types: a window (agent -> collector) and the two replies (collector -> agent).
STATS, ACK, ERROR = "stats", "ack", "error"


class Code:
    """Refusal codes: the ``code`` of an ``error`` reply. They never change meaning within a protocol version."""

    INVALID_MESSAGE = "invalid_message"   # the window fails validation: it can never be stored
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
REFUSALS: dict[str, Reply] = {Code.INVALID_MESSAGE: Reply.PERMANENT, Code.STORE_FAILED: Reply.TRANSIENT,
                              Code.AGENT_ID_MISMATCH: Reply.PERMANENT}


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


def parse_stats(message: Any) -> StatsWindow:
    """Check every field the store and the alert rules read; InvalidMessage names the first bad one."""
    m = _fields(message, "message", {"type": str, "v": int, "agent_id": str, "tester": str, "seq": int,
                                     "model": dict, "window": dict, "columns": list, "bins": int,
                                     "expected_outlier_rate": _NUMBER, "reference": dict, "sites": list,
                                     "spool": dict})
    if m["type"] != STATS or m["v"] != VERSION:
        raise InvalidMessage(f"expected type {STATS!r} version {VERSION}, got type {m['type']!r} version {m['v']!r}")
    if not m["agent_id"] or m["seq"] < 1:
        raise InvalidMessage(f"agent_id must not be empty and seq must be >= 1, got {m['agent_id']!r}, {m['seq']}")
    _fields(m["model"], "model", {"name": str, "version": str, "checksum": str})
    _fields(m["window"], "window", {"start": _NUMBER, "end": _NUMBER, "closed_by": str, "parts": int,
                                    "unobserved_parts": int})
    _fields(m["spool"], "spool", {"stream": str, "dropped_total": int, "dropped_seq_ranges": list,
                                  "unspooled_lost": int})
    n_tests = len(m["columns"])
    if not all(isinstance(c, str) for c in m["columns"]):
        raise InvalidMessage("columns: expected a list of test names")
    reference = _fields(m["reference"], "reference", {"edges": list, "proportions": list, "missing_rate": list,
                                                      "score_edges": list, "score_proportions": list})
    bins = []
    for name in ("edges", "proportions", "missing_rate"):
        _length(reference[name], n_tests, f"reference.{name}")
    for i, (edges, proportions) in enumerate(zip(reference["edges"], reference["proportions"])):
        if not isinstance(proportions, list) or not isinstance(edges, list) or len(proportions) != len(edges) + 1:
            raise InvalidMessage(f"reference.proportions[{i}]: expected one proportion per bin (edges + 1)")
        bins.append(len(proportions))
    for i, site in enumerate(m["sites"]):
        where = f"sites[{i}]"
        s = _fields(site, where, {"head": int, "site": int, "parts": int, "outliers": int, "missing": list,
                                  "counts": list, "psi": list, "js": list, "ks": list, "score_counts": list,
                                  "change": dict})
        for name in ("missing", "counts", "psi", "js", "ks"):
            _length(s[name], n_tests, f"{where}.{name}")
        for name in ("psi", "js", "ks"):
            if not all(map(_number_or_nil, s[name])):
                raise InvalidMessage(f"{where}.{name}: expected a number or nil per test")
        for name in ("outlier_rate", "score_psi"):
            if not _number_or_nil(s.get(name)):
                raise InvalidMessage(f"{where}.{name}: expected a number or nil")
        for t, counts in enumerate(s["counts"]):
            if not isinstance(counts, list) or len(counts) != bins[t] or not _counts(counts):
                raise InvalidMessage(f"{where}.counts[{t}]: expected {bins[t]} bin counts (the reference's bins)")
        if not _counts(s["missing"]) or not _counts(s["score_counts"]):
            raise InvalidMessage(f"{where}.missing and .score_counts: expected counts (integers >= 0)")
        _fields(s["change"], f"{where}.change", {"fired": bool, "fires": int, "statistic": _NUMBER})
    check_shadow(m.get("shadow"))
    return StatsWindow(m)


def check_shadow(blocks: Any) -> None:
    """The optional ``shadow`` field: the challenger's agreement counts (nil or absent: no challenger ran)."""
    if blocks is None:
        return
    if not isinstance(blocks, list):
        raise InvalidMessage(f"shadow: expected a list of blocks, got {type(blocks).__name__}")
    for b, block in enumerate(blocks):
        where = f"shadow[{b}]"
        _fields(block, where, {"champion": dict, "challenger": dict, "skipped": int, "sites": list})
        for key in ("champion", "challenger"):
            _fields(block[key], f"{where}.{key}", {"name": str, "version": str, "checksum": str})
        for i, site in enumerate(block["sites"]):
            at = f"{where}.sites[{i}]"
            _fields(site, at, {"head": int, "site": int, "parts": int, "agree": int, "confusion": list,
                               "score_sums": dict, "outliers": list, "fails": list, "pat_disagree": list})
            _fields(site["score_sums"], f"{at}.score_sums", {"n": int, "sx": _NUMBER, "sy": _NUMBER, "sxx": _NUMBER,
                                                             "syy": _NUMBER, "sxy": _NUMBER})
            for key in ("outliers", "fails", "pat_disagree"):
                if len(site[key]) != 2 or not _counts(site[key]):
                    raise InvalidMessage(f"{at}.{key}: expected [champion, challenger] counts")
            if not all(isinstance(cell, list) and len(cell) == 3 and _counts(cell) for cell in site["confusion"]):
                raise InvalidMessage(f"{at}.confusion: expected [champion bin, challenger bin, parts] entries")


def _fields(value: Any, where: str, spec: dict[str, type | tuple]) -> dict:
    if not isinstance(value, dict):
        raise InvalidMessage(f"{where}: expected a map, got {type(value).__name__}")
    for key, kind in spec.items():
        if key not in value:
            raise InvalidMessage(f"{where}.{key}: missing")
        if not isinstance(value[key], kind) or (kind is int and isinstance(value[key], bool)):
            raise InvalidMessage(f"{where}.{key}: expected {getattr(kind, '__name__', 'a number')}, "
                                 f"got {type(value[key]).__name__}")
    return value


def _number_or_nil(value: Any) -> bool:
    return value is None or (isinstance(value, _NUMBER) and not isinstance(value, bool))


def _counts(values: list) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)


def _length(value: list, n: int, where: str) -> None:
    if not isinstance(value, list) or len(value) != n:
        raise InvalidMessage(f"{where}: expected {n} entries (one per test in columns), got "
                             f"{len(value) if isinstance(value, list) else type(value).__name__}")
