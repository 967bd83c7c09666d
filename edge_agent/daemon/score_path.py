"""A score request's path between the serving loop (server.py) and the decision (decision.py): its readings parsed,
scored by the graphs (with the waiting requests' rows, read ahead), decided, and its reply built; a score_batch a
slice of parts per turn; a keep-warm rehearsal the same path into the ``REHEARSAL`` sink.
"""
from __future__ import annotations

import itertools
import time

import numpy as np
import zmq

from .decision import REHEARSAL, DriftHook, LifecycleHook, PartDecider, Sink
from .fairness import Inbox
from .control import ServedModels
from .metrics import Metrics
from .pat import DynamicPat
from .scoring import LoadedModel
from .stages import VALIDATE
from .touchdowns import TouchdownClock
from ..wire.codec import encode
from ..wire.score import (MAX_TOUCHDOWN_PARTS, SCORE, SCORE_BATCH, SCORE_TOUCHDOWN, STREAM_PARTS_ABOVE_BYTES,
                          BatchParts, Code, ProtocolError,
                          batch_item_error, batch_reply, decode, parse_batch, parse_batch_item, parse_part, request_id,
                          score_reply)

READ_AHEAD_SCAN = 4           # waiting requests looked at for scoring ahead, in turn_parts (not a flood's thousands)


class Request:
    """One request from its receipt to its reply: where the reply goes, its bytes (ZeroMQ's frame, read in place),
    its id once read, a score_batch's progress between its turns, and for a score request scored ahead of its turn
    (``ScorePath.score``) its message and ``Ahead``."""

    __slots__ = ("envelope", "payload", "received", "started", "rid", "batch", "message", "ahead")

    def __init__(self, client: bytes, frames: list[zmq.Frame], received: float):
        self.envelope, self.payload = _split_frames(client, frames)
        self.received = received              # time.perf_counter() when the agent took it from ZeroMQ
        self.started: float | None = None     # when its first turn started (None: answered outside a turn)
        self.rid: int | str | None = None
        self.batch: Batch | None = None
        self.message: dict | None = None      # a score request decoded ahead of its turn
        self.ahead: Ahead | None = None

    @property
    def size(self) -> int:
        return 0 if self.payload is None else len(self.payload)


class Ahead:
    """A waiting score request's readings and scores, computed in another request's graph call: used at its turn if
    the same model still serves."""

    __slots__ = ("model", "row", "score", "probability")

    def __init__(self, model: LoadedModel | None, row: np.ndarray | None, score: float, probability: float):
        self.model, self.row, self.score, self.probability = model, row, score, probability


NOT_AHEAD = Ahead(None, None, float("nan"), float("nan"))   # looked at: not a score request that reads ahead


class Batch:
    """A score_batch between its turns, or a score_touchdown (``kind``; judged whole, in one turn): the model and PAT
    windows it started with, its parts and each part's result (or error) encoded so far."""

    __slots__ = ("rid", "kind", "model", "dynamic", "parts", "results")

    def __init__(self, rid, kind: str, model: LoadedModel, dynamic: DynamicPat | None, parts: BatchParts):
        self.rid, self.kind, self.model, self.dynamic, self.parts = rid, kind, model, dynamic, parts
        self.results: list[bytes] = []

    def reply(self) -> dict:
        return batch_reply(self.rid, self.model.identity, self.kind)


def decode_request(request: Request, max_message_bytes: int) -> dict:
    """Framing, size and msgpack; the request id read."""
    if request.payload is None:
        raise ProtocolError(Code.MALFORMED_MESSAGE, "expected one payload frame (DEALER) or an empty "
                                                    "delimiter and one payload frame (REQ)")
    if request.size > max_message_bytes:
        raise ProtocolError(Code.MESSAGE_TOO_LARGE, f"message of {request.size} bytes exceeds "
                                                    f"max_message_bytes {max_message_bytes}")
    message = decode(request.payload.buffer)
    request.rid = request_id(message)
    return message


