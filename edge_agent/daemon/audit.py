"""The audit of every decision: which model, version and checksum decided which part, recorded locally and shipped to
the collector without loss.

The serving thread appends one tuple per decision to an in-memory batch (``decided``: no disk, no lock, no network;
edge-bench ``audit.record_us_per_part``). A full batch (``batch_parts``), or one older than ``batch_seconds`` when
the loop is idle, is handed to a ``shipping.Shipper`` of its own: the drift windows' machinery, with its own spool
(``AuditSpool``), so the batch is numbered, written durably, sent stop-and-wait and kept until the collector
acknowledges it (wire/audit.py, STATS_PROTOCOL.md ``audit``). An acknowledged batch moves into the local log
(``<spool>/log/``: numbered segments, append-only, the oldest removed beyond ``log_max_bytes``), so the controller
keeps its own recent record as well.

Bounded everywhere: the batch by ``batch_parts``, the hand-over queue by the shipper's queue length, the spool by
messages and bytes, the log by bytes. A batch lost to a full queue or spool is counted, logged, reported upstream in
every later batch (``spool`` block) and alerted by the collector (``audit_loss``); never silent.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

from .config import AuditConfig, DriftConfig
from ..package.files import fsync_dir
from .shipping import MESSAGE_SUFFIX, DiskSpool, Shipper
from ..wire.audit import FIELDS, audit_message
from ..wire.links import CurveClient

log = logging.getLogger("edge_agent.daemon.audit")

LOG_DIR = "log"


class AuditSpool(DiskSpool):
    """A DiskSpool whose acknowledged messages move into a bounded, rotated local log instead of being deleted."""

    def __init__(self, directory: str | Path, *, log_max_bytes: int, **bounds):
        super().__init__(directory, **bounds)
        self.log_dir = self.directory / LOG_DIR
        self.log_dir.mkdir(exist_ok=True)
        self.log_max_bytes = log_max_bytes
        self._logged = sorted(self.log_dir.glob(f"*{MESSAGE_SUFFIX}"))
        self.log_bytes = sum(path.stat().st_size for path in self._logged)

    def ack(self, seq: int) -> None:
        size = self._sizes.pop(seq, None)
        if size is None:
            return
        target = self.log_dir / self._path(seq).name
        try:
            os.replace(self._path(seq), target)
        except FileNotFoundError:
            return
        fsync_dir(self.directory)
        self._logged.append(target)
        self.log_bytes += size
        while self.log_bytes > self.log_max_bytes and len(self._logged) > 1:   # rotation: the oldest segment goes
            oldest = self._logged.pop(0)
            try:
                self.log_bytes -= oldest.stat().st_size
                oldest.unlink()
            except FileNotFoundError:
                pass


class AuditBatch:
    """One batch of decisions: the records are already in wire order, so building the message body on the
    shipper's thread is a dict, and encoding it is msgpack's C code (the GIL the serving thread waits for stays
    short)."""

    __slots__ = ("records", "models")

    def __init__(self, records: list[tuple], models: list[dict]):
        self.records, self.models = records, models

    def to_payload(self) -> dict:
        return {"fields": list(FIELDS), "models": [dict(model) for model in self.models], "records": self.records}


class AuditRecorder:
    """The agent's audit: ``decided`` per part (serving thread), ``tick`` when idle, ``stop`` at shutdown."""

    def __init__(self, config: AuditConfig, drift: DriftConfig, agent_id: str, tester: str,
                 curve: CurveClient | None = None):
        self.config = config
        spool_dir = config.spool_dir or f"{drift.spool_dir.rstrip('/')}-audit"
        self.shipper = Shipper(drift.collector,
                               AuditSpool(spool_dir, log_max_bytes=config.log_max_bytes,
                                          max_messages=config.spool_max_messages, max_bytes=config.spool_max_bytes),
                               agent_id=agent_id, tester=tester, ack_timeout_s=drift.ack_timeout_s,
                               queue_length=config.queue_batches, curve=curve, message=audit_message)
        self.recorded = 0
        self._records: list[tuple] = []
        self._models: list[dict] = []       # the identities of the models in the open batch; records index them
        self._identity: dict | None = None  # the identity the last record named, and its index
        self._index = 0
        self._opened = time.monotonic()

    def start(self) -> None:
        self.shipper.start()
        log.info("auditing every decision: batches of %d parts or %.0f s to %s, spool %s (%d waiting)",
                 self.config.batch_parts, self.config.batch_seconds, self.shipper.endpoint,
                 self.shipper.spool.directory, self.shipper.spool.pending)

    def decided(self, model, part, row, score, probability, decision) -> None:
        """Record one decision (serving thread): one tuple appended; a full batch is handed to the shipper."""
        if model.identity is not self._identity:
            self._identity = model.identity
            self._index = next((i for i, known in enumerate(self._models) if known is model.identity), None)
            if self._index is None:
                self._index = len(self._models)
                self._models.append(model.identity)
        self._records.append((time.time(), part.head, part.site, part.lot, part.sublot, part.wafer, part.x, part.y,
                              part.part_id, hashlib.blake2b(row.tobytes(), digest_size=8).digest(), self._index,
                              score, probability, decision.bin, decision.flags))
        if len(self._records) >= self.config.batch_parts:
            self._flush()

    def tick(self) -> None:
        if self._records and time.monotonic() - self._opened >= self.config.batch_seconds:
            self._flush()

    def stop(self, timeout_s: float) -> None:
        if self._records:
            self._flush()
        self.shipper.stop(timeout_s)

    def status(self) -> dict:
        spool = self.shipper.spool
        return {**self.shipper.status(), "recorded": self.recorded, "open_batch": len(self._records),
                "log": str(spool.log_dir), "log_bytes": spool.log_bytes}

    def _flush(self) -> None:
        records, models, self._records, self._models, self._identity = self._records, self._models, [], [], None
        self._opened = time.monotonic()
        self.recorded += len(records)
        self.shipper.submit(AuditBatch(records, models))
