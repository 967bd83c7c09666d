"""The agent's drift hook: a DriftMonitor for the model being served, its closed windows shipped upstream.

Wiring (the serving thread owns the monitor; the shipper has its own thread)::

    drift = AgentDrift(config.drift, curve=security.upstream)   # SpoolError: unusable spool folder
    drift.start(model)                      # before serving: starts the shipper thread
    drift.update(model, part, row, score)   # per scored part, on the request path: queues it
    drift.take_queued(1)                    # between parts (no request waiting): one queued part's statistics
    drift.tick()                            # when the serving loop is idle: closes a window whose time is up
    drift.stop(timeout_s)                   # at shutdown: ships the open window, or leaves it spooled

The statistics of a part are taken after its reply, when the agent has a moment (bench:
drift.update_us_per_part), in the order the parts were scored, so windows hold the same parts as if taken at
once. At most QUEUED_PARTS wait: past that, the oldest is taken on the request path (an agent with no moment
between parts for that long, under overload, pays as it did before the queue).

A model swap is noticed when a part of another checksum is taken: the old model's window closes ("model_change")
and a new monitor starts with the new package's reference. A drift failure never fails a part: it is
logged and drift stops for that model.
"""
from __future__ import annotations

import logging
import socket
from collections import deque

import numpy as np

from .config import DriftConfig
from .drift import ChangeParams, DriftMonitor, DriftReference
from .shipping import DiskSpool, Shipper
from ..wire.links import CurveClient

log = logging.getLogger("edge_agent.daemon.upstream")

# Scored parts whose statistics may wait for a moment between parts: their rows are 4 bytes a test (0.2 MB at 200
# tests, 10 MB at 10,000); a touchdown's sites, or a quarter second's backlog at 1,000 parts/s, fit.
QUEUED_PARTS = 256


class AgentDrift:
    """Implements the server's DriftHook: ``update(model, part, readings, score)``."""

    def __init__(self, config: DriftConfig, curve: CurveClient | None = None):
        self.config = config
        self.agent_id = config.agent_id or socket.gethostname()
        self.tester = config.tester or self.agent_id
        self.shipper = Shipper(config.collector,
                               DiskSpool(config.spool_dir, max_messages=config.spool_max_messages,
                                         max_bytes=config.spool_max_bytes),
                               agent_id=self.agent_id, tester=self.tester, ack_timeout_s=config.ack_timeout_s,
                               queue_length=config.queue_length, curve=curve)
        self._change = ChangeParams(config.change_delta, config.change_threshold, config.change_min_parts)
        self._monitor: DriftMonitor | None = None
        self._checksum: str | None = None
        self._queued: deque[tuple] = deque()
        self.taken_on_path = 0   # parts whose statistics were taken on the request path: the queue was full
        self.shadow = None   # a shadow.ShadowScorer: its agreement counts travel with each window

    def _submit(self, window) -> None:
        blocks = self.shadow.take() if self.shadow is not None else []
        self.shipper.submit(window if not blocks else WithShadow(window, blocks))

    def start(self, model) -> None:
        """Start shipping and the first window (``model``: the LoadedModel being served)."""
        self._switch(model)
        self.shipper.start()
        log.info("drift windows of %d parts or %.0f s go to %s as agent %r (tester %r); spool %s holds %d",
                 self.config.window_parts, self.config.window_seconds, self.config.collector, self.agent_id,
                 self.tester, self.config.spool_dir, self.shipper.spool.pending)

    def update(self, model, part, readings: np.ndarray, score: float) -> None:
        """Queue a scored part's statistics (``readings`` is kept, not copied: the caller's own row)."""
        if len(self._queued) >= QUEUED_PARTS:
            self.taken_on_path += 1
            self._take(*self._queued.popleft())
        self._queued.append((model, part, readings, score))

    @property
    def queued(self) -> int:
        return len(self._queued)

    def take_queued(self, parts: int | None = None) -> None:
        """Take the statistics of the ``parts`` oldest queued parts (all when None)."""
        for _ in range(len(self._queued) if parts is None else min(parts, len(self._queued))):
            self._take(*self._queued.popleft())

    def _take(self, model, part, readings: np.ndarray, score: float) -> None:
        if model.checksum != self._checksum:
            self._switch(model)
        monitor = self._monitor
        if monitor is None:
            return
        try:
            monitor.update(part.head, part.site, readings, score, score < model.outlier_threshold)
            window = monitor.maybe_close()
        except Exception:   # a drift bug must cost drift statistics, never a part's answer
            log.exception("drift statistics stopped for %s/%s", model.identity["name"], model.identity["version"])
            self._monitor = None
            return
        if window is not None:
            self._submit(window)

    def tick(self) -> None:
        """Close the window if its time is up (call when idle; parts also close windows as they arrive)."""
        self.take_queued()
        if self._monitor is not None and (window := self._monitor.maybe_close()) is not None:
            self._submit(window)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Ship the open window ("shutdown"); what is not acknowledged within ``timeout_s`` stays spooled."""
        self.take_queued()
        if self._monitor is not None:
            self._submit(self._monitor.close("shutdown"))
        self.shipper.stop(timeout_s)

    def status(self) -> dict:
        """For the health reply and /metrics: the shipper's counters, the open window and the (head, site) pairs
        tracked (at most ``max_sites``; ``sites_evicted`` made room for newer ones while this model served)."""
        monitor = self._monitor
        return {**self.shipper.status(), "tester": self.tester, "window_parts": self.config.window_parts,
                "window_seconds": self.config.window_seconds,
                "open_window_parts": None if monitor is None else monitor.parts,
                "queued_parts": len(self._queued), "parts_taken_on_path": self.taken_on_path,
                "sites_tracked": None if monitor is None else monitor.sites, "max_sites": self.config.max_sites,
                "sites_evicted": None if monitor is None else monitor.evicted}

    def _switch(self, model) -> None:
        if self._monitor is not None:
            self._submit(self._monitor.close("model_change"))
        self._checksum = model.checksum
        try:
            reference = DriftReference.from_manifest(model.manifest)
        except Exception as error:
            log.error("no drift statistics for %s/%s: %s", model.identity["name"], model.identity["version"], error)
            self._monitor = None
            return
        self._monitor = DriftMonitor(reference, model.identity, window_parts=self.config.window_parts,
                                     window_seconds=self.config.window_seconds, max_sites=self.config.max_sites,
                                     change=self._change)


class WithShadow:
    """A closed window and the shadow challenger's agreement counts since the previous one (STATS_PROTOCOL.md,
    ``shadow``), turned into one message body on the shipper's thread."""

    __slots__ = ("window", "blocks")

    def __init__(self, window, blocks: list[dict]):
        self.window, self.blocks = window, blocks

    def to_payload(self) -> dict:
        return {**self.window.to_payload(), "shadow": self.blocks}