class ScorePath:
    """Scores and decides score and score_batch requests on the model ``models`` serves."""

    def __init__(self, models: ServedModels, inbox: Inbox, metrics: Metrics, decider: PartDecider, *,
                 turn_parts: int, max_batch: int, max_message_bytes: int, drift: DriftHook | None,
                 lifecycle: LifecycleHook | None):
        self.models, self.inbox, self.metrics, self.decider = models, inbox, metrics, decider
        self.turn_parts, self.max_batch, self.max_message_bytes = turn_parts, max_batch, max_message_bytes
        self.live = Sink(metrics, drift, lifecycle)
        # Drift follows the model serving: a batch that began before a swap finishes on its model without it.
        self.live_before_swap = Sink(metrics, None, lifecycle)

    def score(self, message: dict, request: Request, sample: list[int] | None) -> dict:
        """A score request at its turn: its row scored ahead, or now with the waiting requests' rows, decided."""
        model = self.models.model
        part = parse_part(message.get("part"))
        ahead = request.ahead
        if ahead is not None and ahead.model is model:
            rows, scores, probabilities = (ahead.row,), (ahead.score,), (ahead.probability,)
            self.metrics.parts_scored_ahead += 1
            if sample is not None:
                sample[VALIDATE] = time.perf_counter_ns()
        else:
            row = model.parser.parse(message.get("readings"))
            rows = (row,)
            waiting = self._read_ahead(model, request) if self.inbox.requests > 1 else []
            if sample is not None:
                sample[VALIDATE] = time.perf_counter_ns()
            scores, probabilities = model.score(np.stack([row, *(other_row for _, other_row in waiting)]) if waiting
                                                else row[None, :], sample)
            for k, (other, other_row) in enumerate(waiting, 1):
                other.ahead = Ahead(model, other_row, float(scores[k]), float(probabilities[k]))
        result, = self.decider.decide(model, self.models.dynamic, self.live, (part,), rows, scores, probabilities,
                                      sample)
        return score_reply(request.rid, result, model.identity)

    def rehearse(self, message: dict, whole: bool) -> list[dict]:
        """A score request's path again, decode to reply, into the REHEARSAL sink and no site window; of a
        score_touchdown the whole touchdown as one matrix (``whole``), else its first site as a score request."""
        model = self.models.model
        items = (parse_batch(message, self.max_batch).take(MAX_TOUCHDOWN_PARTS) if message["type"] == SCORE_TOUCHDOWN
                 else [message])
        parsed = [parse_batch_item({"part": item.get("part"), "readings": item.get("readings")}, i, model.parser)
                  for i, item in enumerate(items if whole else items[:1])]
        parts, rows = [part for part, _ in parsed], [row for _, row in parsed]
        scores, probabilities = model.score(np.stack(rows))
        results = self.decider.decide(model, None, REHEARSAL, parts, rows, scores, probabilities)
        return [score_reply(None, result, model.identity) for result in results]

    def start_batch(self, message: dict, request: Request) -> Batch:
        return Batch(request.rid, message["type"], self.models.model, self.models.dynamic,
                     parse_batch(message, self.max_batch))

    def score_slice(self, batch: Batch, others_wait: bool) -> bool:
        """Score the next ``turn_parts`` parts of a batch while others wait, else all the rest in one onnxruntime
        call (a batch alone loses no throughput to slicing); a touchdown whole, its sites as one matrix. True when
        every part has its result."""
        model = batch.model
        refused: list[ProtocolError | None] = []   # per part: why it cannot be scored, or None
        parts, rows = [], []
        n = self.turn_parts if others_wait and batch.kind == SCORE_BATCH else len(batch.parts)
        for i, item in enumerate(batch.parts.take(n), len(batch.results)):
            try:
                part, row = parse_batch_item(item, i, model.parser)
            except ProtocolError as error:
                self.metrics.errors[error.code] += 1
                refused.append(error)
                continue
            refused.append(None)
            parts.append(part)
            rows.append(row)
        results = iter(())
        if rows:
            sink = self.live if model is self.models.model else self.live_before_swap
            results = iter(self.decider.decide(model, batch.dynamic, sink, parts, rows, *model.score(np.stack(rows))))
        for error in refused:
            batch.results.append(encode(next(results) if error is None else batch_item_error(error.code,
                                                                                             error.message)))
        return len(batch.results) == len(batch.parts)

    def work_left(self) -> bool:
        dynamic = self.models.dynamic
        return bool((dynamic is not None and dynamic.refreshes_due)
                    or (self.live.drift is not None and self.live.drift.queued))

    def work_between_parts(self) -> None:
        """One piece of the work left for when no request waits: a site's due dynamic PAT refresh (64 tests'
        quartiles, 0.1-0.3 ms; every test's once, at the end of a site's warm-up), else one part's drift statistics
        (20-50 us)."""
        dynamic = self.models.dynamic
        if dynamic is not None and dynamic.refresh_due():
            return
        if self.live.drift is not None:
            self.live.drift.take_queued(1)

    def _read_ahead(self, model: LoadedModel, serving: Request) -> list[tuple[Request, np.ndarray]]:
        """Score ahead: the readings of the score requests waiting in the inbox (a touchdown's other sites, a
        backlog after a stall), at most ``turn_parts - 1``, to be scored in the serving request's graph call. One call
        of n rows costs far less than n calls (onnxruntime's per-call cost, and each part's first touch of the
        graphs), so the last site of a touchdown no longer waits for every earlier site's graphs. Each keeps its
        own turn, order and reply; only the graphs run early. A request that cannot be read ahead (not a score
        request, malformed, too large) is left for its turn, which refuses it as before. Bounded whatever waits: at
        most ``READ_AHEAD_SCAN * turn_parts`` waiting requests looked at, and none over STREAM_PARTS_ABOVE_BYTES
        decoded ahead (64 KiB: a score request of a few hundred tests is a few KB; a large score_batch is not)."""
        waiting = []
        for request in itertools.islice(self.inbox.queued(), READ_AHEAD_SCAN * self.turn_parts):
            if len(waiting) >= self.turn_parts - 1:
                break
            if (request is serving or request.batch is not None or request.ahead is NOT_AHEAD
                    or request.size > STREAM_PARTS_ABOVE_BYTES
                    or (request.ahead is not None and request.ahead.model is model)):
                continue
            request.ahead = NOT_AHEAD
            try:
                message = (request.message if request.message is not None
                           else decode_request(request, self.max_message_bytes))
                if message.get("type") != SCORE:
                    continue   # decoded again at its turn: only score requests are kept decoded while they wait
                request.message = message
                waiting.append((request, model.parser.parse(message.get("readings"))))
            except ProtocolError:
                continue       # refused at its turn
        return waiting


