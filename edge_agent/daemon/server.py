"""The serving loop: one thread, one ROUTER socket (and the CURVE control socket, if any), every client served in
turn.

Each pass of the loop takes what ZeroMQ holds into the inbox (``_receive``: one round of ZeroMQ's fair queue at
most, each connection's next request once) and serves one turn of the least-served client (``_turn``; the order of
service is fairness.py's). The hot path is ``_serve``: decode -> validate -> deadline -> score -> PAT -> drift hook
-> bin -> reply, all of it for a small request; a score_batch is scored ``turn_parts`` parts per turn, each turn
followed by the other clients' turns, on the model it started with. One client's requests are served in order, so
its replies come back in the order of its requests; models are swapped only between turns
(``_take_reload_outcomes``), so a request never sees two models. What the agent holds for its clients is bounded
by edge_agent/daemon/limits.py.

Work a reply does not need waits until no request does (``_work_between_parts``): a part's drift statistics
(queued by the drift hook) and its site's dynamic PAT refresh (marked due by DynamicPat), one piece per pass of
the loop, so a request arriving meanwhile waits for at most one piece.

Every ``stage_sample_every``-th request is timed stage by stage (edge_agent/daemon/stages.py, the health reply's
``stages``). With no request for ``keep_warm_ms`` the loop rehearses the last score request (``_rehearse``), and
once more just before the tester's next touchdown is due (edge_agent/daemon/touchdowns.py), so the touchdown after a
pause does not meet cold caches.
"""
from __future__ import annotations

import errno
import gc
import itertools
import logging
import os
import sys
import time
from typing import Protocol

import numpy as np
import zmq

from .. import __version__
from .binning import Decision, decide, decide_insufficient
from .config import AgentConfig
from ..errors import listen_error
from .fairness import Inbox
from .limits import Limits, derive
from .metrics import Metrics, start_prometheus
from ..package.registry import Registry
from .pat import DynamicPat
from .reload import ReloadOutcome, ReloadWatcher
from .scoring import LoadedModel
from .security import AgentSecurity
from .stages import AUDIT, BIN, DECODE, DRIFT, ENCODE, EXPLAIN, PAT, SEND, VALIDATE, StageSampler
from .touchdowns import TouchdownClock
from ..wire.codec import encode
from ..wire.score import (HEALTH, PROTOCOL_VERSION, RELOAD, REPLY_TYPES, ROLLBACK, SCORE, SCORE_BATCH, BatchParts, Code,
                         Part, ProtocolError, check_deadline, check_envelope, check_stages_since, decode,
                         encode_batch_reply, error_reply, largest_request_bytes, parse_batch, parse_batch_item,
                         STREAM_PARTS_ABOVE_BYTES, parse_part, part_result, peek_id, request_id)

log = logging.getLogger("edge_agent.daemon.server")

POLL_MS = 100                 # how soon a stop request (SIGTERM) is noticed when no request arrives
BURST = 64                    # control requests served before the clients' next turn
ERROR_LOG_INTERVAL_S = 1.0    # at most one log line per error code per interval (a bad client floods)
HEALTH_SITES = 32             # dynamic PAT sites listed in a health reply (the most recently tested)
# ZeroMQ moves bytes between sockets and queues on its own threads, each connection on one of them. With two, a
# connection flooding megabyte messages keeps one busy while the others' small requests go through the other
# (measured under a 20-connection flood: 95-98 % of a 20 ms client's parts decided against 48-93 % with one).
IO_THREADS = 2
# While the reload thread (or a Prometheus scrape) runs Python code, the serving thread waits for the GIL up to
# the switch interval: 5 ms by default, 0.2 ms here. Only costs anything while two threads want the GIL.
GIL_SWITCH_INTERVAL_S = 200e-6
READ_AHEAD_SCAN = 4           # waiting requests looked at for scoring ahead, in turn_parts (not a flood's thousands)


class DriftHook(Protocol):
    """Streaming drift statistics (edge_agent.daemon.upstream.AgentDrift): every scored part, idle ticks, status."""

    def update(self, model: LoadedModel, part: Part, readings: np.ndarray, score: float) -> None: ...

    @property
    def queued(self) -> int: ...

    def take_queued(self, parts: int | None = None) -> None: ...

    def tick(self) -> None: ...

    def status(self) -> dict: ...


class LifecycleHook(Protocol):
    """Audit and shadow challenger (edge_agent.daemon.lifecycle.Lifecycle): every decided part, idle ticks, status."""

    def decided(self, model: LoadedModel, part: Part, row: np.ndarray, score: float | None,
                probability: float | None, decision: Decision) -> None: ...

    def tick(self) -> None: ...

    def status(self) -> dict: ...


