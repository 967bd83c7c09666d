"""The agent's wire protocol (version 1): message types, error codes, decoding and validation.

Every message is one msgpack map (see PROTOCOL.md for each message with an example). This module
needs only numpy and msgpack, so the test program's client can share it without pulling in
onnxruntime.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
MAX_ID_CHARS = 128

# Request types (client -> agent) and the reply type each one gets.
SCORE, SCORE_BATCH, HEALTH, RELOAD, ROLLBACK = "score", "score_batch", "health", "reload", "rollback"
REPLY_TYPES = {SCORE: "score_result", SCORE_BATCH: "score_batch_result", HEALTH: "health_result",
               RELOAD: "reload_result", ROLLBACK: "rollback_result"}
ERROR = "error"

# Fields each request may carry (besides v, type, id).
REQUEST_FIELDS = {SCORE: {"part", "readings"}, SCORE_BATCH: {"parts"}, HEALTH: set(), RELOAD: {"version"},
                  ROLLBACK: set()}
ENVELOPE_FIELDS = {"v", "type", "id"}
BATCH_ITEM_FIELDS = {"part", "readings"}

# Part identity: field -> accepted Python types after msgpack decoding.
PART_FIELDS: dict[str, tuple[type, ...]] = {
    "lot": (str,), "sublot": (str, int), "wafer": (str, int), "x": (int,), "y": (int,), "head": (int,), "site": (int,),
    "part_id": (str, int),
}
DEFAULT_HEAD, DEFAULT_SITE = 1, 1


class Code:
    """Stable error codes. Clients may branch on them; they never change meaning within a protocol version.

    PROTOCOL.md gives the cause of each (tests/test_protocols.py keeps the two the same set).
    """

    MALFORMED_MESSAGE = "malformed_message"
    MESSAGE_TOO_LARGE = "message_too_large"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_TYPE = "unknown_type"
    MISSING_FIELD = "missing_field"
    UNKNOWN_FIELD = "unknown_field"
    WRONG_TYPE = "wrong_type"
    WRONG_READING_COUNT = "wrong_reading_count"
    UNKNOWN_TEST = "unknown_test"
    DUPLICATE_TEST = "duplicate_test"
    NON_FINITE_READING = "non_finite_reading"
    BATCH_TOO_LARGE = "batch_too_large"
    UNKNOWN_VERSION = "unknown_version"
    NOTHING_TO_ROLL_BACK = "nothing_to_roll_back"
    NOT_AUTHORIZED = "not_authorized"
    INTERNAL_ERROR = "internal_error"


class ProtocolError(Exception):
    """A request the agent cannot serve; becomes an ``error`` reply with ``code`` and ``message``."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Part:
    """Identity of one device. Only head, site, lot, sublot and wafer steer the agent (dynamic PAT windows)."""

    lot: str | None = None
    sublot: str | int | None = None
    wafer: str | int | None = None
    x: int | None = None
    y: int | None = None
    head: int = DEFAULT_HEAD
    site: int = DEFAULT_SITE
    part_id: str | int | None = None


_DEFAULT_PART = Part()


def decode(payload: bytes) -> dict:
    """One msgpack map with string keys, or ProtocolError(malformed_message)."""
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, TypeError) as error:
        # msgpack's ExtraData (trailing bytes), FormatError, StackError (nesting too deep) and truncated input are
        # ValueErrors, as is invalid UTF-8 in a string; keys that are not strings are refused (strict_map_key).
        raise ProtocolError(Code.MALFORMED_MESSAGE,
                            f"not a msgpack message: {type(error).__name__}{f': {error}' if str(error) else ''}"
                            ) from None
    if not isinstance(message, dict):
        raise ProtocolError(Code.MALFORMED_MESSAGE,
                            f"expected a msgpack map at the top level, got {_kind(message)}")
    return message


def request_id(message: dict) -> int | str | None:
    """The request id if it is usable for a reply, else None (the error reply then carries id null)."""
    rid = message.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (int, str)):
        return None
    if isinstance(rid, str) and len(rid) > MAX_ID_CHARS:
        return None
    return rid


