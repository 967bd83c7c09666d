"""The serving loop: one thread, one ROUTER socket (and the CURVE control socket, if any), every client served in
turn.

Each pass of the loop takes what ZeroMQ holds into the inbox (``_receive``: one round of ZeroMQ's fair queue at
most, each connection's next request once) and serves one turn of the least-served client (``_turn``; the order of
service is fairness.py's). The hot path is ``_serve``: decode -> validate -> deadline -> score (score_path.py) ->
decide (decision.py) -> reply, all of it for a small request; a score_batch is scored ``turn_parts`` parts per turn,
each turn followed by the other clients' turns, on the model it started with. One client's requests are served in
order, so its replies come back in the order of its requests; models are swapped only between turns (control.py's
``ServedModels``), so a request never sees two models. The control messages (health, reload, rollback) are
control.py's ``ControlCommands``. What the agent holds for its clients is bounded by edge_agent/daemon/limits.py.

Work a reply does not need waits until no request does (``ScorePath.work_between_parts``): a part's drift
statistics (queued by the drift hook) and its site's dynamic PAT refresh (marked due by DynamicPat), one piece per
pass of the loop, so a request arriving meanwhile waits for at most one piece.

Every ``stage_sample_every``-th request is timed stage by stage (edge_agent/daemon/stages.py, the health reply's
``stages``). With no request for ``keep_warm_ms`` the loop rehearses the last score request (score_path.py's
``KeepWarm``), and once more just before the tester's next touchdown is due (edge_agent/daemon/touchdowns.py), so the
touchdown after a pause does not meet cold caches.
"""
from __future__ import annotations

import errno
import logging
import sys
import time

import zmq

from .config import AgentConfig
from .control import ControlCommands, ServedModels, freeze_heap
from .decision import DriftHook, LifecycleHook, PartDecider
from ..errors import listen_error
from .fairness import Inbox
from .limits import Limits, derive
from .metrics import Metrics, start_prometheus
from ..package.registry import Registry
from .reload import ReloadWatcher
from .scoring import LoadedModel
from .score_path import KeepWarm, Request, ScorePath, decode_request
from .security import AgentSecurity
from .slow import ACTIVITIES, SlowReplies
from .stages import DECODE, ENCODE, SEND, StageSampler
from ..wire.codec import encode
from ..wire.score import (HEALTH, RELOAD, ROLLBACK, SCORE, SCORE_BATCH, SCORE_TOUCHDOWN, Code, ProtocolError,
                          check_deadline, check_envelope, encode_batch_reply, error_reply, peek_id)

log = logging.getLogger("edge_agent.daemon.server")

POLL_MS = 100                 # how soon a stop request (SIGTERM) is noticed when no request arrives
BURST = 64                    # control requests served before the clients' next turn
ERROR_LOG_INTERVAL_S = 1.0    # at most one log line per error code per interval (a bad client floods)
# ZeroMQ moves bytes between sockets and queues on its own threads, each connection on one of them. With two, a
# connection flooding megabyte messages keeps one busy while the others' small requests go through the other
# (measured under a 20-connection flood: 95-98 % of a 20 ms client's parts decided against 48-93 % with one).
IO_THREADS = 2
# While the reload thread (or a Prometheus scrape) runs Python code, the serving thread waits for the GIL up to
# the switch interval: 5 ms by default, 0.2 ms here. Only costs anything while two threads want the GIL.
GIL_SWITCH_INTERVAL_S = 200e-6


