"""The collector's receive loop: one ROUTER, one thread.

Per loop turn: read every message that is ready (up to ``BATCH``), store the valid ones and their alerts in
one SQLite transaction, commit (durable), then acknowledge each one. A window already stored (same agent,
spool stream and seq) is acknowledged as a duplicate and not stored again. A message that cannot be valid
(``parse_stats`` checks every type and range the store needs) gets a permanent refusal and a ``refused_window``
alert; the agent moves it to its dead-letter folder and goes on. A failed write gets a transient refusal and no
ack, so the agent sends it again: while the database itself fails (locked, full, I/O: sqlite3.OperationalError)
for as long as that lasts, otherwise (the window trips a constraint or a bug) STORE_ATTEMPTS times, then it is
refused for good (``unstorable``) so that it cannot hold up the windows behind it. Codes and replies:
``wire/stats.py`` and STATS_PROTOCOL.md.

With ``keys`` the ROUTER is a CURVE server: only allow-listed agent keys get in, each known by the agent id its key
is bound to, and a window that claims another agent's id is refused for good, counted and alerted.
The incidents a window opens, updates or closes (``incidents.py``) are written in its transaction too.
"""
from __future__ import annotations

import errno
import logging
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass

import msgpack
import zmq
from prometheus_client import CollectorRegistry, start_http_server

from ..errors import EdgeError
from ..wire.codec import encode
from ..wire.links import CurvePair, Gatekeeper, peer_id, serve_curve
from ..wire.stats import Code, InvalidMessage, StatsWindow, ack, parse_stats, refusal
from .alerts import EVIDENCE_KINDS, AlertHook, AlertRules
from .incidents import IncidentTracker
from .prometheus import FleetState
from .store import Store

log = logging.getLogger("edge_agent.collector.server")

BATCH = 256               # messages per transaction at most
POLL_MS = 200
MAX_MESSAGE_BYTES = 64 << 20
STORE_ATTEMPTS = 3        # a valid window whose store failed this often, the database working, is refused for good
FAILURES_TRACKED = 1024   # windows whose failed attempts are remembered (the oldest forgotten first)
AGENTS_DOMAIN = "agents"   # the ZAP domain of the collector's ROUTER


@dataclass(frozen=True)
class CollectorKeys:
    """The collector's CURVE key pair and the agents allowed in: public key -> the agent id it is bound to."""

    pair: CurvePair
    agents: dict[bytes, str]


