"""The test program's side: one call per part, bounded by a timeout, failing open.

Needs numpy, pyzmq and msgpack only. If the agent is slow, restarting or absent, ``score`` returns a
result with ``decided=False`` (and counts why) no later than its timeout; it never raises and never
blocks the test program beyond that. After a timeout the socket is thrown away and a fresh one connects
(the "Lazy Pirate" pattern), so a late reply can never be taken for the next part's. After
``failures_before_backoff`` consecutive failures spanning at least ``backoff_after_s`` the client stops waiting
on an absent agent: for ``backoff_s`` it answers "no decision" at once, then tries again. (A stall of a few parts,
a busy machine, is not an absent agent: the parts after it get their decisions.) With ``send_deadline`` each score
request carries its deadline (now + timeout), so an agent that reaches it late answers deadline_exceeded at once
instead of scoring a part nobody waits for (agents from before the ``deadline`` field refuse it as unknown).

    client = AgentClient("tcp://127.0.0.1:5555", timeout_ms=20)
    result = client.score(readings, part={"lot": "L1", "wafer": "3", "x": 10, "y": 4, "site": 2})
    if result.decided:
        bin_number = result.bin

An agent whose score socket listens beyond loopback is a CURVE server: pass ``curve=CurveClient(pair,
agent_public)`` (edge_agent.keys loads both from certificate files). One client per thread (ZeroMQ sockets are
not thread-safe).
"""
from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from .wire.codec import encode
from .wire.links import CurveClient, connect_curve
from .wire.score import (ERROR, HEALTH, RELOAD, REPLY_TYPES, ROLLBACK, SCORE, SCORE_BATCH, SCORE_TOUCHDOWN,
                         ProtocolError, decode_reply, request_message)

# Reasons a call ends without a decision, besides the agent's own error codes (edge_agent.wire.score.Code).
TIMEOUT = "timeout"
BACKING_OFF = "backing_off"
SEND_QUEUE_FULL = "send_queue_full"
ENCODE_FAILED = "encode_failed"
TOO_LARGE_TO_SEND = "too_large_to_send"
BAD_REPLY = "bad_reply"


class AgentUnavailable(TimeoutError):
    """An administrative request (health, reload, rollback) got no reply in time."""


@dataclass
class ScoreResult:
    decided: bool
    request_id: int | None = None
    outlier_score: float | None = None
    outlier: bool | None = None
    pass_probability: float | None = None
    predicted_fail: bool | None = None
    bin: int | None = None
    bin_name: str | None = None
    why: str = ""
    flags: list[str] = field(default_factory=list)
    pat: list[dict] = field(default_factory=list)
    drivers: list[dict] = field(default_factory=list)   # tests behind an ML outlier: test, value, z, typical range
    insufficient_readings: bool = False  # too few readings: scores are None, the bin is insufficient_readings
    tests_present: int | None = None    # how many of the model's tests the part had readings for
    model: dict | None = None           # name, version, checksum of the model that decided
    agent_us: float | None = None       # the agent's own processing time
    round_trip_us: float | None = None  # measured here, send to reply
    error_code: str | None = None       # why there is no decision
    error_message: str = ""