class Request:
    """One request from its receipt to its reply: where the reply goes, its bytes (ZeroMQ's frame, read in place),
    its id once read, a score_batch's progress between its turns, and for a score request scored ahead of its turn
    (``Agent._read_ahead``) its message and ``Ahead``."""

    __slots__ = ("envelope", "payload", "received", "rid", "batch", "message", "ahead")

    def __init__(self, client: bytes, frames: list[zmq.Frame], received: float):
        self.envelope, self.payload = _split_frames(client, frames)
        self.received = received              # time.perf_counter() when the agent took it from ZeroMQ
        self.rid: int | str | None = None
        self.batch: _Batch | None = None
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


class _Batch:
    """A score_batch between its turns: the model and PAT windows it started with, its parts and each part's result
    (or error) encoded so far."""

    __slots__ = ("rid", "model", "dynamic", "parts", "results")

    def __init__(self, rid, model: LoadedModel, dynamic: DynamicPat | None, parts: BatchParts):
        self.rid, self.model, self.dynamic, self.parts = rid, model, dynamic, parts
        self.results: list[bytes] = []

    def reply(self) -> dict:
        return {"v": PROTOCOL_VERSION, "type": REPLY_TYPES[SCORE_BATCH], "id": self.rid,
                "model": self.model.identity}


