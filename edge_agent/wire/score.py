"""The agent's wire protocol (version 1): message types, error codes, decoding, validation and the size bounds.

Every message is one msgpack map (see PROTOCOL.md for each message with an example). This module
needs only numpy and msgpack, so the test program's client can share it without pulling in
onnxruntime.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from .codec import decode_trusted, short_repr

PROTOCOL_VERSION = 1
MAX_ID_CHARS = 128
MAX_PAT_LISTED = 16            # PAT breaks listed per part in a reply (``pat_total`` counts them all)
# Identity as STDF writes it: strings are Cn (at most 255 bytes), head and site U1, x and y I2; integer sublot,
# wafer and part ids (not STDF, accepted for convenience) U4. Nothing larger can reach drift state or the collector.
MAX_IDENTITY_BYTES = 255
INTEGER_RANGES = {"head": (0, 255, "STDF U1"), "site": (0, 255, "STDF U1"), "x": (-32768, 32767, "STDF I2"),
                  "y": (-32768, 32767, "STDF I2"), "sublot": (0, 2 ** 32 - 1, "STDF U4"),
                  "wafer": (0, 2 ** 32 - 1, "STDF U4"), "part_id": (0, 2 ** 32 - 1, "STDF U4")}
# A score_batch larger than this is decoded a slice of parts at a time, as they are scored (``BatchParts``).
STREAM_PARTS_ABOVE_BYTES = 64 << 10

# Request types (client -> agent) and the reply type each one gets.
SCORE, SCORE_BATCH, HEALTH, RELOAD, ROLLBACK = "score", "score_batch", "health", "reload", "rollback"
SCORE_TOUCHDOWN = "score_touchdown"   # every site of one touchdown in one message, judged whole in one turn
REPLY_TYPES = {SCORE: "score_result", SCORE_BATCH: "score_batch_result",
               SCORE_TOUCHDOWN: "score_touchdown_result", HEALTH: "health_result", RELOAD: "reload_result",
               ROLLBACK: "rollback_result"}
MAX_TOUCHDOWN_PARTS = 64      # sites of one touchdown: a 64-site tester is the largest the agent judges whole
ERROR = "error"

# Fields each request may carry (besides v, type, id).
REQUEST_FIELDS = {SCORE: {"part", "readings"}, SCORE_BATCH: {"parts"}, SCORE_TOUCHDOWN: {"parts"},
                  HEALTH: {"stages_since"}, RELOAD: {"version"},
                  ROLLBACK: set()}
ENVELOPE_FIELDS = {"v", "type", "id", "deadline"}
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
    FIELD_OUT_OF_RANGE = "field_out_of_range"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    OVERLOADED = "overloaded"
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


def decode(payload) -> dict:
    """One msgpack map whose maps all have string keys, or ProtocolError(malformed_message).

    A message larger than STREAM_PARTS_ABOVE_BYTES keeps its ``parts`` array undecoded (``StreamedParts``): a
    score_batch is decoded a slice at a time as it is scored, so a large one never sits decoded in memory."""
    if len(payload) > STREAM_PARTS_ABOVE_BYTES and payload[0] in _MAP_MARKERS:
        return _decode_streaming_parts(payload)
    message = _unpack(payload, "")
    if not isinstance(message, dict):
        raise ProtocolError(Code.MALFORMED_MESSAGE,
                            f"expected a msgpack map at the top level, got {_kind(message)}")
    return message


def _unpack(payload, where: str) -> Any:
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False, object_hook=_string_keys)
    except (ValueError, TypeError) as error:
        # msgpack's ExtraData (trailing bytes), FormatError, StackError (nesting too deep) and truncated input are
        # ValueErrors, as are invalid UTF-8 in a string and a nested map key that is not a string (_string_keys).
        raise ProtocolError(Code.MALFORMED_MESSAGE, f"{where}not a valid msgpack message: {type(error).__name__}"
                                                    f"{f': {error}' if str(error) else ''}") from None


def _string_keys(value: dict) -> dict:
    """msgpack's object_hook, called for every decoded map: its keys must be strings."""
    for key in value:
        if type(key) is not str:
            raise ValueError(f"a map key is not a string: {short_repr(key)}")
    return value


