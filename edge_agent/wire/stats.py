"""The stats protocol (``edge-stats`` version 1): drift windows from an agent to the collector, acknowledged one by one.

Defined once here for both ends: the agent's shipping builds and sends windows, the collector validates and
acknowledges them. STATS_PROTOCOL.md beside this file documents every message.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROTOCOL = "edge-stats"
VERSION = 1


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


_NUMBER = (int, float)


def parse_stats(message: Any) -> StatsWindow:
    """Check every field the store and the alert rules read; InvalidMessage names the first bad one."""
    m = _fields(message, "message", {"type": str, "v": int, "agent_id": str, "tester": str, "seq": int,
                                     "model": dict, "window": dict, "columns": list, "bins": int,
                                     "expected_outlier_rate": _NUMBER, "reference": dict, "sites": list,
                                     "spool": dict})
    if m["type"] != "stats" or m["v"] != 1:
        raise InvalidMessage(f"expected type 'stats' version 1, got type {m['type']!r} version {m['v']!r}")
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
    return StatsWindow(m)


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