class Agent:
    """The daemon: serves one model (and keeps the previous one) on one ROUTER socket until asked to stop."""

    def __init__(self, config: AgentConfig, registry: Registry, model: LoadedModel, *,
                 drift: DriftHook | None = None, security: AgentSecurity | None = None,
                 lifecycle: LifecycleHook | None = None):
        self.config = config
        self.registry = registry
        self.model = model
        self.previous: LoadedModel | None = None
        self.metrics = Metrics()
        self.policy = config.binning.policy()
        self.dynamic = self._dynamic_pat(model)
        self.drift = drift
        self.lifecycle = lifecycle
        self.last_reload: dict | None = None
        self.draining = False
        # Socket options are set once, at bind, from the model served then (a reload warns if it needs more).
        self.limits: Limits = derive(config.max_message_bytes, config.transport_max_message_bytes, config.max_batch,
                                     config.queue_length, config.max_queued_bytes, model.parser, self.policy)
        self.inbox = Inbox(self.limits.client_queue_bytes, self.limits.max_queued_bytes, self.limits.held_reply_bytes)
        self._max_age_s = config.max_request_age_ms / 1000.0
        self._stop_requested = False
        self._error_log = _ThrottledLog(ERROR_LOG_INTERVAL_S)
        self.security = security or AgentSecurity.load(config.security)
        # Control messages are served on the authenticated control socket only (edge_agent/daemon/security.py); a
        # score_batch is served a turn at a time by ``_serve``, not by a handler.
        self._control_handlers = {SCORE: self._score, HEALTH: self._health, RELOAD: self._reload,
                                  ROLLBACK: self._rollback}
        self._handlers = {**self._control_handlers, RELOAD: self._refuse_control, ROLLBACK: self._refuse_control}
        self.stages = StageSampler(config.stage_sample_every)
        self._sample: list[int] | None = None   # the stage sample of the score request being served, if any
        self._warm_payload: zmq.Frame | None = None   # the last score request: keep_warm_ms rehearses it when idle
        self._watcher: ReloadWatcher | None = None
        self._touchdowns = TouchdownClock()   # when to rehearse before the next touchdown

    def request_stop(self, *_signal_args) -> None:
        """Finish: answer what has arrived, then return from serve(). Safe from a signal handler."""
        self._stop_requested = True

    def request_reload(self, *_signal_args) -> None:
        """Reload whatever the followed stage names now (SIGHUP). Safe from a signal handler."""
        if self._watcher is not None:
            self._watcher.request(self.config.version or None)

    def request_version(self, version: str) -> None:
        """Load ``version`` in the background and serve it (the fleet follower's thread, which waits here until
        serve() has started the loader). Thread-safe."""
        while self._watcher is None:
            time.sleep(0.05)
        self._watcher.request(version)

    def serve(self) -> None:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        context = zmq.Context(io_threads=IO_THREADS)
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.RCVHWM, self.limits.receive_hwm)
        router.setsockopt(zmq.SNDHWM, self.limits.send_hwm)
        router.setsockopt(zmq.MAXMSGSIZE, self.limits.transport_max_message_bytes)
        router.setsockopt(zmq.LINGER, int(self.config.shutdown_timeout_s * 1000))
        wake = context.socket(zmq.PAIR)
        wake_address = f"inproc://edge-agent-reload-{id(self)}"
        wake.bind(wake_address)
        prometheus = None
        try:
            control = self.security.open(context, router, self.limits.transport_max_message_bytes)
            try:
                router.bind(self.config.bind)
            except zmq.ZMQError as error:
                raise listen_error(f"cannot listen on {self.config.bind}", error.errno, error.strerror) from None
            if self.config.metrics.port:
                try:
                    prometheus = start_prometheus(self.metrics, lambda: self.model.identity,
                                                  self.config.metrics.host, self.config.metrics.port,
                                                  drift=None if self.drift is None else self.drift.status,
                                                  lifecycle=None if self.lifecycle is None else self.lifecycle.status)
                except OSError as error:
                    raise listen_error(f"cannot serve Prometheus metrics on {self.config.metrics.host}:"
                                        f"{self.config.metrics.port}", error.errno, error.strerror) from None
            self._watcher = ReloadWatcher(
                self.registry, self.model.ref.name, self.config.stage, pinned=bool(self.config.version),
                serving_version=self.model.ref.version, interval_s=self.config.watch_interval_s,
                yield_variant=self.config.yield_variant, context=context, wake_address=wake_address)
            self._watcher.start()
            _freeze_heap()
            log.info("serving %s (checksum %s) on %s%s", self.model.ref, self.model.checksum[:12], self.config.bind,
                     f", metrics on http://{self.config.metrics.host}:{self.config.metrics.port}/metrics"
                     if prometheus else "")
            log.info("requests up to %d bytes (ZeroMQ drops a connection past %d); per connection at most %.1f MB "
                     "held (edge_agent/daemon/limits.py)", self.limits.max_message_bytes,
                     self.limits.transport_max_message_bytes, self.limits.per_connection_bytes / 1e6)
            self._loop(router, wake, control)
        finally:
            if self._watcher is not None:
                self._watcher.stop()
                self._watcher.join(timeout=2.0)
            if prometheus is not None:
                prometheus[0].shutdown()
                prometheus[0].server_close()
            router.close()        # lingers up to shutdown_timeout_s so the last replies leave
            wake.close(linger=0)
            self.security.close()
            context.term()
            log.info("stopped after %d parts scored", self.metrics.parts_scored)

    # ---- the loop ------------------------------------------------------------------------------------------

    def _loop(self, router: zmq.Socket, wake: zmq.Socket, control: zmq.Socket | None = None) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        if control is not None:
            poller.register(control, zmq.POLLIN)
        deadline = None
        while True:
            if self._stop_requested and deadline is None:
                self.draining = True
                deadline = time.monotonic() + self.config.shutdown_timeout_s
                log.info("stop requested: answering the requests already received, then exiting")
            quiet_ms = (self.config.keep_warm_ms or POLL_MS) if deadline is None else self.config.drain_quiet_ms
            now = time.perf_counter()
            retry_s = self.inbox.next_retry_in(now)
            wait_ms = quiet_ms if retry_s is None else min(quiet_ms, max(0.0, retry_s * 1000))
            touchdown_s = self._touchdown_rehearsal_in(now) if deadline is None else None
            if touchdown_s is not None:
                wait_ms = min(wait_ms, max(0.0, touchdown_s * 1000))
            behind = self._work_left()
            if not self.inbox.due and not poller.poll(0 if behind else wait_ms):
                self._send_held(router)
                if behind:
                    self._work_between_parts()
                    continue
                if deadline is not None and wait_ms == quiet_ms and not self.inbox.requests and not self.inbox.held:
                    return   # quiet for drain_quiet_ms: every request that arrived has its reply
                if self.drift is not None:
                    self.drift.tick()   # closes a window whose time is up while no parts arrive
                if self.lifecycle is not None:
                    self.lifecycle.tick()
                if self.config.keep_warm_ms and self._warm_payload is not None:
                    # ZeroMQ's poll counts whole ms: it may wake just before the touchdown's rehearsal is due, and
                    # this keep-warm one does not count for it.
                    self._touchdowns.rehearsing(time.perf_counter())
                    self._rehearse()
            else:
                if wake.get(zmq.EVENTS) & zmq.POLLIN:
                    self._take_reload_outcomes(wake)
                if control is not None:
                    self._serve_control(control)
                self._receive(router)
                self._send_held(router)
                if self.inbox.due:
                    self._turn(router)
            if deadline is not None and time.monotonic() > deadline:
                log.warning("shutdown timeout (%.1f s) reached while requests kept arriving",
                            self.config.shutdown_timeout_s)
                return

    def _receive(self, router: zmq.Socket) -> None:
        """Take what ZeroMQ holds into the inbox, at most one round of its fair queue in which each connection gives
        up to ``turn_parts`` requests (a touchdown's sites, read together so they can be scored ahead together): the
        round ends at a connection's request past that, or at one over its share of the inbox from a connection read
        before in the round, so a flooding connection is read no faster than the others. A request over its
        client's share of the inbox is answered overloaded at once."""
        read: dict[bytes, int] = {}
        while router.get(zmq.EVENTS) & zmq.POLLIN:   # cheaper than a recv that raises zmq.Again
            client = router.recv()
            frames = [router.recv(copy=False)]
            while router.get(zmq.RCVMORE):
                frames.append(router.recv(copy=False))
            request = Request(client, frames, time.perf_counter())
            self._touchdowns.arrived(request.received)
            before = read.get(client, 0)
            if self.inbox.is_gone(client, request.received):
                self.metrics.replies_dropped["unroutable"] += 1   # sent before its client went away
            elif not self.inbox.take(client, request, request.size):
                request.rid = None if request.payload is None else peek_id(request.payload.buffer)
                self._reply(router, request, self._error(
                    request.rid, Code.OVERLOADED, f"this client already has {self.inbox.client_bytes} bytes of "
                                                  f"requests waiting (or all clients {self.inbox.total_bytes}); "
                                                  f"wait for replies before sending more"), hold=False)
                if before:
                    return
            if before >= self.config.turn_parts:
                return
            read[client] = before + 1

    def _turn(self, router: zmq.Socket) -> None:
        picked = self.inbox.next()
        if picked is None:
            return
        client, request = picked
        start = time.perf_counter()
        finished = self._serve(router, request)
        self.inbox.served(client, time.perf_counter() - start, finished)

    def _serve_control(self, control: zmq.Socket) -> None:
        """Requests on the CURVE control socket: from the few allowed operators' keys, each served whole at once,
        between two clients' turns (a reload or rollback swaps models only there)."""
        for _ in range(BURST):
            if not control.get(zmq.EVENTS) & zmq.POLLIN:
                return
            frames = control.recv_multipart(copy=False)
            self._serve(control, Request(frames[0].bytes, frames[1:], time.perf_counter()), control=True)

    def _serve(self, socket: zmq.Socket, request: Request, *, control: bool = False) -> bool:
        """One turn of ``request``: decode -> validate -> deadline -> score -> PAT -> drift hook -> bin -> reply, or
        one slice of a score_batch (``turn_parts`` parts). True once its reply is sent. ``control``: a request on the
        control socket, served whole, with the control messages allowed and its reply never held."""
        handlers, hold = (self._control_handlers, False) if control else (self._handlers, True)
        try:
            if request.batch is None:
                self._sample = self.stages.begin(request.received)
                message = self._open(request)
                kind = message["type"]
                if kind != SCORE:
                    self._sample = None   # only single score requests are sampled
                elif self.config.keep_warm_ms:
                    self._warm_payload = request.payload
                if kind != SCORE_BATCH:
                    self._reply(socket, request, handlers[kind](message, request), hold=hold)
                    return True
                request.batch = _Batch(request.rid, self.model, self.dynamic,
                                       parse_batch(message, self.config.max_batch))
            if not self._score_slice(request.batch, not control and self._others_wait(socket)):
                return False
            self._reply(socket, request, request.batch.reply(), request.batch.results, hold=hold)
        except ProtocolError as error:
            self._reply(socket, request, self._error(request.rid, error.code, error.message), hold=hold)
        except Exception as error:   # a bug must cost one reply, never the daemon
            self._error_log.exception("internal_error", "internal error on a request")
            self._reply(socket, request, self._error(request.rid, Code.INTERNAL_ERROR,
                                                     f"{type(error).__name__}: {str(error)[:300]}"), hold=hold)
        return True

    def _open(self, request: Request) -> dict:
        """A request's first turn: not too old, framing, size, msgpack, envelope and deadline; counted by type."""
        waited = time.perf_counter() - request.received
        if self._max_age_s and waited > self._max_age_s and request.payload is not None:
            request.rid = peek_id(request.payload.buffer)
            raise ProtocolError(Code.DEADLINE_EXCEEDED, f"the request waited {waited * 1e3:.0f} ms in the agent, "
                                                        f"longer than max_request_age_ms "
                                                        f"{self.config.max_request_age_ms}; not scored")
        try:
            message = request.message if request.message is not None else self._decode(request)
            kind = check_envelope(message)
        except ProtocolError:
            self.metrics.requests["invalid"] += 1
            raise
        self.metrics.requests[kind] += 1
        if "deadline" in message:
            check_deadline(message["deadline"], time.time())
        if self._sample is not None:
            self._sample[DECODE] = time.perf_counter_ns()
        return message

    def _decode(self, request: Request) -> dict:
        """Framing, size and msgpack; the request id read."""
        if request.payload is None:
            raise ProtocolError(Code.MALFORMED_MESSAGE, "expected one payload frame (DEALER) or an empty "
                                                        "delimiter and one payload frame (REQ)")
        if request.size > self.limits.max_message_bytes:
            raise ProtocolError(Code.MESSAGE_TOO_LARGE, f"message of {request.size} bytes exceeds "
                                                        f"max_message_bytes {self.limits.max_message_bytes}")
        message = decode(request.payload.buffer)
        request.rid = request_id(message)
        return message

    def _reply(self, router: zmq.Socket, request: Request, reply: dict, results: list[bytes] | None = None, *,
               hold: bool = True) -> None:
        """Send a reply. One ZeroMQ will not queue now, or that must follow the client's replies held already, is held
        (fairness.py: in order; a client with too much held gets no more turns until it has been sent); with ``hold``
        False (a refusal outside the client's turns) it is dropped instead."""
        reply["agent_us"] = round((time.perf_counter() - request.received) * 1e6, 1)
        payload = encode(reply) if results is None else encode_batch_reply(reply, results)
        sample, self._sample = self._sample, None
        if sample is not None:
            sample[ENCODE] = time.perf_counter_ns()
        client = request.envelope[0]
        frames = [*request.envelope, payload]
        if hold and self.inbox.holds(client):
            self.inbox.hold(client, frames, len(payload))   # behind the client's held replies, in order
        else:
            try:
                router.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                if hold:
                    self.inbox.hold(client, frames, len(payload))
                else:
                    self.metrics.replies_dropped["queue_full"] += 1
            except zmq.ZMQError as error:
                if error.errno != errno.EHOSTUNREACH:
                    raise
                # The client went away before its reply; what else it sent can never be answered either.
                self.metrics.replies_dropped["unroutable"] += 1 + self.inbox.gone(client, 1, time.perf_counter())
        if sample is not None:   # a held reply's send is its hand-over to the inbox (fairness.py), not the retry
            sample[SEND] = time.perf_counter_ns()
            self.stages.end(sample)
        self.metrics.latency.record(time.perf_counter() - request.received)

    def _send_held(self, router: zmq.Socket) -> None:
        """Offer the held replies that are due to ZeroMQ again, each client's in order, as many as it takes now."""
        if not self.inbox.held:
            return
        now = time.perf_counter()
        for client, frames in self.inbox.held_due(now):
            while frames is not None:
                try:
                    router.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    self.inbox.retry_later(client, now)
                    break
                except zmq.ZMQError as error:
                    if error.errno != errno.EHOSTUNREACH:
                        raise
                    self.metrics.replies_dropped["unroutable"] += self.inbox.gone(client, 0, now)
                    break
                frames = self.inbox.release(client)

    def _error(self, rid, code: str, message: str) -> dict:
        self._sample = None   # a refused request's stages say nothing about scoring
        self.metrics.errors[code] += 1
        self._error_log.warning(code, "request %r refused: %s: %s", rid, code, message)
        return error_reply(rid, code, message)

    # ---- requests ------------------------------------------------------------------------------------------

    def _score(self, message: dict, request: Request | None) -> dict:
        """``request`` None: a rehearsal (``_rehearse``), which leaves no trace in PAT windows, drift or counters."""
        model = self.model
        live = request is not None
        part = parse_part(message.get("part"))
        ahead = request.ahead if live else None
        if ahead is not None and ahead.model is model:
            row, score, probability = ahead.row, ahead.score, ahead.probability
            self.metrics.parts_scored_ahead += 1
            if self._sample is not None:
                self._sample[VALIDATE] = time.perf_counter_ns()
        else:
            row = model.parser.parse(message.get("readings"))
            waiting = self._read_ahead(model, request) if live and self.inbox.requests > 1 else []
            if self._sample is not None:
                self._sample[VALIDATE] = time.perf_counter_ns()
            scores, probabilities = model.score(np.stack([row, *(other_row for _, other_row in waiting)]) if waiting
                                                else row[None, :], self._sample)
            for k, (other, other_row) in enumerate(waiting, 1):
                other.ahead = Ahead(model, other_row, float(scores[k]), float(probabilities[k]))
            score, probability = float(scores[0]), float(probabilities[0])
        return {"v": PROTOCOL_VERSION, "type": REPLY_TYPES[SCORE], "id": request.rid if live else None,
                **self._judge(model, self.dynamic if live else None, part, row, score, probability, live),
                "model": model.identity}

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
        for request in itertools.islice(self.inbox.queued(), READ_AHEAD_SCAN * self.config.turn_parts):
            if len(waiting) >= self.config.turn_parts - 1:
                break
            if (request is serving or request.batch is not None or request.ahead is NOT_AHEAD
                    or request.size > STREAM_PARTS_ABOVE_BYTES
                    or (request.ahead is not None and request.ahead.model is model)):
                continue
            request.ahead = NOT_AHEAD
            try:
                message = request.message if request.message is not None else self._decode(request)
                if message.get("type") != SCORE:
                    continue   # decoded again at its turn: only score requests are kept decoded while they wait
                request.message = message
                waiting.append((request, model.parser.parse(message.get("readings"))))
            except ProtocolError:
                continue       # refused at its turn
        return waiting

    def _others_wait(self, router: zmq.Socket) -> bool:
        """Another client is due a turn, or a request waits unread in ZeroMQ."""
        return self.inbox.due or bool(router.get(zmq.EVENTS) & zmq.POLLIN)

    def _score_slice(self, batch: _Batch, others_wait: bool) -> bool:
        """Score the next ``turn_parts`` parts of a batch while others wait, else all the rest in one onnxruntime
        call (a batch alone loses no throughput to slicing); True when every part has its result."""
        model = batch.model
        items = []   # (part, row), or the ProtocolError of a part that cannot be scored
        n = self.config.turn_parts if others_wait else len(batch.parts)
        for i, item in enumerate(batch.parts.take(n), len(batch.results)):
            try:
                items.append(parse_batch_item(item, i, model.parser))
            except ProtocolError as error:
                self.metrics.errors[error.code] += 1
                items.append(error)
        valid = [item for item in items if not isinstance(item, ProtocolError)]
        if valid:
            scores, probabilities = model.score(np.stack([row for _, row in valid]))
        k = 0
        for item in items:
            if isinstance(item, ProtocolError):
                batch.results.append(encode({"error": {"code": item.code, "message": item.message}}))
                continue
            batch.results.append(encode(self._judge(model, batch.dynamic, item[0], item[1], float(scores[k]),
                                                    float(probabilities[k]))))
            k += 1
        return len(batch.results) == len(batch.parts)

    def _judge(self, model: LoadedModel, dynamic: DynamicPat | None, part: Part, row: np.ndarray, score: float,
               probability: float, live: bool = True) -> dict:
        """PAT, drift and the bin for one scored part; the part joins its site's dynamic PAT window. A batch that
        began before a model swap finishes on its model and windows, without drift (which follows the new model).

        A part with too few readings (``BinPolicy.min_readings_share``) gets its own bin, null scores, static PAT
        on what it has, and stays out of the dynamic PAT window and the drift statistics (its scores describe the
        imputed medians, and its empty readings would take a window slot from a real part).
        """
        sample = self._sample
        present = int(np.count_nonzero(row == row))   # NaN != NaN: readings present
        static = model.static_pat.breaks(row)
        if present < self.policy.needed_readings(len(row)):
            decision = decide_insufficient(self.policy, present=present, tests=len(row), static=static)
            if live:
                self._count(decision)
                if self.lifecycle is not None:
                    self.lifecycle.decided(model, part, row, None, None, decision)
            return part_result(None, None, None, None, decision, static, (), present, insufficient=True)
        breaks = dynamic.check_and_add(part, row) if dynamic is not None else []
        if sample is not None:
            sample[PAT] = time.perf_counter_ns()
        if self.drift is not None and model is self.model and live:
            self.drift.update(model, part, row, score)
            if sample is not None:
                sample[DRIFT] = time.perf_counter_ns()
        outlier = score < model.outlier_threshold
        drivers = model.explainer.drivers(row) if outlier or static or breaks else []
        if sample is not None:
            sample[EXPLAIN] = time.perf_counter_ns()
        decision = decide(self.policy, static=static, dynamic=breaks, score=score,
                          score_threshold=model.outlier_threshold, pass_probability=probability,
                          pass_threshold=model.pass_threshold, drivers=drivers)
        if live:
            self._count(decision)
            if sample is not None:
                sample[BIN] = time.perf_counter_ns()
            if self.lifecycle is not None:
                self.lifecycle.decided(model, part, row, score, probability, decision)
                if sample is not None:
                    sample[AUDIT] = time.perf_counter_ns()
        return part_result(score, outlier, probability, probability < model.pass_threshold, decision, static + breaks,
                           drivers, present)

    def _count(self, decision: Decision) -> None:
        self.metrics.parts_scored += 1
        self.metrics.bins[decision.name] += 1
        for flag in decision.flags:
            self.metrics.flags[flag] += 1

    def _work_left(self) -> bool:
        return bool((self.dynamic is not None and self.dynamic.refreshes_due)
                    or (self.drift is not None and self.drift.queued))

    def _work_between_parts(self) -> None:
        """One piece of the work left for when no request waits: a site's due dynamic PAT refresh (64 tests'
        quartiles, 0.1-0.3 ms; every test's once, at the end of a site's warm-up), else one part's drift statistics
        (20-50 us)."""
        if self.dynamic is not None and self.dynamic.refresh_due():
            return
        if self.drift is not None:
            self.drift.take_queued(1)

    def _touchdown_rehearsal_in(self, now: float) -> float | None:
        """Seconds from ``now`` until the rehearsal before the tester's next touchdown (edge_agent/daemon/touchdowns.py);
        None when none is planned or keep-warm is off."""
        if not self.config.keep_warm_ms or self._warm_payload is None:
            return None
        return self._touchdowns.rehearse_in(now)

    def _rehearse(self) -> None:
        """Between parts (idle ``keep_warm_ms``): the last score request's path again, decode to encode, without its
        effects and without a reply, so the next part finds the code, the graphs and the buffers in the caches.
        A request arriving meanwhile waits for at most this one rehearsal."""
        try:
            encode(self._score(decode(self._warm_payload.buffer), None))
        except ProtocolError:   # a model swapped in since takes other readings: rehearse its first real part
            self._warm_payload = None

    def _health(self, message: dict, request: Request) -> dict:
        since = check_stages_since(message.get("stages_since", 0))
        watcher = self._watcher
        return {
            "v": PROTOCOL_VERSION, "type": REPLY_TYPES[HEALTH], "id": request.rid,
            "status": "draining" if self.draining else "serving",
            "model": self.model.describe(),
            "previous_model": None if self.previous is None else self.previous.identity,
            "following": {"registry": str(self.registry.root), "model": self.model.ref.name,
                          "stage": None if self.config.version else self.config.stage,
                          "pinned_version": self.config.version or None,
                          "stage_version": None if watcher is None else watcher.stage_version},
            "last_reload": self.last_reload,
            "dynamic_pat": None if self.dynamic is None else self.dynamic.status(HEALTH_SITES),
            "agent": {"version": __version__, "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
                      "bind": self.config.bind},
            "drift": None if self.drift is None else self.drift.status(),
            "inbox": {"requests": self.inbox.requests, "bytes": self.inbox.bytes, "clients": self.inbox.clients()},
            "limits": self.limits.describe(),
            "stages": self.stages.summary(since),
            "security": self.security.status(),
            "lifecycle": None if self.lifecycle is None else self.lifecycle.status(),
            **self.metrics.snapshot(),
        }

    def _reload(self, message: dict, request: Request) -> dict:
        version = message.get("version")
        if version is not None:
            if isinstance(version, bool) or not isinstance(version, (str, int)):
                raise ProtocolError(Code.WRONG_TYPE, f"field 'version': expected a version number (string or "
                                                     f"integer), got {type(version).__name__}")
            version = str(version)
            if not any(ref.version == version for ref in self.registry.versions(self.model.ref.name)):
                raise ProtocolError(Code.UNKNOWN_VERSION, f"model {self.model.ref.name!r} has no version {version} "
                                                          f"in {self.registry.root}")
        version = version or self.config.version or None   # a pinned agent reloads its pinned version
        self._watcher.request(version)
        what = f"version {version}" if version is not None else f"the {self.config.stage} version"
        return {"v": PROTOCOL_VERSION, "type": REPLY_TYPES[RELOAD], "id": request.rid, "accepted": True,
                "message": f"loading {what} of {self.model.ref.name} in the background; the health reply's "
                           f"last_reload and model tell the outcome"}

    def _refuse_control(self, message: dict, request: Request) -> dict:
        raise ProtocolError(Code.NOT_AUTHORIZED, self.security.control_refusal(message["type"]))

    def _rollback(self, message: dict, request: Request) -> dict:
        if self.previous is None:
            raise ProtocolError(Code.NOTHING_TO_ROLL_BACK, f"no previous model is kept; {self.model.ref} is the "
                                                           f"only model this agent has served")
        replaced = self.model.ref
        self._swap(self.previous, "rollback request")
        self.metrics.rollbacks += 1
        return {"v": PROTOCOL_VERSION, "type": REPLY_TYPES[ROLLBACK], "id": request.rid, "model": self.model.identity,
                "message": f"serving {self.model.ref} again in place of {replaced}"}

    # ---- model swaps -----------------------------------------------------------------------------------------

    def _take_reload_outcomes(self, wake: zmq.Socket) -> None:
        while True:
            try:
                wake.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        while not self._watcher.outcomes.empty():
            outcome: ReloadOutcome = self._watcher.outcomes.get()
            if outcome.model is None:
                result = "refused"
                log.error("reload refused (%s): %s; %s keeps serving\n%s", outcome.trigger, outcome.ref,
                          self.model.ref, "\n".join(f"  - {p}" for p in outcome.problems))
            elif outcome.model.checksum == self.model.checksum:
                result = "unchanged"   # verified again, and it is the package already serving
                log.info("reload (%s): %s verified, already serving it", outcome.trigger, outcome.ref)
            else:
                result = "loaded"
                self._swap(outcome.model, f"{outcome.trigger}, loaded and verified in {outcome.seconds:.2f} s")
            self.metrics.reloads[result] += 1
            self.last_reload = {**outcome.describe(), "outcome": result,
                                "number": sum(self.metrics.reloads.values())}

    def _swap(self, model: LoadedModel, reason: str) -> None:
        self.previous, self.model = self.model, model
        _freeze_heap()
        if self.dynamic is not None and self.dynamic.columns != model.columns:
            self.dynamic = self._dynamic_pat(model)   # other tests: the site windows no longer apply
        elif self.dynamic is not None:
            static = model.static_pat
            self.dynamic.set_rules(static.shape, static.min_sigma, static.k_factor)
        log.info("serving %s (checksum %s) in place of %s: %s", model.ref, model.checksum[:12], self.previous.ref,
                 reason)
        largest = largest_request_bytes(model.parser, self.config.max_batch)
        if not self.config.max_message_bytes and largest > self.limits.max_message_bytes:
            log.warning("%s takes requests up to %d bytes, but the size cap was set at start from the model served "
                        "then (%d bytes): larger score_batch requests are refused; restart the agent to size it for "
                        "this model", model.ref, largest, self.limits.max_message_bytes)

    def _dynamic_pat(self, model: LoadedModel) -> DynamicPat | None:
        pat = self.config.pat
        if not pat.dynamic:
            return None
        static = model.static_pat
        return DynamicPat(model.columns, window=pat.window, min_parts=pat.min_parts, k_sigma=pat.k_sigma,
                          refresh_parts=pat.refresh_parts, reset_on=pat.reset_on, max_sites=pat.max_sites,
                          shape=static.shape, min_sigma=static.min_sigma, k_factor=static.k_factor)


def _freeze_heap() -> None:
    """Exclude every object alive now (imports, loaded models) from garbage collection.

    A full collection walks all tracked objects: about 140,000 after the imports, 40 to 170 ms here, long
    enough to blow a part's latency budget when it happens to run on the serving thread. Requests allocate
    short-lived acyclic objects that reference counting frees, so only the young generations stay to collect.
    """
    gc.freeze()


def _split_frames(client: bytes, frames: list[zmq.Frame]) -> tuple[list[bytes], zmq.Frame | None]:
    """(routing envelope to send back, payload): DEALER sends [payload], REQ sends ["", payload]."""
    if len(frames) == 1:
        return [client], frames[0]
    if len(frames) == 2 and not len(frames[0]):
        return [client, b""], frames[1]
    return [client], None


class _ThrottledLog:
    """Logs at most one line per key per interval and says how many were held back."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, message: str, *args) -> None:
        self._log(key, log.warning, message, args)

    def exception(self, key: str, message: str, *args) -> None:
        """With the traceback of the exception being handled (only the logged ones carry it)."""
        self._log(key, log.exception, message, args)

    def _log(self, key: str, write, message: str, args: tuple) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        write(message + (f" ({held} more like it not logged)" if held else ""), *args)