class Agent:
    """The daemon: serves one model (and keeps the previous one) on one ROUTER socket until asked to stop."""

    def __init__(self, config: AgentConfig, registry: Registry, model: LoadedModel, *,
                 drift: DriftHook | None = None, security: AgentSecurity | None = None,
                 lifecycle: LifecycleHook | None = None):
        self.config = config
        self.registry = registry
        self.metrics = Metrics()
        self.policy = config.binning.policy()
        self.drift = drift
        self.lifecycle = lifecycle
        self.draining = False
        # Socket options are set once, at bind, from the model served then (a reload warns if it needs more).
        self.limits: Limits = derive(config.max_message_bytes, config.transport_max_message_bytes, config.max_batch,
                                     config.queue_length, config.max_queued_bytes, model.parser, self.policy)
        self.inbox = Inbox(self.limits.client_queue_bytes, self.limits.max_queued_bytes, self.limits.held_reply_bytes)
        self.models = ServedModels(config, self.metrics, self.limits, model)
        self.decider = PartDecider(self.policy)
        self.path = ScorePath(self.models, self.inbox, self.metrics, self.decider, turn_parts=config.turn_parts,
                              max_batch=config.max_batch, max_message_bytes=self.limits.max_message_bytes,
                              drift=drift, lifecycle=lifecycle)
        self._max_age_s = config.max_request_age_ms / 1000.0
        self._stop_requested = False
        self._error_log = _ThrottledLog(ERROR_LOG_INTERVAL_S)
        self.security = security or AgentSecurity.load(config.security)
        # Control messages are served on the authenticated control socket only (edge_agent/daemon/security.py); a
        # score request is served by ``self.path``, a score_batch a turn at a time by ``_serve``.
        commands = ControlCommands(self)
        self._control_handlers = {HEALTH: commands.health, RELOAD: commands.reload, ROLLBACK: commands.rollback}
        self._handlers = {**self._control_handlers, RELOAD: commands.refuse, ROLLBACK: commands.refuse}
        self.stages = StageSampler(config.stage_sample_every)
        self.slow = SlowReplies(config.slow_reply_ms, self.metrics.slow_replies)
        self.watcher: ReloadWatcher | None = None
        self.keep_warm = KeepWarm(self.path, config.keep_warm_ms)

    def request_stop(self, *_signal_args) -> None:
        """Finish: answer what has arrived, then return from serve(). Safe from a signal handler."""
        self._stop_requested = True

    def request_reload(self, *_signal_args) -> None:
        """Reload whatever the followed stage names now (SIGHUP). Safe from a signal handler."""
        if self.watcher is not None:
            self.watcher.request(self.config.version or None)

    def request_version(self, version: str) -> None:
        """Load ``version`` in the background and serve it (the fleet follower's thread, which waits here until
        serve() has started the loader). Thread-safe."""
        while self.watcher is None:
            time.sleep(0.05)
        self.watcher.request(version)

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
            prometheus = _serve_prometheus(self) if self.config.metrics.port else None
            self.watcher = ReloadWatcher(
                self.registry, self.models.model.ref.name, self.config.stage, pinned=bool(self.config.version),
                serving_version=self.models.model.ref.version, interval_s=self.config.watch_interval_s,
                yield_variant=self.config.yield_variant, context=context, wake_address=wake_address)
            self.watcher.start()
            freeze_heap()
            model = self.models.model
            log.info("serving %s (checksum %s) on %s%s", model.ref, model.checksum[:12], self.config.bind,
                     f", metrics on http://{self.config.metrics.host}:{self.config.metrics.port}/metrics"
                     if prometheus else "")
            log.info("requests up to %d bytes (ZeroMQ drops a connection past %d); per connection at most %.1f MB "
                     "held (edge_agent/daemon/limits.py)", self.limits.max_message_bytes,
                     self.limits.transport_max_message_bytes, self.limits.per_connection_bytes / 1e6)
            ACTIVITIES.watch_gc()
            self._loop(router, wake, control)
        finally:
            ACTIVITIES.unwatch_gc()
            if self.watcher is not None:
                self.watcher.stop()
                self.watcher.join(timeout=2.0)
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
            touchdown_s = self.keep_warm.rehearsal_in(now) if deadline is None else None
            if touchdown_s is not None:
                wait_ms = min(wait_ms, max(0.0, touchdown_s * 1000))
            behind = self.path.work_left()
            if not self.inbox.due and not poller.poll(0 if behind else wait_ms):
                self._send_held(router)
                began = time.perf_counter()
                if behind:
                    self.path.work_between_parts()
                    ACTIVITIES.mark("between parts (PAT refresh, drift statistics)", began)
                    continue
                if deadline is not None and wait_ms == quiet_ms and not self.inbox.requests and not self.inbox.held:
                    return   # quiet for drain_quiet_ms: every request that arrived has its reply
                if self.drift is not None:
                    self.drift.tick()   # closes a window whose time is up while no parts arrive
                    ACTIVITIES.mark("drift tick (a window closing)", began)
                if self.lifecycle is not None:
                    began = time.perf_counter()
                    self.lifecycle.tick()
                    ACTIVITIES.mark("lifecycle tick (audit, shadow)", began)
                if self.keep_warm.payload is not None:
                    began = time.perf_counter()
                    self.keep_warm.rehearse()
                    ACTIVITIES.mark("keep-warm rehearsal", began)
            else:
                if wake.get(zmq.EVENTS) & zmq.POLLIN:
                    began = time.perf_counter()
                    self.models.take_reload_outcomes(self.watcher, wake)
                    ACTIVITIES.mark("reload", began)
                if control is not None:
                    began = time.perf_counter()
                    self._serve_control(control)
                    ACTIVITIES.mark("control requests", began)
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
            self.keep_warm.touchdowns.arrived(request.received)
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
        if request.started is None:
            request.started = start
        finished = self._serve(router, request)
        self.inbox.served(client, time.perf_counter() - start, finished)

    def _others_wait(self, router: zmq.Socket) -> bool:
        """Another client is due a turn, or a request waits unread in ZeroMQ."""
        return self.inbox.due or bool(router.get(zmq.EVENTS) & zmq.POLLIN)

    def _serve_control(self, control: zmq.Socket) -> None:
        """Requests on the CURVE control socket: from the few allowed operators' keys, each served whole at once,
        between two clients' turns (a reload or rollback swaps models only there)."""
        for _ in range(BURST):
            if not control.get(zmq.EVENTS) & zmq.POLLIN:
                return
            frames = control.recv_multipart(copy=False)
            self._serve(control, Request(frames[0].bytes, frames[1:], time.perf_counter()), control=True)

    def _serve(self, socket: zmq.Socket, request: Request, *, control: bool = False) -> bool:
        """One turn of ``request``: decode -> validate -> deadline -> score -> decide -> reply, or
        one slice of a score_batch (``turn_parts`` parts). True once its reply is sent. ``control``: a request on the
        control socket, served whole, with the control messages allowed and its reply never held."""
        handlers, hold = (self._control_handlers, False) if control else (self._handlers, True)
        try:
            if request.batch is None:
                sample = self.stages.begin(request.received)
                message = self._open(request, sample)
                kind = message["type"]
                if kind in (SCORE, SCORE_TOUCHDOWN) and self.keep_warm.on:
                    self.keep_warm.payload = request.payload
                if kind == SCORE:
                    self._reply(socket, request, self.path.score(message, request, sample), hold=hold, sample=sample)
                    return True
                if kind not in (SCORE_BATCH, SCORE_TOUCHDOWN):   # only single score requests are sampled
                    self._reply(socket, request, handlers[kind](message, request), hold=hold)
                    return True
                request.batch = self.path.start_batch(message, request)
            if not self.path.score_slice(request.batch, not control and self._others_wait(socket)):
                return False
            self._reply(socket, request, request.batch.reply(), request.batch.results, hold=hold)
        except ProtocolError as error:
            self._reply(socket, request, self._error(request.rid, error.code, error.message), hold=hold)
        except Exception as error:   # a bug must cost one reply, never the daemon
            self._error_log.exception("internal_error", "internal error on a request")
            self._reply(socket, request, self._error(request.rid, Code.INTERNAL_ERROR,
                                                     f"{type(error).__name__}: {str(error)[:300]}"), hold=hold)
        return True

    def _open(self, request: Request, sample: list[int] | None) -> dict:
        """A request's first turn: not too old, framing, size, msgpack, envelope and deadline; counted by type."""
        waited = time.perf_counter() - request.received
        if self._max_age_s and waited > self._max_age_s and request.payload is not None:
            request.rid = peek_id(request.payload.buffer)
            raise ProtocolError(Code.DEADLINE_EXCEEDED, f"the request waited {waited * 1e3:.0f} ms in the agent, "
                                                        f"longer than max_request_age_ms "
                                                        f"{self.config.max_request_age_ms}; not scored")
        try:
            message = (request.message if request.message is not None
                       else decode_request(request, self.limits.max_message_bytes))
            kind = check_envelope(message)
        except ProtocolError:
            self.metrics.requests["invalid"] += 1
            raise
        self.metrics.requests[kind] += 1
        if "deadline" in message:
            check_deadline(message["deadline"], time.time())
        if sample is not None:
            sample[DECODE] = time.perf_counter_ns()
        return message

    def _reply(self, router: zmq.Socket, request: Request, reply: dict, results: list[bytes] | None = None, *,
               hold: bool = True, sample: list[int] | None = None) -> None:
        """Send a reply. One ZeroMQ will not queue now, or that must follow the client's replies held already, is held
        (fairness.py: in order; a client with too much held gets no more turns until it has been sent); with ``hold``
        False (a refusal outside the client's turns) it is dropped instead."""
        reply["agent_us"] = round((time.perf_counter() - request.received) * 1e6, 1)
        payload = encode(reply) if results is None else encode_batch_reply(reply, results)
        if sample is not None:   # a score request's stage sample, filed once its reply is sent
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
        sent = time.perf_counter()
        self.metrics.latency.record(sent - request.received)
        self.slow.check(reply["type"], request.received, request.started, sent,
                        None if sample is None else self.stages.latest_us())

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
        self.metrics.errors[code] += 1
        self._error_log.warning(code, "request %r refused: %s: %s", rid, code, message)
        return error_reply(rid, code, message)


def _serve_prometheus(agent: Agent):
    """The agent's Prometheus endpoint (metrics.start_prometheus: the server and its thread)."""
    host, port = agent.config.metrics.host, agent.config.metrics.port
    try:
        return start_prometheus(agent.metrics, lambda: agent.models.model.identity, host, port,
                                drift=None if agent.drift is None else agent.drift.status,
                                lifecycle=None if agent.lifecycle is None else agent.lifecycle.status)
    except OSError as error:
        raise listen_error(f"cannot serve Prometheus metrics on {host}:{port}", error.errno, error.strerror) from None


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