def check_envelope(message: dict) -> str:
    """Validate v, type, id and the field names; returns the request type."""
    if "v" not in message:
        raise ProtocolError(Code.MISSING_FIELD, "field 'v' (protocol version) is missing")
    if type(message["v"]) is not int or message["v"] != PROTOCOL_VERSION:
        raise ProtocolError(Code.UNSUPPORTED_VERSION,
                            f"protocol version {_short(message['v'])} is not supported; this agent speaks "
                            f"v={PROTOCOL_VERSION}")
    kind = message.get("type")
    if kind is None:
        raise ProtocolError(Code.MISSING_FIELD, "field 'type' is missing")
    if not isinstance(kind, str):
        raise ProtocolError(Code.WRONG_TYPE, f"field 'type': expected a string, got {_kind(kind)}")
    if kind not in REQUEST_FIELDS:
        raise ProtocolError(Code.UNKNOWN_TYPE, f"unknown message type {_short(kind)}; expected one of "
                                               f"{', '.join(REQUEST_FIELDS)}")
    if "id" not in message:
        raise ProtocolError(Code.MISSING_FIELD, "field 'id' (request id) is missing")
    if request_id(message) is None:
        raise ProtocolError(Code.WRONG_TYPE, f"field 'id': expected an integer or a string of at most "
                                             f"{MAX_ID_CHARS} characters, got {_kind(message['id'])}")
    extra = message.keys() - ENVELOPE_FIELDS - REQUEST_FIELDS[kind]
    if extra:
        expected = ", ".join(sorted(ENVELOPE_FIELDS | REQUEST_FIELDS[kind]))
        raise ProtocolError(Code.UNKNOWN_FIELD, f"{kind} request: unknown field(s) {_names(sorted(extra, key=repr))};"
                                                f" expected {expected}")
    return kind


def parse_part(value: Any, where: str = "part") -> Part:
    """The part identity map; absent or nil fields are unknown (head and site default to 1)."""
    if value is None:
        return _DEFAULT_PART
    if not isinstance(value, dict):
        raise ProtocolError(Code.WRONG_TYPE, f"field '{where}': expected a map, got {_kind(value)}")
    for key, item in value.items():
        types = PART_FIELDS.get(key) if isinstance(key, str) else None
        if types is None:
            raise ProtocolError(Code.UNKNOWN_FIELD, f"field '{where}.{_short(key)}' is not a part identity field; "
                                                    f"expected any of {', '.join(PART_FIELDS)}")
        if item is not None and (isinstance(item, bool) or not isinstance(item, types)):
            expected = " or ".join("integer" if t is int else "string" for t in types)
            raise ProtocolError(Code.WRONG_TYPE, f"field '{where}.{key}': expected {expected} (or nil), "
                                                 f"got {_kind(item)}")
    return Part(**{key: item for key, item in value.items() if item is not None})


def parse_batch(message: dict, max_batch: int) -> list:
    parts = message.get("parts")
    if parts is None:
        raise ProtocolError(Code.MISSING_FIELD, "score_batch request: field 'parts' is missing")
    if not isinstance(parts, list):
        raise ProtocolError(Code.WRONG_TYPE, f"field 'parts': expected an array, got {_kind(parts)}")
    if len(parts) > max_batch:
        raise ProtocolError(Code.BATCH_TOO_LARGE, f"score_batch carries {len(parts)} parts; this agent accepts at "
                                                  f"most {max_batch} (max_batch)")
    return parts


def parse_batch_item(item: Any, i: int, parser: "ReadingsParser") -> tuple[Part, np.ndarray]:
    """One entry of a score_batch's ``parts``: (identity, float32 row), or ProtocolError naming parts[i]."""
    where = f"parts[{i}]"
    if not isinstance(item, dict):
        raise ProtocolError(Code.WRONG_TYPE, f"field '{where}': expected a map with part and readings, "
                                             f"got {_kind(item)}")
    extra = item.keys() - BATCH_ITEM_FIELDS
    if extra:
        raise ProtocolError(Code.UNKNOWN_FIELD, f"field '{where}': unknown field(s) "
                                                f"{_names(sorted(extra, key=repr))}; expected part, readings")
    return parse_part(item.get("part"), f"{where}.part"), parser.parse(item.get("readings"), f"{where}.readings")


