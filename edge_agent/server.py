"""The serving loop: one thread, one ROUTER socket (and the CURVE control socket, if any), requests answered in
arrival order.

The hot path is ``Agent._handle``: decode -> validate -> score -> PAT -> drift hook -> bin -> reply.
Answering each request before reading the next one gives per-client reply order for free, and swapping
models only between requests (``_take_reload_outcomes``) means a request never sees two models.
"""
from __future__ import annotations

import errno
import gc
import logging
import os
import sys
import time
from typing import Protocol

import numpy as np
import zmq

from . import __version__
from .binning import Decision, decide, decide_insufficient
from .config import AgentConfig
from .errors import EdgeError
from .metrics import Metrics, start_prometheus
from .package.registry import Registry
from .pat import DynamicPat
from .reload import ReloadOutcome, ReloadWatcher
from .scoring import LoadedModel
from .security import AgentSecurity
from .wire.codec import encode
from .wire.score import (HEALTH, PROTOCOL_VERSION, RELOAD, REPLY_TYPES, ROLLBACK, SCORE, SCORE_BATCH, Code, Part,
                         ProtocolError, check_envelope, decode, error_reply, parse_batch, parse_batch_item, parse_part,
                         request_id)

log = logging.getLogger("edge_agent.server")

POLL_MS = 100                 # how soon a stop request (SIGTERM) is noticed when no request arrives
BURST = 64                    # requests served before the loop looks at reload outcomes again
ERROR_LOG_INTERVAL_S = 1.0    # at most one log line per error code per interval (a bad client floods)
# While the reload thread (or a Prometheus scrape) runs Python code, the serving thread waits for the GIL up to
# the switch interval: 5 ms by default, 0.2 ms here. Only costs anything while two threads want the GIL.
GIL_SWITCH_INTERVAL_S = 200e-6


class DriftHook(Protocol):
    """Streaming drift statistics (edge_agent.upstream.AgentDrift): every scored part, idle ticks, status."""

    def update(self, model: LoadedModel, part: Part, readings: np.ndarray, score: float) -> None: ...

    def tick(self) -> None: ...

    def status(self) -> dict: ...