_MAP_MARKERS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])


def _decode_streaming_parts(payload) -> dict:
    """The top-level map of a large message with ``parts``, when it is an array, left as ``StreamedParts``."""
    unpacker = msgpack.Unpacker(_Reader(payload), raw=False, strict_map_key=False, object_hook=_string_keys)
    message: dict = {}
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if type(key) is not str:
                raise ValueError(f"a map key is not a string: {short_repr(key)}")
            if key != "parts":
                message[key] = unpacker.unpack()
                continue
            start = unpacker.tell()
            unpacker.skip()
            count = _array_length(payload, start)
            message[key] = (StreamedParts(payload, start, count) if count is not None
                            else _unpack(payload[start:unpacker.tell()], "field 'parts': "))
        if unpacker.tell() != len(payload):
            raise ValueError(f"{len(payload) - unpacker.tell()} bytes after the message")
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise ProtocolError(Code.MALFORMED_MESSAGE, f"not a valid msgpack message: {type(error).__name__}"
                                                    f"{f': {error}' if str(error) else ''}") from None
    return message


def _array_length(payload, at: int) -> int | None:
    """The element count of the msgpack array whose header starts at ``at``; None if no array starts there."""
    marker = payload[at]
    if 0x90 <= marker <= 0x9F:
        return marker & 0x0F
    if marker in (0xDC, 0xDD):
        size = 2 if marker == 0xDC else 4
        return int.from_bytes(payload[at + 1:at + 1 + size], "big")
    return None


class _Reader:
    """A file over a buffer (bytes, or a ZeroMQ frame's memoryview), for msgpack's streaming Unpacker: only the chunks
    it reads are copied."""

    __slots__ = ("_view", "_at")

    def __init__(self, buffer, at: int = 0):
        self._view = memoryview(buffer)
        self._at = at

    def read(self, n: int) -> bytes:
        chunk = bytes(self._view[self._at:self._at + n])
        self._at += len(chunk)
        return chunk