class ReadingsParser:
    """Turns the ``readings`` field into one float32 row in the model's feature order.

    Accepted forms: an array of numbers in feature order; a map test -> number keyed by the test's
    column (``"1000:VDD_CORE"``) or, where unique, its name (``"VDD_CORE"``), absent tests = not run;
    or binary: little-endian float32 values in feature order. NaN means "test not run" and is imputed
    inside the ONNX graphs; +/-inf (or a value beyond float32 range) is refused.
    """

    def __init__(self, columns: list[str], names: list[str]):
        self.columns = list(columns)
        self.n_features = len(columns)
        self._index = {column: i for i, column in enumerate(columns)}
        counts: dict[str, int] = {}
        for name in names:
            counts[name] = counts.get(name, 0) + 1
        for i, name in enumerate(names):
            if counts[name] == 1 and name not in self._index:
                self._index[name] = i

    def parse(self, value: Any, where: str = "readings") -> np.ndarray:
        if isinstance(value, (bytes, bytearray)):
            row = self._from_binary(value, where)
        elif isinstance(value, list):
            row = self._from_array(value, where)
        elif isinstance(value, dict):
            row = self._from_map(value, where)
        elif value is None:
            raise ProtocolError(Code.MISSING_FIELD, f"field '{where}' is missing")
        else:
            raise ProtocolError(Code.WRONG_TYPE, f"field '{where}': expected an array of numbers, a map test -> "
                                                 f"number or float32 bytes, got {_kind(value)}")
        infinite = np.isinf(row)
        if infinite.any():
            raise ProtocolError(Code.NON_FINITE_READING, self._non_finite_message(row, infinite, where))
        return row

    def _from_binary(self, value: bytes, where: str) -> np.ndarray:
        if len(value) != 4 * self.n_features:
            raise ProtocolError(Code.WRONG_READING_COUNT,
                                f"field '{where}': {len(value)} bytes of float32 is {len(value) / 4:g} readings, "
                                f"the model has {self.n_features} features")
        return np.frombuffer(value, dtype="<f4").astype(np.float32)

    def _from_array(self, values: list, where: str) -> np.ndarray:
        if len(values) != self.n_features:
            raise ProtocolError(Code.WRONG_READING_COUNT,
                                f"field '{where}': got {len(values)} readings, the model has {self.n_features} "
                                f"features (in manifest order: {self._preview()})")
        if not _NUMBER_TYPES.issuperset(map(type, values)):
            i = next(i for i, v in enumerate(values) if type(v) not in _NUMBER_TYPES)
            raise ProtocolError(Code.WRONG_TYPE, f"field '{where}[{i}]' ({self.columns[i]}): expected a number, "
                                                 f"got {_kind(values[i])}")
        return self._to_float32(np.array(values, dtype=np.float64))

    def _from_map(self, values: dict, where: str) -> np.ndarray:
        row = np.full(self.n_features, np.nan, dtype=np.float64)
        given = np.zeros(self.n_features, dtype=bool)
        unknown = []
        for key, value in values.items():
            i = self._index.get(key)
            if i is None:
                unknown.append(key)
                continue
            if type(value) not in _NUMBER_TYPES:
                raise ProtocolError(Code.WRONG_TYPE, f"field '{where}[{key!r}]': expected a number, "
                                                     f"got {_kind(value)}")
            if given[i]:
                raise ProtocolError(Code.DUPLICATE_TEST, f"field '{where}': test {self.columns[i]!r} is given "
                                                         f"twice (by column and by name)")
            row[i], given[i] = value, True
        if unknown:
            raise ProtocolError(Code.UNKNOWN_TEST, f"field '{where}': unknown test(s) {_names(unknown)}; the model's "
                                                   f"tests are {self._preview()}")
        return self._to_float32(row)

    @staticmethod
    def _to_float32(row: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return row.astype(np.float32)   # beyond float32 range becomes inf and is refused by parse()

    def _non_finite_message(self, row: np.ndarray, infinite: np.ndarray, where: str) -> str:
        bad = np.flatnonzero(infinite)
        shown = ", ".join(self.columns[i] for i in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        return (f"field '{where}': {len(bad)} reading(s) infinite or beyond float32 range: {shown}; send NaN for a "
                f"test that did not run")

    def _preview(self) -> str:
        head = ", ".join(self.columns[:3])
        return f"{head}, ... ({self.n_features} in all)" if self.n_features > 3 else head


_NUMBER_TYPES = frozenset((int, float))


def error_reply(rid: int | str | None, code: str, message: str) -> dict:
    return {"v": PROTOCOL_VERSION, "type": ERROR, "id": rid, "code": code, "message": message}


def _short(value: Any, limit: int = 60) -> str:
    """repr() cut to ``limit`` characters: error messages must not echo a client's megabytes back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _names(keys) -> str:
    keys = list(keys)
    shown = ", ".join(_short(k) for k in keys[:5])
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _kind(value: Any) -> str:
    names = {dict: "map", list: "array", str: "string", bytes: "binary", bool: "boolean", int: "integer",
             float: "number", type(None): "nil"}
    return names.get(type(value), type(value).__name__)