class LifecycleHook(Protocol):
    """Audit and shadow challenger (edge_agent.lifecycle.Lifecycle): every decided part, idle ticks, status."""

    def decided(self, model: LoadedModel, part: Part, row: np.ndarray, score: float | None,
                probability: float | None, decision: Decision) -> None: ...

    def tick(self) -> None: ...

    def status(self) -> dict: ...


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
        self._stop_requested = False
        self._error_log = _ThrottledLog(ERROR_LOG_INTERVAL_S)
        self.security = security or AgentSecurity.load(config.security)
        # Control messages are served on the authenticated control socket only (edge_agent/security.py).
        self._control_handlers = {SCORE: self._score, SCORE_BATCH: self._score_batch, HEALTH: self._health,
                                  RELOAD: self._reload, ROLLBACK: self._rollback}
        self._handlers = {**self._control_handlers, RELOAD: self._refuse_control, ROLLBACK: self._refuse_control}
        self._watcher: ReloadWatcher | None = None

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
        context = zmq.Context()
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.RCVHWM, self.config.queue_length)
        router.setsockopt(zmq.SNDHWM, self.config.queue_length)
        router.setsockopt(zmq.MAXMSGSIZE, self.config.transport_max_message_bytes)
        router.setsockopt(zmq.LINGER, int(self.config.shutdown_timeout_s * 1000))
        wake = context.socket(zmq.PAIR)
        wake_address = f"inproc://edge-agent-reload-{id(self)}"
        wake.bind(wake_address)
        prometheus = None
        try:
            control = self.security.open(context, router, self.config.transport_max_message_bytes)
            try:
                router.bind(self.config.bind)
            except zmq.ZMQError as error:
                raise EdgeError(f"cannot listen on {self.config.bind}: {error.strerror}") from None
            if self.config.metrics.port:
                try:
                    prometheus = start_prometheus(self.metrics, lambda: self.model.identity,
                                                  self.config.metrics.host, self.config.metrics.port)
                except OSError as error:
                    raise EdgeError(f"cannot serve Prometheus metrics on {self.config.metrics.host}:"
                                    f"{self.config.metrics.port}: {error.strerror}") from None
            self._watcher = ReloadWatcher(
                self.registry, self.model.ref.name, self.config.stage, pinned=bool(self.config.version),
                serving_version=self.model.ref.version, interval_s=self.config.watch_interval_s,
                yield_variant=self.config.yield_variant, context=context, wake_address=wake_address)
            self._watcher.start()
            _freeze_heap()
            log.info("serving %s (checksum %s) on %s%s", self.model.ref, self.model.checksum[:12], self.config.bind,
                     f", metrics on http://{self.config.metrics.host}:{self.config.metrics.port}/metrics"
                     if prometheus else "")
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
            events = dict(poller.poll(POLL_MS if deadline is None else self.config.drain_quiet_ms))
            if wake in events:
                self._take_reload_outcomes(wake)
            if control in events:
                self._serve_control(control)
            if router in events:
                self._serve_ready(router)
            elif self.drift is not None:
                self.drift.tick()   # closes a window whose time is up while no parts arrive
            if router not in events and self.lifecycle is not None:
                self.lifecycle.tick()
            if router not in events and deadline is not None:
                return   # quiet for drain_quiet_ms: every request that arrived has its reply
            if deadline is not None and time.monotonic() > deadline:
                log.warning("shutdown timeout (%.1f s) reached while requests kept arriving",
                            self.config.shutdown_timeout_s)
                return

    def _serve_ready(self, router: zmq.Socket) -> None:
        for _ in range(BURST):
            if not router.get(zmq.EVENTS) & zmq.POLLIN:   # cheaper than a recv that raises zmq.Again
                return
            self._handle(router, router.recv_multipart())

    def _serve_control(self, control: zmq.Socket) -> None:
        for _ in range(BURST):
            if not control.get(zmq.EVENTS) & zmq.POLLIN:
                return
            self._handle(control, control.recv_multipart(), self._control_handlers)

    def _handle(self, router: zmq.Socket, frames: list[bytes], handlers: dict | None = None) -> None:
        start = time.perf_counter()
        envelope, payload = _split_frames(frames)
        rid = kind = None
        try:
            if payload is None:
                raise ProtocolError(Code.MALFORMED_MESSAGE, f"expected one payload frame (DEALER) or an empty "
                                                            f"delimiter and one payload frame (REQ), got "
                                                            f"{len(frames) - 1} frame(s)")
            if len(payload) > self.config.max_message_bytes:
                raise ProtocolError(Code.MESSAGE_TOO_LARGE, f"message of {len(payload)} bytes exceeds "
                                                            f"max_message_bytes {self.config.max_message_bytes}")
            message = decode(payload)
            rid = request_id(message)
            kind = check_envelope(message)
            self.metrics.requests[kind] += 1
            reply = (handlers or self._handlers)[kind](message, rid)
        except ProtocolError as error:
            if kind is None:
                self.metrics.requests["invalid"] += 1
            reply = self._error(rid, error.code, error.message)
        except Exception as error:   # a bug must cost one reply, never the daemon
            log.exception("internal error on a request")
            reply = self._error(rid, Code.INTERNAL_ERROR, f"{type(error).__name__}: {error}")
        reply["agent_us"] = round((time.perf_counter() - start) * 1e6, 1)
        self._send(router, envelope, encode(reply))
        self.metrics.latency.record(time.perf_counter() - start)

    def _send(self, router: zmq.Socket, envelope: list[bytes], payload: bytes) -> None:
        try:
            router.send_multipart([*envelope, payload], zmq.NOBLOCK)
        except zmq.Again:
            self.metrics.replies_dropped["queue_full"] += 1
        except zmq.ZMQError as error:
            if error.errno != errno.EHOSTUNREACH:
                raise
            self.metrics.replies_dropped["unroutable"] += 1   # the client went away before its reply

    def _error(self, rid, code: str, message: str) -> dict:
        self.metrics.errors[code] += 1
        self._error_log.warning(code, "request %r refused: %s: %s", rid, code, message)
        return error_reply(rid, code, message)

    # ---- requests ------------------------------------------------------------------------------------------

    def _score(self, message: dict, rid) -> dict:
        model = self.model
        part = parse_part(message.get("part"))
        row = model.parser.parse(message.get("readings"))
        scores, probabilities = model.score(row[None, :])
        return {"v": PROTOCOL_VERSION, "type": REPLY_TYPES[SCORE], "id": rid,
                **self._judge(model, part, row, float(scores[0]), float(probabilities[0])), "model": model.identity}

    def _score_batch(self, message: dict, rid) -> dict:
        model = self.model
        items = []   # (part, row), or the ProtocolError of a part that cannot be scored
        for i, item in enumerate(parse_batch(message, self.config.max_batch)):
            try:
                items.append(parse_batch_item(item, i, model.parser))
            except ProtocolError as error:
                self.metrics.errors[error.code] += 1
                items.append(error)
        valid = [item for item in items if not isinstance(item, ProtocolError)]
        if valid:
            scores, probabilities = model.score(np.stack([row for _, row in valid]))
        results, k = [], 0
        for item in items:
            if isinstance(item, ProtocolError):
                results.append({"error": {"code": item.code, "message": item.message}})
                continue
            results.append(self._judge(model, item[0], item[1], float(scores[k]), float(probabilities[k])))
            k += 1
        return {"v": PROTOCOL_VERSION, "type": REPLY_TYPES[SCORE_BATCH], "id": rid, "results": results,
                "model": model.identity}

    def _judge(self, model: LoadedModel, part: Part, row: np.ndarray, score: float, probability: float) -> dict:
        """PAT, drift and the bin for one scored part; the part joins its site's dynamic PAT window.

        A part with too few readings (``BinPolicy.min_readings_share``) gets its own bin, null scores, static PAT
        on what it has, and stays out of the dynamic PAT window and the drift statistics (its scores describe the
        imputed medians, and its empty readings would take a window slot from a real part).
        """
        present = int(np.count_nonzero(row == row))   # NaN != NaN: readings present
        static = model.static_pat.breaks(row)
        if present < self.policy.needed_readings(len(row)):
            decision = decide_insufficient(self.policy, present=present, tests=len(row), static=static)
            self._count(decision)
            if self.lifecycle is not None:
                self.lifecycle.decided(model, part, row, None, None, decision)
            return {"outlier_score": None, "outlier": None, "pass_probability": None, "predicted_fail": None,
                    "bin": decision.bin, "bin_name": decision.name, "why": decision.why, "flags": decision.flags,
                    "pat": [b.to_wire() for b in static], "drivers": [], "insufficient_readings": True,
                    "tests_present": present}
        dynamic = self.dynamic.check_and_add(part, row) if self.dynamic is not None else []
        if self.drift is not None:
            self.drift.update(model, part, row, score)
        outlier = score < model.outlier_threshold
        drivers = model.explainer.drivers(row) if outlier or static or dynamic else []
        decision = decide(self.policy, static=static, dynamic=dynamic, score=score,
                          score_threshold=model.outlier_threshold, pass_probability=probability,
                          pass_threshold=model.pass_threshold, drivers=drivers)
        self._count(decision)
        if self.lifecycle is not None:
            self.lifecycle.decided(model, part, row, score, probability, decision)
        return {"outlier_score": score, "outlier": outlier, "pass_probability": probability,
                "predicted_fail": probability < model.pass_threshold, "bin": decision.bin,
                "bin_name": decision.name, "why": decision.why, "flags": decision.flags,
                "pat": [b.to_wire() for b in static] + [b.to_wire() for b in dynamic],
                "drivers": [d.to_wire() for d in drivers], "insufficient_readings": False, "tests_present": present}

    def _count(self, decision: Decision) -> None:
        self.metrics.parts_scored += 1
        self.metrics.bins[decision.name] += 1
        for flag in decision.flags:
            self.metrics.flags[flag] += 1

    def _health(self, message: dict, rid) -> dict:
        watcher = self._watcher
        return {
            "v": PROTOCOL_VERSION, "type": REPLY_TYPES[HEALTH], "id": rid,
            "status": "draining" if self.draining else "serving",
            "model": self.model.describe(),
            "previous_model": None if self.previous is None else self.previous.identity,
            "following": {"registry": str(self.registry.root), "model": self.model.ref.name,
                          "stage": None if self.config.version else self.config.stage,
                          "pinned_version": self.config.version or None,
                          "stage_version": None if watcher is None else watcher.stage_version},
            "last_reload": self.last_reload,
            "dynamic_pat": None if self.dynamic is None else {"window": self.dynamic.window,
                                                              "min_parts": self.dynamic.min_parts,
                                                              "sites": self.dynamic.sites()},
            "agent": {"version": __version__, "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
                      "bind": self.config.bind},
            "drift": None if self.drift is None else self.drift.status(),
            "security": self.security.status(),
            "lifecycle": None if self.lifecycle is None else self.lifecycle.status(),
            **self.metrics.snapshot(),
        }

    def _reload(self, message: dict, rid) -> dict:
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
        return {"v": PROTOCOL_VERSION, "type": REPLY_TYPES[RELOAD], "id": rid, "accepted": True,
                "message": f"loading {what} of {self.model.ref.name} in the background; the health reply's "
                           f"last_reload and model tell the outcome"}

    def _refuse_control(self, message: dict, rid) -> dict:
        raise ProtocolError(Code.NOT_AUTHORIZED, self.security.control_refusal(message["type"]))

    def _rollback(self, message: dict, rid) -> dict:
        if self.previous is None:
            raise ProtocolError(Code.NOTHING_TO_ROLL_BACK, f"no previous model is kept; {self.model.ref} is the "
                                                           f"only model this agent has served")
        replaced = self.model.ref
        self._swap(self.previous, "rollback request")
        self.metrics.rollbacks += 1
        return {"v": PROTOCOL_VERSION, "type": REPLY_TYPES[ROLLBACK], "id": rid, "model": self.model.identity,
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


def _split_frames(frames: list[bytes]) -> tuple[list[bytes], bytes | None]:
    """(routing envelope to send back, payload): DEALER sends [payload], REQ sends ["", payload]."""
    identity, rest = frames[0], frames[1:]
    if len(rest) == 1:
        return [identity], rest[0]
    if len(rest) == 2 and rest[0] == b"":
        return [identity, b""], rest[1]
    return [identity], None


class _ThrottledLog:
    """Logs at most one line per key per interval and says how many were held back."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, message: str, *args) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        log.warning(message + (f" ({held} more like it not logged)" if held else ""), *args)