class KeepWarm:
    """With no request for ``keep_warm_ms`` the serving loop rehearses the last score request, and once more just
    before the tester's next touchdown is due (edge_agent/daemon/touchdowns.py), so the touchdown after a pause does
    not meet cold caches. ``on`` False (keep_warm_ms 0): never."""

    def __init__(self, path: ScorePath, keep_warm_ms: float):
        self.path, self.on = path, bool(keep_warm_ms)
        self.payload: zmq.Frame | None = None   # the last score request's (the serving loop sets it when ``on``)
        self.touchdowns = TouchdownClock()      # when to rehearse before the next touchdown

    def rehearsal_in(self, now: float) -> float | None:
        """Seconds from ``now`` until the rehearsal before the tester's next touchdown; None when none is planned
        or keep-warm is off."""
        if self.payload is None:
            return None
        return self.touchdowns.rehearse_in(now)

    def rehearse(self) -> None:
        """The last score or score_touchdown request's path again, decode to encode, without its effects and without
        a reply, so the next part finds the code, the graphs and the buffers in the caches: its first site while
        idle (about what one score request costs), the whole touchdown just before the next one is due. A request
        arriving meanwhile waits for at most this one rehearsal."""
        # ZeroMQ's poll counts whole ms: it may wake just before the touchdown's rehearsal is due, and this keep-warm
        # one does not count for it.
        before_touchdown = self.touchdowns.rehearsing(time.perf_counter())
        try:
            for reply in self.path.rehearse(decode(self.payload.buffer), before_touchdown):
                encode(reply)
        except ProtocolError:   # a model swapped in since takes other readings: rehearse its first real part
            self.payload = None


def _split_frames(client: bytes, frames: list[zmq.Frame]) -> tuple[list[bytes], zmq.Frame | None]:
    """(routing envelope to send back, payload): DEALER sends [payload], REQ sends ["", payload]."""
    if len(frames) == 1:
        return [client], frames[0]
    if len(frames) == 2 and not len(frames[0]):
        return [client, b""], frames[1]
    return [client], None