def peek_id(payload) -> int | str | None:
    """The request id, read without decoding the rest: for answering a request the agent will not serve (over its
    client's share, or waiting too long) at the cost of its first fields. None when it has no usable one."""
    unpacker = msgpack.Unpacker(_Reader(payload), raw=False, read_size=4096)
    try:
        for _ in range(unpacker.read_map_header()):
            if unpacker.unpack() == "id":
                return request_id({"id": unpacker.unpack()})
            unpacker.skip()
    except (ValueError, TypeError, msgpack.UnpackException):
        pass
    return None


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
                            f"protocol version {short_repr(message['v'])} is not supported; this agent speaks "
                            f"v={PROTOCOL_VERSION}")
    kind = message.get("type")
    if kind is None:
        raise ProtocolError(Code.MISSING_FIELD, "field 'type' is missing")
    if not isinstance(kind, str):
        raise ProtocolError(Code.WRONG_TYPE, f"field 'type': expected a string, got {_kind(kind)}")
    if kind not in REQUEST_FIELDS:
        raise ProtocolError(Code.UNKNOWN_TYPE, f"unknown message type {short_repr(kind)}; expected one of "
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


def check_deadline(deadline: Any, now: float) -> None:
    """A request's ``deadline`` (Unix seconds on the agent's clock) must be a finite number not yet passed at
    ``now``: past it nobody waits for the answer, and the agent answers deadline_exceeded instead of scoring."""
    if type(deadline) not in _NUMBER_TYPES:
        raise ProtocolError(Code.WRONG_TYPE, f"field 'deadline': expected a number (Unix time in seconds), "
                                             f"got {_kind(deadline)}")
    if not math.isfinite(deadline):
        raise ProtocolError(Code.FIELD_OUT_OF_RANGE, f"field 'deadline': expected a finite Unix time in seconds, "
                                                     f"got {deadline}")
    if now > deadline:
        raise ProtocolError(Code.DEADLINE_EXCEEDED, f"the request's deadline {deadline:.6f} passed "
                                                    f"{(now - deadline) * 1e3:.1f} ms before the agent could serve "
                                                    f"it; not scored")


def check_stages_since(since: Any) -> int:
    """A health request's ``stages_since``: the sample number (``stages.taken`` of an earlier reply) after which the
    per-stage breakdown starts."""
    if type(since) is not int:
        raise ProtocolError(Code.WRONG_TYPE, f"field 'stages_since': expected a sample number (integer), got "
                                             f"{_kind(since)}")
    return since


def parse_part(value: Any, where: str = "part") -> Part:
    """The part identity map; absent or nil fields are unknown (head and site default to 1). Every value is checked
    against its STDF range (INTEGER_RANGES, MAX_IDENTITY_BYTES): nothing larger reaches PAT, drift or the collector."""
    if value is None:
        return _DEFAULT_PART
    if not isinstance(value, dict):
        raise ProtocolError(Code.WRONG_TYPE, f"field '{where}': expected a map, got {_kind(value)}")
    for key, item in value.items():
        types = PART_FIELDS.get(key)
        if types is None:
            raise ProtocolError(Code.UNKNOWN_FIELD, f"field '{where}.{short_repr(key)}' is not a part identity field; "
                                                    f"expected any of {', '.join(PART_FIELDS)}")
        kind = type(item)
        if kind is str and str in types:
            # Fewer than 64 characters cannot exceed 255 bytes of UTF-8: most identities skip the encoding.
            if len(item) > MAX_IDENTITY_BYTES // 4 and len(item.encode()) > MAX_IDENTITY_BYTES:
                raise ProtocolError(Code.FIELD_OUT_OF_RANGE,
                                    f"field '{where}.{key}': {short_repr(item)} is {len(item.encode())} bytes of "
                                    f"UTF-8; expected at most {MAX_IDENTITY_BYTES} (an STDF Cn string)")
        elif kind is int and int in types:
            low, high, stdf = INTEGER_RANGES[key]
            if not low <= item <= high:
                raise ProtocolError(Code.FIELD_OUT_OF_RANGE, f"field '{where}.{key}': {item} is out of range; "
                                                             f"expected {low}..{high} ({stdf})")
        elif item is not None:
            expected = " or ".join("integer" if t is int else "string" for t in types)
            raise ProtocolError(Code.WRONG_TYPE, f"field '{where}.{key}': expected {expected} (or nil), "
                                                 f"got {_kind(item)}")
    return Part(**{key: item for key, item in value.items() if item is not None})


class BatchParts:
    """A score_batch's ``parts``, handed out ``take(n)`` at a time; an entry that is not valid msgpack comes out as
    its ProtocolError (the other entries are still scored)."""

    def __init__(self, items: list):
        self._items = items
        self._next = 0

    def __len__(self) -> int:
        return len(self._items)

    def take(self, n: int) -> list:
        taken = self._items[self._next:self._next + n]
        self._next += len(taken)
        return taken


class StreamedParts(BatchParts):
    """The ``parts`` array of a large message, decoded entry by entry on ``take``: the request's bytes stay the only
    copy while it waits for its turns."""

    def __init__(self, payload, offset: int, count: int):
        self._payload = payload
        self._offset = offset
        self._count = count
        self._next = 0
        self._unpacker: msgpack.Unpacker | None = None

    def __len__(self) -> int:
        return self._count

    def take(self, n: int) -> list:
        if self._unpacker is None:
            self._unpacker = msgpack.Unpacker(_Reader(self._payload, self._offset), raw=False)
            self._unpacker.read_array_header()   # the envelope's skip() checked the array's structure
        unpacker, items = self._unpacker, []
        for i in range(self._next, min(self._next + n, self._count)):
            start = self._offset + unpacker.tell()
            unpacker.skip()
            try:
                items.append(_unpack(self._payload[start:self._offset + unpacker.tell()], f"field 'parts[{i}]': "))
            except ProtocolError as error:
                items.append(error)
        self._next += len(items)
        return items


def parse_batch(message: dict, max_batch: int) -> BatchParts:
    """A score_batch's or score_touchdown's ``parts`` (a touchdown at most ``MAX_TOUCHDOWN_PARTS``)."""
    kind = message.get("type")
    parts = message.get("parts")
    if parts is None:
        raise ProtocolError(Code.MISSING_FIELD, f"{kind} request: field 'parts' is missing")
    if not isinstance(parts, (list, StreamedParts)):
        raise ProtocolError(Code.WRONG_TYPE, f"field 'parts': expected an array, got {_kind(parts)}")
    if kind == SCORE_TOUCHDOWN and len(parts) > MAX_TOUCHDOWN_PARTS:
        raise ProtocolError(Code.BATCH_TOO_LARGE, f"score_touchdown carries {len(parts)} parts; a touchdown has at "
                                                  f"most {MAX_TOUCHDOWN_PARTS} sites (send more as a score_batch)")
    if len(parts) > max_batch:
        raise ProtocolError(Code.BATCH_TOO_LARGE, f"{kind} carries {len(parts)} parts; this agent accepts at "
                                                  f"most {max_batch} (max_batch)")
    return parts if isinstance(parts, StreamedParts) else BatchParts(parts)


def parse_batch_item(item: Any, i: int, parser: "ReadingsParser") -> tuple[Part, np.ndarray]:
    """One entry of a score_batch's ``parts``: (identity, float32 row), or ProtocolError naming parts[i]."""
    where = f"parts[{i}]"
    if isinstance(item, ProtocolError):
        raise item
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


def request_message(kind: str, rid: int | str, **fields) -> dict:
    """A request of type ``kind`` (SCORE, SCORE_BATCH, SCORE_TOUCHDOWN, HEALTH, RELOAD, ROLLBACK) with its
    ``fields``."""
    return {"v": PROTOCOL_VERSION, "type": kind, "id": rid, **fields}


def decode_reply(payload) -> Any:
    """An agent's reply as the client reads it (the client checks the fields it uses), or
    ProtocolError(malformed_message)."""
    try:
        return decode_trusted(payload)
    except ValueError as error:   # msgpack's ExtraData, FormatError, StackError and truncated input
        raise ProtocolError(Code.MALFORMED_MESSAGE, f"not a valid msgpack reply: {type(error).__name__}") from None


def error_reply(rid: int | str | None, code: str, message: str) -> dict:
    return {"v": PROTOCOL_VERSION, "type": ERROR, "id": rid, "code": code, "message": message}


def score_reply(rid: int | str | None, result: dict, model: dict) -> dict:
    """A score_result: one part's ``part_result`` and the identity of the model that decided it."""
    return {"v": PROTOCOL_VERSION, "type": REPLY_TYPES[SCORE], "id": rid, **result, "model": model}


def batch_reply(rid: int | str | None, model: dict, kind: str = SCORE_BATCH) -> dict:
    """A score_batch_result's (score_touchdown_result's) fields besides its results (``encode_batch_reply`` adds
    those)."""
    return {"v": PROTOCOL_VERSION, "type": REPLY_TYPES[kind], "id": rid, "model": model}


def batch_item_error(code: str, message: str) -> dict:
    """The result of a score_batch part that cannot be scored."""
    return {"error": {"code": code, "message": message}}


def control_reply(kind: str, rid: int | str | None, **fields) -> dict:
    """The reply to a HEALTH, RELOAD or ROLLBACK request, with its ``fields``."""
    return {"v": PROTOCOL_VERSION, "type": REPLY_TYPES[kind], "id": rid, **fields}


def part_result(outlier_score: float | None, outlier: bool | None, pass_probability: float | None,
                predicted_fail: bool | None, decision, breaks: list, drivers, tests_present: int, *,
                insufficient: bool = False) -> dict:
    """One part's decision as a score_result (and each result of a score_batch_result) carries it. ``decision``:
    its ``bin``, ``name``, ``why`` and ``flags`` (edge_agent.daemon.binning.Decision); ``breaks``: the PAT limits broken
    and ``drivers`` the tests behind a flag (objects with ``to_wire()``), of the breaks the first MAX_PAT_LISTED
    listed and all counted, so a reply's size does not grow with the number of tests; ``insufficient``: too few
    readings to score (the scores are then None)."""
    return {"outlier_score": outlier_score, "outlier": outlier, "pass_probability": pass_probability,
            "predicted_fail": predicted_fail, "bin": decision.bin, "bin_name": decision.name, "why": decision.why,
            "flags": decision.flags, "pat": [b.to_wire() for b in breaks[:MAX_PAT_LISTED]], "pat_total": len(breaks),
            "drivers": [d.to_wire() for d in drivers], "insufficient_readings": insufficient,
            "tests_present": tests_present}


def encode_batch_reply(reply: dict, results: list[bytes]) -> bytes:
    """A score_batch_result: ``reply``'s fields and ``results``, each part's result or error already encoded as it
    was scored (a large batch waiting between its turns holds bytes, not Python objects)."""
    packer = msgpack.Packer(use_bin_type=True)
    chunks = [packer.pack_map_header(len(reply) + 1)]
    for key, value in reply.items():
        chunks += [packer.pack(key), packer.pack(value)]
    chunks += [packer.pack("results"), packer.pack_array_header(len(results)), *results]
    return b"".join(chunks)


def largest_request_bytes(parser: ReadingsParser, max_batch: int) -> int:
    """The size of the largest valid request for a model with ``parser``'s features: a score_batch of ``max_batch``
    parts with every identity field at its limit and the readings in their largest form (float64 values in an array
    or keyed by the longest name of each test), found by encoding one part of it."""
    longest_id = "\U0010ffff" * MAX_ID_CHARS
    identity = {"lot": "L" * MAX_IDENTITY_BYTES, "sublot": "S" * MAX_IDENTITY_BYTES, "wafer": "W" * MAX_IDENTITY_BYTES,
                "part_id": "P" * MAX_IDENTITY_BYTES, "x": -32768, "y": -32768, "head": 255, "site": 255}
    keys = {}
    for key, i in parser._index.items():
        if len(key.encode()) > len(keys.get(i, "").encode()):
            keys[i] = key
    forms = ([1e300] * parser.n_features, {key: 1e300 for key in keys.values()}, b"\0" * 4 * parser.n_features)
    readings = max(forms, key=lambda form: len(_packb(form)))
    item = {"part": identity, "readings": readings}
    envelope = {"v": PROTOCOL_VERSION, "id": longest_id, "deadline": 1e300}
    single = len(_packb({**envelope, "type": SCORE, **item}))
    batch = len(_packb({**envelope, "type": SCORE_BATCH, "parts": []})) + 4 + max_batch * len(_packb(item))
    return max(single, batch)


def _packb(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _names(keys) -> str:
    keys = list(keys)
    shown = ", ".join(short_repr(k) for k in keys[:5])
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _kind(value: Any) -> str:
    names = {dict: "map", list: "array", str: "string", bytes: "binary", bool: "boolean", int: "integer",
             float: "number", type(None): "nil"}
    return names.get(type(value), type(value).__name__)
