"""The agent's side of security: its keys (loaded at start-up, before any model), CURVE on the score socket when
it listens beyond loopback, the control socket, the upstream link's keys, and what health says about them.

    security = AgentSecurity.load(config.security)       # KeyFileError naming the file, before a model loads
    registry = Registry(config.registry, trust=security.trust)
    control = security.open(context, router, ...)        # in Agent.serve, before the score socket binds
    security.close()                                     # after the sockets closed, before the context ends

Who reaches which socket:
- score socket (``[agent] bind``): plain on loopback or ipc, for the test program on this controller; on any other
  address a CURVE server that lets in only ``score_keys``. Control messages are refused there.
- control socket (``control_bind``): always a CURVE server; only ``control_keys`` get in; ``reload`` and
  ``rollback`` are accepted here only (health and scoring too). Without it no one may send them: SIGHUP reloads,
  and the registry stage decides what is served.
- upstream DEALER to the collector: CURVE with this agent's key when ``collector_key`` is set.
"""
from __future__ import annotations

import logging

import zmq

from .config import SecurityConfig
from ..errors import listen_error
from ..keys import load_allow_list, load_curve_pair, load_curve_public, load_trusted_keys
from ..package.signing import Trust
from ..wire.links import CurveClient, CurvePair, Gatekeeper, serve_curve

log = logging.getLogger("edge_agent.daemon.security")

SCORE_DOMAIN, CONTROL_DOMAIN = "score", "control"
CONTROL_QUEUE = 100   # messages queued per control client (people and tools, not a test program)


class AgentSecurity:
    def __init__(self, config: SecurityConfig, trust: Trust, pair: CurvePair | None = None,
                 collector_public: bytes | None = None, control_keys: dict[bytes, str] | None = None,
                 score_keys: dict[bytes, str] | None = None):
        self.config, self.trust, self.pair = config, trust, pair
        self.upstream = None if collector_public is None else CurveClient(pair, collector_public)
        self.control_keys, self.score_keys = control_keys, score_keys
        self._gatekeeper: Gatekeeper | None = None
        self._control: zmq.Socket | None = None

    @classmethod
    def load(cls, config: SecurityConfig) -> AgentSecurity:
        """Read every key file the configuration names; KeyFileError names the first unusable one."""
        trust = Trust(load_trusted_keys(config.trusted_keys) if config.trusted_keys else {},
                      config.trusted_keys, config.allow_unsigned)
        if config.allow_unsigned:
            log.warning("DEVELOPMENT MODE ([security] allow_unsigned): packages without a trusted signature are "
                        "served; never use this on a production floor")
        return cls(config, trust,
                   pair=load_curve_pair(config.key) if config.key else None,
                   collector_public=load_curve_public(config.collector_key) if config.collector_key else None,
                   control_keys=load_allow_list(config.control_keys) if config.control_bind else None,
                   score_keys=load_allow_list(config.score_keys) if config.score_keys else None)

    def open(self, context: zmq.Context, score: zmq.Socket, max_message_bytes: int) -> zmq.Socket | None:
        """CURVE on ``score`` (not bound yet) when score_keys are set; the control socket, bound, or None."""
        if self.score_keys is None and self.control_keys is None:
            return None
        self._gatekeeper = Gatekeeper(context)
        if self.score_keys is not None:
            self._gatekeeper.admit(SCORE_DOMAIN, self.score_keys)
            serve_curve(score, self.pair, SCORE_DOMAIN)
        if self.control_keys is None:
            return None
        self._gatekeeper.admit(CONTROL_DOMAIN, self.control_keys)
        control = self._control = context.socket(zmq.ROUTER)
        control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        control.setsockopt(zmq.RCVHWM, CONTROL_QUEUE)
        control.setsockopt(zmq.SNDHWM, CONTROL_QUEUE)
        control.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        control.setsockopt(zmq.LINGER, 0)
        serve_curve(control, self.pair, CONTROL_DOMAIN)
        try:
            control.bind(self.config.control_bind)
        except zmq.ZMQError as error:
            raise listen_error(f"cannot listen on control_bind {self.config.control_bind}", error.errno,
                               error.strerror) from None
        log.info("control socket (CURVE, %d allowed key(s)) on %s", len(self.control_keys), self.config.control_bind)
        return control

    def close(self) -> None:
        if self._control is not None:
            self._control.close(linger=0)
            self._control = None
        if self._gatekeeper is not None:
            self._gatekeeper.stop()
            self._gatekeeper = None

    def control_refusal(self, kind: str) -> str:
        """Why ``kind`` (reload, rollback) is refused on the score socket, and where it is accepted."""
        if self.control_keys is None:
            return (f"{kind} is a control message and this agent accepts none ([security] control_bind is not set): "
                    "the registry stage decides what it serves, and SIGHUP reloads it")
        return (f"{kind} is a control message: send it to the control socket {self.config.control_bind} with an "
                "authorized CURVE key (edge-agent reload|rollback --key ...)")

    def status(self) -> dict:
        """For the health reply."""
        refused = {} if self._gatekeeper is None else dict(self._gatekeeper.refused)
        return {"packages": self.trust.describe(),
                "score_socket": "plain (loopback or ipc)" if self.score_keys is None
                                else f"curve, {len(self.score_keys)} allowed key(s)",
                "control_socket": None if self.control_keys is None else self.config.control_bind,
                "upstream": "curve" if self.upstream is not None else "plain",
                "refused_handshakes": refused}

