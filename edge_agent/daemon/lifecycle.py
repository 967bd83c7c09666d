"""The agent's model lifecycle beside the serving loop: the audit of every decision, the shadow challenger and the
registry service's follower, wired together for ``server.Agent`` (its ``lifecycle`` hook).

The serving loop calls ``decided`` once per decided part (the audit's tuple and the shadow's queue entry: both
measured by edge-bench), ``tick`` when idle, and ``status`` for the health reply. Everything else runs on the
follower's, the shadow's and the shippers' own threads.
"""
from __future__ import annotations

import logging

from .audit import AuditRecorder
from ..fleet.follower import Follower
from ..package.registry import PackageRef
from .scoring import ModelRefused, load_package
from .shadow import ShadowScorer

log = logging.getLogger("edge_agent.daemon.lifecycle")


class Lifecycle:
    def __init__(self, *, audit: AuditRecorder | None = None, shadow: ShadowScorer | None = None,
                 follower: Follower | None = None, yield_variant: str = "float32"):
        self.audit, self.shadow, self.follower = audit, shadow, follower
        self.yield_variant = yield_variant

    def start(self, request_version, challenger: PackageRef | None) -> None:
        """Start the threads; ``request_version(version)`` asks the serving loop to load a champion."""
        if self.audit is not None:
            self.audit.start()
        if self.shadow is not None:
            self.shadow.start()
            if challenger is not None:
                self.offer_challenger(challenger.version)
        if self.follower is not None:
            self.follower.start(request_version, self.offer_challenger)

    def stop(self, timeout_s: float) -> None:
        if self.follower is not None:
            self.follower.stop()
        if self.shadow is not None:
            self.shadow.stop()
        if self.audit is not None:
            self.audit.stop(timeout_s)

    def decided(self, model, part, row, score, probability, decision) -> None:
        """One part decided by ``model`` (serving thread); ``score`` None: too few readings for the models."""
        if self.audit is not None:
            self.audit.decided(model, part, row, score, probability, decision)
        if self.shadow is not None and score is not None:
            self.shadow.record(model, part, row, score, probability, decision)

    def tick(self) -> None:
        if self.audit is not None:
            self.audit.tick()
        if self.shadow is not None:
            self.shadow.tick()

    def offer_challenger(self, version: str | None) -> None:
        """Load the challenger from the cache (on the caller's thread: the follower's) and score it in shadow."""
        if self.shadow is None or self.follower is None:
            return
        if version is None:
            self.shadow.offer(None)
            return
        try:
            self.shadow.offer(load_package(self.follower.registry, PackageRef(self.follower.model, version),
                                           self.yield_variant))
        except ModelRefused as refused:
            log.error("shadow challenger refused: %s", refused)
            self.shadow.offer(None)

    def status(self) -> dict:
        return {"audit": None if self.audit is None else self.audit.status(),
                "shadow": None if self.shadow is None else self.shadow.status(),
                "fleet": None if self.follower is None else self.follower.status()}