class CollectorServer:
    def __init__(self, bind: str, store: Store, rules: AlertRules, *, hook: AlertHook | None = None,
                 metrics_host: str = "127.0.0.1", metrics_port: int = 0, keys: CollectorKeys | None = None):
        self.bind = bind
        self.keys = keys
        self.store = store
        self.rules = rules
        self.incidents = IncidentTracker(rules.config.incidents, store)
        self.hook = hook
        self.metrics_host, self.metrics_port = metrics_host, metrics_port
        self.state = FleetState(rules.config.silent_after_s)
        for agent in store.agents():
            self.state.last_seen[agent["agent_id"]] = agent["last_seen"]
        self.state.incidents_open.update(incident.scope for incident in self.incidents.open_incidents())
        self._stop = False
        self._store_failures: OrderedDict[tuple, int] = OrderedDict()   # window key -> failed attempts

    def request_stop(self, *_signal_args) -> None:
        """Finish the current batch, then return from serve(). Safe from a signal handler."""
        self._stop = True

    def serve(self) -> None:
        context = zmq.Context()
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        router.setsockopt(zmq.LINGER, 1000)
        http = None
        gatekeeper = self._secure(context, router)
        try:
            try:
                router.bind(self.bind)
            except zmq.ZMQError as error:
                raise EdgeError(f"cannot listen on {self.bind}: {error.strerror}") from None
            if self.metrics_port:
                registry = CollectorRegistry()
                registry.register(self.state)
                try:
                    http = start_http_server(self.metrics_port, self.metrics_host, registry=registry)
                except OSError as error:
                    raise EdgeError(f"cannot serve metrics on {self.metrics_host}:{self.metrics_port}: "
                                    f"{error.strerror}") from None
            log.info("collecting on %s (%s) into %s%s", self.bind, "plain: loopback only" if self.keys is None else
                     f"CURVE, {len(self.keys.agents)} agent key(s) allowed", self.store.path,
                     f", metrics on http://{self.metrics_host}:{self.metrics_port}/metrics" if http else "")
            self._loop(router)
        finally:
            if http is not None:
                http[0].shutdown()
            router.close()
            if gatekeeper is not None:
                gatekeeper.stop()
            context.term()
            if self.hook is not None:
                self.hook.stop()
            log.info("stopped after %d messages (%d duplicates)", self.state.received, self.state.duplicates)

    def _secure(self, context: zmq.Context, router: zmq.Socket) -> Gatekeeper | None:
        """CURVE on the ROUTER (before it binds) and the ZAP handler that admits the allow-listed agents."""
        if self.keys is None:
            return None
        gatekeeper = Gatekeeper(context)
        gatekeeper.admit(AGENTS_DOMAIN, self.keys.agents)
        serve_curve(router, self.keys.pair, AGENTS_DOMAIN)
        return gatekeeper

    def _loop(self, router: zmq.Socket) -> None:
        silence_check_s = max(0.2, min(5.0, self.rules.config.silent_after_s / 4))
        next_silence_check = 0.0
        while not self._stop:
            if router.poll(POLL_MS, zmq.POLLIN):
                self._serve_batch(router)
            if time.monotonic() >= next_silence_check:
                self._check_silence()
                self._check_incidents()
                next_silence_check = time.monotonic() + silence_check_s

    def _serve_batch(self, router: zmq.Socket) -> None:
        batch: list[tuple[bytes, StatsWindow]] = []
        forged: list[tuple[bytes, str, StatsWindow]] = []
        for _ in range(BATCH):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            with self.state.lock:
                self.state.received += 1
            identity, payload = frames[0].bytes, frames[-1].bytes
            message = None
            try:
                message = msgpack.unpackb(payload, raw=False) if len(frames) == 2 else None
                if message is None:
                    raise InvalidMessage(f"expected one payload frame from a DEALER, got {len(frames) - 1}")
                window = parse_stats(message)
                sender = None if self.keys is None else peer_id(frames[-1])
                if sender is not None and window["agent_id"] != sender:
                    forged.append((identity, sender, window))
                    continue
                batch.append((identity, window))
            except (InvalidMessage, ValueError, TypeError) as error:
                seq = message.get("seq") if isinstance(message, dict) else None
                with self.state.lock:
                    self.state.invalid += 1
                log.warning("refused a message from %s: %s", _peer(message), error)
                self._reply(router, identity, refusal(Code.INVALID_MESSAGE, str(error),
                                                      seq if type(seq) is int else None))
                self._alert_refusal(message, Code.INVALID_MESSAGE, str(error))
        if forged:
            self._refuse_forged(router, forged)
        if batch:
            self._store(router, batch)

    def _refuse_forged(self, router: zmq.Socket, forged: list[tuple[bytes, str, StatsWindow]]) -> None:
        """Windows that claim another agent's id than their sender's key: refused for good, counted, alerted."""
        now = time.time()
        alerts = [alert for _, sender, window in forged
                  for alert in self.rules.for_agent_id_mismatch(sender, window, now)]
        try:
            with self.store.transaction():
                for alert in alerts:
                    self.store.add_alert(alert)
        except sqlite3.Error as error:
            log.error("storing %d agent_id_mismatch alert(s) failed: %s", len(alerts), error)
        with self.state.lock:
            self.state.agent_id_mismatches += len(forged)
        for identity, sender, window in forged:
            problem = (f"agent_id {window['agent_id']!r} is not the id of the key that sent the window "
                       f"(agent {sender!r})")
            log.warning("refused window seq %s: %s", window["seq"], problem)
            self._reply(router, identity, refusal(Code.AGENT_ID_MISMATCH, problem, window["seq"]))
        self._announce(alerts)

    def _store(self, router: zmq.Socket, batch: list[tuple[bytes, StatsWindow]]) -> None:
        received_at = time.time()
        outcomes, alerts, judged, incidents = [], [], [], []
        try:
            with self.store.transaction():
                for _, window in batch:
                    added = self.store.add_window(window, received_at)
                    outcomes.append(added)
                    if added is not None:
                        verdict = self.rules.for_window(window, added, received_at)
                        for alert in verdict.alerts:
                            self.store.add_alert(alert)
                        alerts += verdict.alerts
                        judged.append((window["tester"], verdict.psi))
                        incidents += self.incidents.for_window(window, added, received_at)
        except Exception as error:   # sqlite3 errors (disk full, locked) and bugs: the loop must go on for others
            self.rules.forget_sums()
            self.incidents.reload()
            if len(batch) > 1:       # one at a time, so that one message that cannot be stored holds up no other
                for item in batch:
                    self._store(router, [item])
                return
            (identity, window), = batch
            if self._give_up(window, error):
                log.error("storing window seq %d of %s failed %d times while the database works: refused for good "
                          "(unstorable): %s", window["seq"], _peer(window.message), STORE_ATTEMPTS, error)
                with self.state.lock:
                    self.state.unstorable += 1
                self._reply(router, identity, refusal(Code.UNSTORABLE, f"{STORE_ATTEMPTS} attempts to store it "
                                                                       f"failed: {error}", window["seq"]))
                self._alert_refusal(window.message, Code.UNSTORABLE, str(error))
                return
            log.error("storing a window of %s failed, not acknowledged (it will be sent again): %s",
                      _peer(window.message), error, exc_info=not isinstance(error, sqlite3.Error))
            self._reply(router, identity, refusal(Code.STORE_FAILED, str(error), window["seq"]))
            return
        # Committed: acknowledge, then tell the world.
        for (identity, window), added in zip(batch, outcomes):
            self._store_failures.pop(window.key, None)
            self._reply(router, identity, ack(window, duplicate=added is None))
            with self.state.lock:
                self.state.last_seen[window["agent_id"]] = received_at
                self.state.duplicates += added is None
        for tester, psi in judged:
            self.state.judged(tester, psi)
        self._announce(alerts + incidents)

    def _give_up(self, window: StatsWindow, error: Exception) -> bool:
        """Whether a window whose store failed now is refused for good: never while the database itself fails
        (sqlite3.OperationalError: locked, full, I/O; the window waits in its agent's spool until it works), after
        STORE_ATTEMPTS failures of any other kind (a constraint or a bug, which the next attempt meets again)."""
        if isinstance(error, sqlite3.OperationalError):
            return False
        attempts = self._store_failures.pop(window.key, 0) + 1
        if attempts >= STORE_ATTEMPTS:
            return True
        self._store_failures[window.key] = attempts
        while len(self._store_failures) > FAILURES_TRACKED:
            self._store_failures.popitem(last=False)
        return False

    def _alert_refusal(self, message, code: str, reason: str) -> None:
        alerts = self.rules.for_refusal(message, code, reason, time.time())
        try:
            with self.store.transaction():
                for alert in alerts:
                    self.store.add_alert(alert)
        except sqlite3.Error as error:
            log.error("cannot store the alert for a refused window: %s", error)
        self._announce(alerts)

    def _check_silence(self) -> None:
        now = time.time()
        try:
            with self.store.transaction():
                alerts = self.rules.for_silence(self.store.agents(), now)
                for alert in alerts:
                    self.store.mark_silent(alert["agent_id"], now)
                    self.store.add_alert(alert)
        except sqlite3.Error as error:
            log.error("silence check failed: %s", error)
            return
        self._announce(alerts)

    def _check_incidents(self) -> None:
        """Tester-wide movements whose wait for the rest of the fleet ran out are decided without it."""
        try:
            with self.store.transaction():
                events = self.incidents.tick(time.time())
        except sqlite3.Error as error:
            log.error("incident check failed: %s", error)
            self.incidents.reload()
            return
        self._announce(events)

    def _announce(self, alerts: list[dict]) -> None:
        """Alerts and incident events: to the log, the metrics and the hook (drift evidence: log and metrics)."""
        for alert in alerts:
            evidence = alert["kind"] in EVIDENCE_KINDS
            log.log(logging.INFO if evidence else logging.WARNING, "%s %s: %s",
                    "INCIDENT" if alert["kind"].startswith("incident_") else "ALERT", alert["kind"], alert["message"])
            self.state.count(alert)
            if self.hook is not None and not evidence:
                self.hook.notify(alert)

    @staticmethod
    def _reply(router: zmq.Socket, identity: bytes, reply: dict) -> None:
        try:
            router.send_multipart([identity, encode(reply)], zmq.NOBLOCK)
        except zmq.Again:
            pass                    # the agent's queue is full: it resends after its ack timeout
        except zmq.ZMQError as error:
            if error.errno != errno.EHOSTUNREACH:
                raise               # EHOSTUNREACH: that agent reconnected (Lazy Pirate); its resend gets the ack


def _peer(message) -> str:
    if isinstance(message, dict) and isinstance(message.get("agent_id"), str):
        return f"agent {message['agent_id']!r}"
    return "an unknown sender"
