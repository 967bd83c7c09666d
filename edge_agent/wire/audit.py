"""Audit batches: every decision an agent made, shipped to the collector over the stats link (STATS_PROTOCOL.md,
section ``audit``).

An audit batch travels exactly as a drift window does: numbered by its own spool stream, sent stop-and-wait, stored
by the collector in one transaction and only then acknowledged with the stats protocol's ``ack`` (or refused with
its ``error`` codes), deduplicated by (agent_id, spool.stream, seq). Only the body differs: a table of the models
that decided and one row per decision.
"""
from __future__ import annotations

import math
from typing import Any

from .stats import VERSION, InvalidMessage

AUDIT = "audit"
# One record per decision, in this order (the message carries the list, so a reader never guesses).
FIELDS = ("time", "head", "site", "lot", "sublot", "wafer", "x", "y", "part_id", "digest", "model", "outlier_score",
          "pass_probability", "bin", "flags")
MAX_RECORDS = 100_000
MAX_TEXT = 255
_IDENTITY = ("lot", "sublot", "wafer", "x", "y", "part_id")


def audit_message(agent_id: str, tester: str, body: dict) -> dict:
    """A batch before it is spooled; the spool adds ``seq`` and ``spool`` (the recorder builds ``body``)."""
    return {"type": AUDIT, "v": VERSION, "agent_id": agent_id, "tester": tester, **body}


def parse_audit(message: Any) -> dict:
    """Check every field the collector stores; InvalidMessage names the first bad one.

    >>> batch = {"type": "audit", "v": 1, "agent_id": "a", "tester": "t", "seq": 1, "fields": list(FIELDS),
    ...          "spool": {"stream": "s", "dropped_total": 0, "dropped_seq_ranges": [], "unspooled_lost": 0},
    ...          "models": [{"name": "m", "version": "1", "checksum": "c"}],
    ...          "records": [[1.0, 1, 0, "L1", None, 3, 10, -2, "p1", b"\\x9b\\x1f", 0, 0.1, 0.9, 1, []]]}
    >>> len(parse_audit(batch)["records"])
    1
    """
    if not isinstance(message, dict) or message.get("type") != AUDIT or message.get("v") != VERSION:
        raise InvalidMessage(f"expected a map of type {AUDIT!r} version {VERSION}")
    for key in ("agent_id", "tester"):
        _text(message.get(key), key, empty=key == "tester")
    if type(message.get("seq")) is not int or message["seq"] < 1:
        raise InvalidMessage(f"seq: expected an integer >= 1, got {message.get('seq')!r:.40}")
    spool = message.get("spool")
    if not isinstance(spool, dict) or not isinstance(spool.get("stream"), str) or not all(
            type(spool.get(key)) is int and spool[key] >= 0 for key in ("dropped_total", "unspooled_lost")):
        raise InvalidMessage("spool: expected stream (string), dropped_total and unspooled_lost (counts)")
    if message.get("fields") != list(FIELDS):
        raise InvalidMessage(f"fields: expected {list(FIELDS)}, got {message.get('fields')!r:.200}")
    models = message.get("models")
    if not isinstance(models, list) or not models:
        raise InvalidMessage("models: expected a non-empty list of {name, version, checksum}")
    for i, model in enumerate(models):
        if not isinstance(model, dict):
            raise InvalidMessage(f"models[{i}]: expected a map")
        for key in ("name", "version", "checksum"):
            _text(model.get(key), f"models[{i}].{key}")
    records = message.get("records")
    if not isinstance(records, list) or len(records) > MAX_RECORDS:
        raise InvalidMessage(f"records: expected a list of at most {MAX_RECORDS} decisions")
    for i, record in enumerate(records):
        _record(record, f"records[{i}]", len(models))
    return message


def _record(record: Any, where: str, n_models: int) -> None:
    if not isinstance(record, list) or len(record) != len(FIELDS):
        raise InvalidMessage(f"{where}: expected {len(FIELDS)} values ({', '.join(FIELDS)})")
    value = dict(zip(FIELDS, record))
    if not _number(value["time"]):
        raise InvalidMessage(f"{where}.time: expected unix seconds")
    for key in ("head", "site", "bin"):
        if type(value[key]) is not int or not 0 <= value[key] <= 65535:
            raise InvalidMessage(f"{where}.{key}: expected an integer in 0..65535, got {value[key]!r:.40}")
    for key in _IDENTITY:
        item = value[key]
        if item is not None and not (type(item) is int or (isinstance(item, str) and len(item) <= MAX_TEXT)):
            raise InvalidMessage(f"{where}.{key}: expected nil, an integer or a string, got {item!r:.40}")
    if not isinstance(value["digest"], bytes) or not 0 < len(value["digest"]) <= 64:
        raise InvalidMessage(f"{where}.digest: expected the readings' digest (1 to 64 bytes)")
    if type(value["model"]) is not int or not 0 <= value["model"] < n_models:
        raise InvalidMessage(f"{where}.model: expected an index into models (0..{n_models - 1})")
    for key in ("outlier_score", "pass_probability"):
        if value[key] is not None and not _number(value[key]):
            raise InvalidMessage(f"{where}.{key}: expected a finite number or nil")
    if not isinstance(value["flags"], list) or not all(isinstance(f, str) and len(f) <= 64 for f in value["flags"]):
        raise InvalidMessage(f"{where}.flags: expected a list of condition names")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _text(value: Any, where: str, *, empty: bool = False) -> None:
    if not isinstance(value, str) or len(value) > MAX_TEXT or not (value or empty):
        raise InvalidMessage(f"{where}: expected a {'' if empty else 'non-empty '}string of at most {MAX_TEXT} "
                             f"characters, got {value!r:.40}")