class AgentClient:
    def __init__(self, endpoint: str, *, timeout_ms: float = 20.0, failures_before_backoff: int = 3,
                 backoff_after_s: float = 0.25, backoff_s: float = 1.0, send_deadline: bool = False,
                 max_message_bytes: int = 4 << 20, context: zmq.Context | None = None,
                 curve: CurveClient | None = None):
        self.endpoint = endpoint
        self.curve = curve
        self.timeout_ms = timeout_ms
        self.failures_before_backoff = failures_before_backoff
        self.backoff_after_s = backoff_after_s
        self.backoff_s = backoff_s
        self.send_deadline = send_deadline
        self.max_message_bytes = max_message_bytes
        self.decided = 0
        self.no_decision: Counter[str] = Counter()
        self._context = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._failures = 0
        self._failing_since = 0.0       # time.perf_counter() of the first of the failures in a row
        self._backoff_until = 0.0
        self._socket = self._connect()

    # ---- scoring -------------------------------------------------------------------------------------------

    def score(self, readings, part: dict | None = None, *, timeout_ms: float | None = None) -> ScoreResult:
        """Score one part. ``readings``: a 1-D array in the model's feature order (NaN = not run) or a
        map test -> value. Never raises; ``result.decided`` is False when the agent gave no decision."""
        rid = next(self._ids)
        try:
            message = request_message(SCORE, rid, readings=_wire_readings(readings))
        except (TypeError, ValueError) as error:
            return self._no_decision(rid, ENCODE_FAILED, f"readings: {error}", round_trip_us=None)
        if part is not None:
            message["part"] = part
        reply, round_trip_us, failure = self._call(message, rid, timeout_ms)
        if failure is not None:
            return self._no_decision(rid, *failure, round_trip_us=round_trip_us)
        return self._result(rid, reply, round_trip_us, reply.get("model"), reply.get("agent_us"))

    def score_batch(self, parts: list[tuple[dict | None, Any]], *,
                    timeout_ms: float | None = None) -> list[ScoreResult]:
        """Score many parts in one request: ``parts`` is a list of (part identity or None, readings)."""
        return self._score_many(SCORE_BATCH, parts, timeout_ms)

    def score_touchdown(self, parts: list[tuple[dict | None, Any]], *,
                        timeout_ms: float | None = None) -> list[ScoreResult]:
        """Score every site of one touchdown in one message (at most 64): ``parts`` is a list of (part identity,
        readings), one per site. The agent judges them as one matrix in one turn and answers with a result per
        site, in order; the timeout (fail-open, as for ``score``) covers the whole touchdown."""
        return self._score_many(SCORE_TOUCHDOWN, parts, timeout_ms)

    def _score_many(self, kind: str, parts: list[tuple[dict | None, Any]],
                    timeout_ms: float | None) -> list[ScoreResult]:
        rid = next(self._ids)
        items, failure, round_trip_us = [], None, None
        try:
            for part, readings in parts:
                items.append({"readings": _wire_readings(readings)} if part is None
                             else {"part": part, "readings": _wire_readings(readings)})
        except (TypeError, ValueError) as error:
            failure = (ENCODE_FAILED, f"parts[{len(items)}].readings: {error}")
        if failure is None:
            message = request_message(kind, rid, parts=items)
            reply, round_trip_us, failure = self._call(message, rid, timeout_ms)
        if failure is None and not (isinstance(reply.get("results"), list) and len(reply["results"]) == len(parts)):
            failure = (BAD_REPLY, f"{REPLY_TYPES[kind]} without one result per part")
        if failure is not None:
            return [self._no_decision(rid, *failure, round_trip_us=round_trip_us) for _ in parts]
        return [self._result(rid, item, round_trip_us, reply.get("model"), reply.get("agent_us"))
                for item in reply["results"]]

    # ---- administration ------------------------------------------------------------------------------------

    def health(self, timeout_ms: float = 1000.0, stages_since: int | None = None) -> dict:
        """``stages_since``: the per-stage breakdown covers only the samples after this one (``stages.taken`` of an
        earlier health reply)."""
        return self._admin(HEALTH, {} if stages_since is None else {"stages_since": stages_since}, timeout_ms)

    def reload(self, version: str | None = None, timeout_ms: float = 1000.0) -> dict:
        return self._admin(RELOAD, {} if version is None else {"version": str(version)}, timeout_ms)

    def rollback(self, timeout_ms: float = 1000.0) -> dict:
        return self._admin(ROLLBACK, {}, timeout_ms)

    def close(self) -> None:
        self._socket.close(linger=0)

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals -----------------------------------------------------------------------------------------

    def _admin(self, kind: str, fields: dict, timeout_ms: float) -> dict:
        rid = next(self._ids)
        self._backoff_until = 0.0   # an operator asking wants a real attempt
        reply, _, failure = self._call(request_message(kind, rid, **fields), rid, timeout_ms)
        if failure is not None and failure[0] in (TIMEOUT, SEND_QUEUE_FULL):
            raise AgentUnavailable(f"no reply from the agent at {self.endpoint} within {timeout_ms:g} ms")
        if failure is not None:
            return {"type": ERROR, "id": rid, "code": failure[0], "message": failure[1]}
        return reply

    def _call(self, message: dict, rid: int, timeout_ms: float | None) -> tuple[dict | None, float | None,
                                                                                tuple[str, str] | None]:
        """(reply, round trip in us, None) or (None, round trip or None, (reason, message))."""
        start = time.perf_counter()
        if start < self._backoff_until:
            return None, None, (BACKING_OFF, f"agent at {self.endpoint} did not answer lately; not waiting on it "
                                             f"for {self._backoff_until - start:.2f} s more")
        timeout_s = (self.timeout_ms if timeout_ms is None else timeout_ms) / 1000.0
        if self.send_deadline:
            message["deadline"] = time.time() + timeout_s
        try:
            payload = encode(message)
        except (TypeError, ValueError, OverflowError) as error:
            return None, None, (ENCODE_FAILED, f"cannot encode the request: {error}")
        if len(payload) > self.max_message_bytes:
            return None, None, (TOO_LARGE_TO_SEND, f"request of {len(payload)} bytes exceeds max_message_bytes "
                                                   f"{self.max_message_bytes}")
        deadline = start + timeout_s
        try:
            self._socket.send(payload, zmq.NOBLOCK)
        except zmq.Again:
            self._failed()
            return None, None, (SEND_QUEUE_FULL, f"send queue to {self.endpoint} is full")
        while True:
            reply = self._receive(deadline)
            if reply is None:
                self._failed()
                return None, (time.perf_counter() - start) * 1e6, (TIMEOUT, f"no reply from {self.endpoint} "
                                                                            f"within the timeout")
            if isinstance(reply, dict) and reply.get("id") == rid:
                break
            # A reply to an earlier request can only come from this socket's past; it is not ours.
        self._failures = 0
        round_trip_us = (time.perf_counter() - start) * 1e6
        if reply.get("type") == ERROR:
            return None, round_trip_us, (str(reply.get("code")), str(reply.get("message", "")))
        if reply.get("type") != REPLY_TYPES.get(message["type"]):
            return None, round_trip_us, (BAD_REPLY, f"unexpected reply type {reply.get('type')!r}")
        return reply, round_trip_us, None

    def _receive(self, deadline: float):
        """The next decoded reply, or None at the deadline. Polls in whole milliseconds, then briefly sleeps,
        so the caller is never held past the deadline by the poll's granularity."""
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return None
            if self._socket.poll(math.floor(remaining * 1000), zmq.POLLIN):
                frame = self._socket.recv()
                try:
                    return decode_reply(frame)
                except ProtocolError:
                    continue   # not a reply we can read: keep waiting for ours
            elif remaining < 0.001:
                time.sleep(min(remaining, 0.0002))

    def _failed(self) -> None:
        """Lazy Pirate: a fresh socket after a failure, and back off after several in a row."""
        self._socket.close(linger=0)
        self._socket = self._connect()
        now = time.perf_counter()
        if not self._failures:
            self._failing_since = now
        self._failures += 1
        if self._failures >= self.failures_before_backoff and now - self._failing_since >= self.backoff_after_s:
            self._backoff_until = now + self.backoff_s
            self._failures = 0

    def _connect(self) -> zmq.Socket:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, 100)
        if self.curve is not None:
            connect_curve(socket, self.curve)
        socket.connect(self.endpoint)
        return socket

    def _no_decision(self, rid: int, reason: str, message: str, *, round_trip_us: float | None) -> ScoreResult:
        self.no_decision[reason] += 1
        return ScoreResult(decided=False, request_id=rid, round_trip_us=round_trip_us, error_code=reason,
                           error_message=message)

    def _result(self, rid: int, item: dict, round_trip_us: float, model: dict | None,
                agent_us: float | None) -> ScoreResult:
        error = item.get("error")
        if error is not None:
            return self._no_decision(rid, str(error.get("code")), str(error.get("message", "")),
                                     round_trip_us=round_trip_us)
        self.decided += 1
        return ScoreResult(decided=True, request_id=rid, outlier_score=item.get("outlier_score"),
                           outlier=item.get("outlier"), pass_probability=item.get("pass_probability"),
                           predicted_fail=item.get("predicted_fail"), bin=item.get("bin"),
                           bin_name=item.get("bin_name"), why=item.get("why", ""), flags=item.get("flags", []),
                           pat=item.get("pat", []), drivers=item.get("drivers", []),
                           insufficient_readings=bool(item.get("insufficient_readings", False)),
                           tests_present=item.get("tests_present"), model=model, agent_us=agent_us,
                           round_trip_us=round_trip_us)


def _wire_readings(readings):
    """A map stays a map (test -> float); anything else is one row in feature order and travels as little-endian
    float32 bytes, the cheapest form to pack and parse (None becomes NaN: not run). A value beyond float32 range
    becomes infinite here, which the agent refuses naming the test."""
    if isinstance(readings, dict):
        return {str(k): float(v) for k, v in readings.items()}
    with np.errstate(over="ignore"):
        row = np.asarray(readings, dtype=np.float64).astype("<f4")
    if row.ndim != 1:
        raise ValueError(f"expected one row of readings, got an array of shape {row.shape}")
    return row.tobytes()
