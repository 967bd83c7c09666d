"""The model the agent serves and its swaps (``ServedModels``), and the control messages (``ControlCommands``:
health, reload, rollback), served by ``server.Agent`` between two clients' turns.
"""
from __future__ import annotations

import gc
import logging
import os
from typing import TYPE_CHECKING

import zmq

from .. import __version__
from .config import AgentConfig
from .limits import Limits
from .metrics import Metrics
from .pat import DynamicPat
from .reload import ReloadOutcome, ReloadWatcher
from .scoring import LoadedModel
from ..wire.score import (HEALTH, PROTOCOL_VERSION, RELOAD, ROLLBACK, Code, ProtocolError, check_stages_since,
                          control_reply, largest_request_bytes)

if TYPE_CHECKING:
    from .server import Agent, Request

log = logging.getLogger("edge_agent.daemon.server")

HEALTH_SITES = 32             # dynamic PAT sites listed in a health reply (the most recently tested)


class ServedModels:
    """The model serving, the one served before it (a rollback's), the dynamic PAT site windows that follow them and
    the last reload's outcome. Models are swapped only between turns, so a request never sees two."""

    def __init__(self, config: AgentConfig, metrics: Metrics, limits: Limits, model: LoadedModel):
        self.config, self.metrics, self.limits = config, metrics, limits
        self.model = model
        self.previous: LoadedModel | None = None
        self.dynamic = self._dynamic_pat(model)
        self.last_reload: dict | None = None

    def take_reload_outcomes(self, watcher: ReloadWatcher, wake: zmq.Socket) -> None:
        while True:
            try:
                wake.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        while not watcher.outcomes.empty():
            outcome: ReloadOutcome = watcher.outcomes.get()
            if outcome.model is None:
                result = "refused"
                log.error("reload refused (%s): %s; %s keeps serving\n%s", outcome.trigger, outcome.ref,
                          self.model.ref, "\n".join(f"  - {p}" for p in outcome.problems))
            elif outcome.model.checksum == self.model.checksum:
                result = "unchanged"   # verified again, and it is the package already serving
                log.info("reload (%s): %s verified, already serving it", outcome.trigger, outcome.ref)
            else:
                result = "loaded"
                self.swap(outcome.model, f"{outcome.trigger}, loaded and verified in {outcome.seconds:.2f} s")
            self.metrics.reloads[result] += 1
            self.last_reload = {**outcome.describe(), "outcome": result,
                                "number": sum(self.metrics.reloads.values())}

    def swap(self, model: LoadedModel, reason: str) -> None:
        self.previous, self.model = self.model, model
        freeze_heap()
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


class ControlCommands:
    """The replies to health, reload and rollback requests. Reload and rollback are served on the authenticated
    control socket only (edge_agent/daemon/security.py); on the score socket ``refuse`` answers them."""

    def __init__(self, agent: Agent):
        self.agent = agent

    def health(self, message: dict, request: Request) -> dict:
        since = check_stages_since(message.get("stages_since", 0))
        agent, models = self.agent, self.agent.models
        watcher = agent.watcher
        return control_reply(
            HEALTH, request.rid,
            status="draining" if agent.draining else "serving",
            model=models.model.describe(),
            previous_model=None if models.previous is None else models.previous.identity,
            following={"registry": str(agent.registry.root), "model": models.model.ref.name,
                       "stage": None if agent.config.version else agent.config.stage,
                       "pinned_version": agent.config.version or None,
                       "stage_version": None if watcher is None else watcher.stage_version},
            last_reload=models.last_reload,
            dynamic_pat=None if models.dynamic is None else models.dynamic.status(HEALTH_SITES),
            agent={"version": __version__, "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
                   "bind": agent.config.bind},
            drift=None if agent.drift is None else agent.drift.status(),
            inbox={"requests": agent.inbox.requests, "bytes": agent.inbox.bytes, "clients": agent.inbox.clients()},
            limits=agent.limits.describe(),
            stages=agent.stages.summary(since),
            slow_replies=agent.slow.status(),
            security=agent.security.status(),
            lifecycle=None if agent.lifecycle is None else agent.lifecycle.status(),
            **agent.metrics.snapshot())

    def reload(self, message: dict, request: Request) -> dict:
        agent, name = self.agent, self.agent.models.model.ref.name
        version = message.get("version")
        if version is not None:
            if isinstance(version, bool) or not isinstance(version, (str, int)):
                raise ProtocolError(Code.WRONG_TYPE, f"field 'version': expected a version number (string or "
                                                     f"integer), got {type(version).__name__}")
            version = str(version)
            if not any(ref.version == version for ref in agent.registry.versions(name)):
                raise ProtocolError(Code.UNKNOWN_VERSION, f"model {name!r} has no version {version} "
                                                          f"in {agent.registry.root}")
        version = version or agent.config.version or None   # a pinned agent reloads its pinned version
        agent.watcher.request(version)
        what = f"version {version}" if version is not None else f"the {agent.config.stage} version"
        return control_reply(RELOAD, request.rid, accepted=True,
                             message=f"loading {what} of {name} in the background; the health reply's "
                                     f"last_reload and model tell the outcome")

    def rollback(self, message: dict, request: Request) -> dict:
        models = self.agent.models
        if models.previous is None:
            raise ProtocolError(Code.NOTHING_TO_ROLL_BACK, f"no previous model is kept; {models.model.ref} is the "
                                                           f"only model this agent has served")
        replaced = models.model.ref
        models.swap(models.previous, "rollback request")
        self.agent.metrics.rollbacks += 1
        return control_reply(ROLLBACK, request.rid, model=models.model.identity,
                             message=f"serving {models.model.ref} again in place of {replaced}")

    def refuse(self, message: dict, request: Request) -> dict:
        raise ProtocolError(Code.NOT_AUTHORIZED, self.agent.security.control_refusal(message["type"]))


def freeze_heap() -> None:
    """Exclude every object alive now (imports, loaded models) from garbage collection.

    A full collection walks all tracked objects: about 140,000 after the imports, 40 to 170 ms here, long
    enough to blow a part's latency budget when it happens to run on the serving thread. Requests allocate
    short-lived acyclic objects that reference counting frees, so only the young generations stay to collect.
    """
    gc.freeze()
