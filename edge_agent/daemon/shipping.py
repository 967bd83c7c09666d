"""Shipping drift windows upstream with no silent loss: a disk spool and a background sender.

``DiskSpool`` numbers every message (a per-agent sequence that survives restarts) and keeps it in a file
of its own, written atomically and fsynced, until the collector acknowledges it. The spool is bounded by
message count and bytes; at the bound the oldest messages are dropped, and the loss (count and sequence
ranges) is persisted and carried upstream in every later message.

``Shipper`` owns one thread and one DEALER socket. ``submit`` only enqueues (never blocks, never touches
disk or network); the thread builds the message, spools it, then sends the oldest unacknowledged message
and waits for its ack (stop-and-wait: message N+1 leaves only after N is stored, so the collector stores
every agent's windows in sequence order). No ack in time: the socket is thrown away and a new one
connects ("Lazy Pirate"), and the same message is sent again; the collector drops duplicates. A refusal is
read by ``wire.stats.classify_reply``: a permanent one moves the message to the spool's dead-letter folder (a
counted loss, reported upstream, logged; the stream goes on with the next window), a transient one is treated as
no ack. The messages and codes: ``edge_agent/wire/STATS_PROTOCOL.md``.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Protocol

import zmq

from ..errors import EdgeError
from ..package.files import atomic_write
from .slow import ACTIVITIES
from ..wire.codec import decode_trusted, encode
from ..wire.links import CurveClient, connect_curve
from ..wire.stats import Reply, classify_reply, stats_message

log = logging.getLogger("edge_agent.daemon.shipping")

MESSAGE_SUFFIX = ".msg"
REASON_SUFFIX = ".why"
STATE_FILE = "state.msgpack"
DEAD_LETTER_DIR = "dead-letter"   # inside the spool folder: windows the collector refused for good, and why
MAX_DEAD_LETTERS = 100       # the oldest dead letters are removed beyond this (they stay counted)
MAX_DROPPED_RANGES = 100     # older ranges are still counted in dropped_total
MAX_PROBLEM_CHARS = 500      # a collector's message as kept in health and in a dead letter's reason
POLL_S = 0.05                # first wait before sending again to an unreachable collector ...
RETRY_MAX_S = 5.0            # ... doubling up to this
_WAKE = object()             # put in the queue by stop(): wakes the thread


class SpoolError(EdgeError):
    """The spool folder cannot be used (names the folder and the reason)."""


class DiskSpool:
    """Numbered messages on disk, oldest first, until acknowledged. Not thread-safe: one owner thread."""

    def __init__(self, directory: str | Path, *, max_messages: int = 10_000, max_bytes: int = 256 << 20):
        if max_messages < 1 or max_bytes < 1:
            raise SpoolError(f"spool {directory}: max_messages and max_bytes must be positive, got "
                             f"{max_messages} and {max_bytes}")
        self.directory = Path(directory)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SpoolError(f"spool {self.directory}: cannot create the folder ({error.strerror})") from None
        if not os.access(self.directory, os.W_OK):
            raise SpoolError(f"spool {self.directory}: the folder is not writable")
        self._sizes: OrderedDict[int, int] = OrderedDict()   # seq -> file size, oldest first
        self._recover()

    # ---- what the shipper reads ----------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._sizes)

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    def oldest(self) -> tuple[int, bytes] | None:
        """(seq, encoded message) of the oldest unacknowledged message."""
        while self._sizes:
            seq = next(iter(self._sizes))
            try:
                return seq, self._path(seq).read_bytes()
            except FileNotFoundError:   # removed behind the agent's back: a loss, counted like any other
                self.drop(seq, "its spool file disappeared")
        return None

    def loss(self) -> dict:
        """The ``spool`` block of a message: cumulative counts, never reset."""
        return {"stream": self.stream, "dropped_total": self.dropped_total,
                "dropped_seq_ranges": [list(r) for r in self.dropped_ranges], "unspooled_lost": self.unspooled_lost}

    # ---- changes ------------------------------------------------------------------------------------------

    def append(self, message: dict) -> int:
        """Number the message (adds ``seq`` and the ``spool`` loss report), store it durably; returns seq.

        A message larger than ``max_bytes`` on its own is still kept (after dropping every older one).
        """
        seq = self.last_seq + 1
        data = encode({**message, "seq": seq, "spool": self.loss()})
        doomed = self._oldest_to_drop(len(data))
        if doomed:                    # the message must carry the loss it causes
            for old in doomed:
                self._record_drop(old)
            data = encode({**message, "seq": seq, "spool": self.loss()})
        atomic_write(self._path(seq), data)
        self.last_seq = seq
        self._save_state()            # after the message: a crash in between is repaired by _recover
        for old in doomed:
            self._unlink(old)
        self._sizes[seq] = len(data)
        if doomed:
            log.warning("spool %s full: dropped the %d oldest unacknowledged window(s) (seq %d..%d); "
                        "%d dropped in total, reported upstream", self.directory, len(doomed), doomed[0],
                        doomed[-1], self.dropped_total)
        return seq

    def record_unspooled_loss(self, count: int) -> None:
        """Windows lost before they got a seq (the shipper's queue was full, or a spool write failed)."""
        self.unspooled_lost += count
        self._save_state()

    def ack(self, seq: int) -> None:
        """The collector stored it: forget it (a crash before the unlink lands makes it a duplicate)."""
        if self._sizes.pop(seq, None) is not None:
            self._unlink(seq)

    def drop(self, seq: int, reason: str) -> None:
        """Give up on one message whose file is gone: a counted, reported loss."""
        if self._sizes.pop(seq, None) is None:
            return
        self._record_drop(seq)
        self._save_state()
        self._unlink(seq)
        log.error("window seq %d dropped: %s; %d dropped in total, reported upstream", seq, reason,
                  self.dropped_total)

    def dead_letter(self, seq: int, reason: str) -> None:
        """The collector refused the message for good: keep it, with ``reason``, in the dead-letter folder (for
        people to look at; the newest MAX_DEAD_LETTERS), count it as a loss reported upstream, and go on."""
        if self._sizes.pop(seq, None) is None:
            return
        self._record_drop(seq)
        self.dead_lettered += 1
        folder = self.directory / DEAD_LETTER_DIR
        folder.mkdir(exist_ok=True)
        try:
            os.replace(self._path(seq), folder / self._path(seq).name)
        except FileNotFoundError:
            pass
        atomic_write(folder / f"{seq:012d}{REASON_SUFFIX}", reason.encode())
        self._save_state()
        for old in sorted(folder.glob(f"*{MESSAGE_SUFFIX}"))[:-MAX_DEAD_LETTERS]:
            old.unlink()
            old.with_suffix(REASON_SUFFIX).unlink(missing_ok=True)
        log.error("window seq %d refused for good by the collector (%s); moved to %s; %d dead-lettered, %d dropped in "
                  "total, reported upstream", seq, reason, folder, self.dead_lettered, self.dropped_total)

    # ---- internals ----------------------------------------------------------------------------------------

    def _oldest_to_drop(self, size: int) -> list[int]:
        doomed, count, total = [], len(self._sizes), self.bytes
        for seq, old_size in self._sizes.items():
            if count + 1 <= self.max_messages and total + size <= self.max_bytes:
                break
            doomed.append(seq)
            count -= 1
            total -= old_size
        return doomed

    def _record_drop(self, seq: int) -> None:
        self._sizes.pop(seq, None)
        self.dropped_total += 1
        if self.dropped_ranges and self.dropped_ranges[-1][1] == seq - 1:
            self.dropped_ranges[-1][1] = seq
        else:
            self.dropped_ranges.append([seq, seq])
            del self.dropped_ranges[:-MAX_DROPPED_RANGES]

    def _recover(self) -> None:
        state_path = self.directory / STATE_FILE
        state = {}
        if state_path.exists():
            try:
                state = decode_trusted(state_path.read_bytes())
            except (ValueError, OSError) as error:
                raise SpoolError(f"spool {state_path}: unreadable state file ({error}); move the folder aside "
                                 f"to start a new spool (its windows would then be lost)") from None
        self.stream = state.get("stream") or uuid.uuid4().hex
        self.last_seq = int(state.get("last_seq", 0))
        self.dropped_total = int(state.get("dropped_total", 0))
        self.dropped_ranges = [list(r) for r in state.get("dropped_ranges", [])]
        self.unspooled_lost = int(state.get("unspooled_lost", 0))
        self.dead_lettered = int(state.get("dead_lettered", 0))
        for leftover in self.directory.glob(f"*{MESSAGE_SUFFIX}.tmp"):   # atomic_write's ".<name>.tmp"
            leftover.unlink()          # a write that never completed: its seq was never handed out
        found = sorted((int(p.name[:-len(MESSAGE_SUFFIX)]), p) for p in self.directory.glob(f"*{MESSAGE_SUFFIX}")
                       if p.name[:-len(MESSAGE_SUFFIX)].isdigit())
        for seq, path in found:
            if any(first <= seq <= last for first, last in self.dropped_ranges):
                path.unlink()          # dropped and recorded, but the crash came before the unlink
            else:
                self._sizes[seq] = path.stat().st_size
        if found:
            self.last_seq = max(self.last_seq, found[-1][0])
        self._save_state()

    def _save_state(self) -> None:
        atomic_write(self.directory / STATE_FILE,
                      encode({"stream": self.stream, "last_seq": self.last_seq, "dropped_total": self.dropped_total,
                              "dropped_ranges": self.dropped_ranges, "unspooled_lost": self.unspooled_lost,
                              "dead_lettered": self.dead_lettered}))

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:012d}{MESSAGE_SUFFIX}"

    def _unlink(self, seq: int) -> None:
        try:
            self._path(seq).unlink()
        except FileNotFoundError:
            pass


class SupportsPayload(Protocol):
    def to_payload(self) -> dict: ...


class Shipper:
    """Background sender of spooled stats messages to the collector's ROUTER (over CURVE with ``curve``: the
    collector then knows this agent by its key, docs/security.md)."""

    def __init__(self, endpoint: str, spool: DiskSpool, *, agent_id: str, tester: str, ack_timeout_s: float = 5.0,
                 queue_length: int = 1000, curve: CurveClient | None = None,
                 message: Callable[[str, str, dict], dict] = stats_message):
        """``message`` builds the message from a body: a drift window by default, an audit batch (wire/audit.py)
        for the audit stream, which travels the same way with its own spool."""
        self.endpoint = endpoint
        self.curve = curve
        self.message = message
        self.spool = spool
        self.agent_id = agent_id
        self.tester = tester
        self.ack_timeout_s = ack_timeout_s
        self._queue: queue.Queue = queue.Queue(queue_length)
        self._stop = threading.Event()
        self._flush_until = 0.0
        self._thread = threading.Thread(target=self._run, name="edge-agent-shipper", daemon=True)
        # Read by status() from other threads: plain ints and floats, written by the shipper thread only.
        self.submitted = 0
        self.queue_full = 0           # windows lost before they had a seq: written by submit()'s thread ...
        self.spool_failed = 0         # ... and by the shipper thread (each counter has one writer)
        self._unspooled_recorded = 0  # how many of them the spool has counted (persisted, sent upstream)
        self.acked = 0
        self.resends = 0
        self.last_ack_at: float | None = None
        self.last_problem = ""

    def start(self) -> None:
        self._thread.start()

    def submit(self, item: dict | SupportsPayload) -> bool:
        """Queue a message body (or something with ``to_payload()``, built on the shipper thread). Never
        blocks; False (and counted, logged and reported upstream) if the queue is full."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.queue_full += 1
            log.error("shipper queue full (%d): a drift window was lost before it was spooled (%d so far, "
                      "reported upstream)", self._queue.maxsize, self.unspooled_lost)
            return False
        self.submitted += 1
        return True

    def stop(self, timeout_s: float = 2.0) -> None:
        """Spool everything queued, keep sending for at most ``timeout_s``, then stop; the rest stays spooled."""
        self._flush_until = time.monotonic() + timeout_s
        self._stop.set()
        try:
            self._queue.put(_WAKE, timeout=1.0)   # the thread may be waiting on the queue
        except queue.Full:
            pass                                   # then it is busy and sees the stop flag soon
        if self._thread.is_alive():
            self._thread.join(timeout_s + self.ack_timeout_s + 5.0)

    @property
    def unspooled_lost(self) -> int:
        return self.queue_full + self.spool_failed

    def status(self) -> dict:
        return {"endpoint": self.endpoint, "agent_id": self.agent_id, "spooled": self.spool.pending,
                "last_seq": self.spool.last_seq, "submitted": self.submitted, "acked": self.acked,
                "resends": self.resends, "dropped_total": self.spool.dropped_total,
                "dead_lettered": self.spool.dead_lettered,
                "dead_letter_dir": str(self.spool.directory / DEAD_LETTER_DIR),
                "unspooled_lost": self.unspooled_lost,
                "last_ack_at": self.last_ack_at, "last_problem": self.last_problem[:MAX_PROBLEM_CHARS]}

    # ---- the thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        """Idle, the thread waits on the queue and nothing else: a thread that wakes up now and then makes
        every GIL release of the serving thread (onnxruntime, ZeroMQ) slower (measured: microseconds each)."""
        context = zmq.Context()
        socket = None
        backoff = POLL_S
        try:
            while True:
                stopping = self._stop.is_set()   # read first: whatever was submitted before stop() is queued now
                self._spool_queued()
                if stopping and (not self.spool.pending or time.monotonic() >= self._flush_until):
                    return
                if not self.spool.pending:
                    self._wait_for_window(None)
                    continue
                socket = socket or self._connect(context)
                began = time.perf_counter()
                outcome = self._deliver_oldest(socket)
                ACTIVITIES.mark("shipping upstream (a thread: the GIL)", began)
                if outcome == "settled":
                    backoff = POLL_S
                    continue
                if outcome == "no_ack":
                    self.last_problem = f"no ack within {self.ack_timeout_s} s"
                    log.warning("collector %s: %s; reconnecting", self.endpoint, self.last_problem)
                    socket.close(linger=0)
                    socket = None
                    self.resends += 1
                # Not connected, or no ack: try again later; a new window still gets spooled meanwhile.
                self._wait_for_window(min(backoff, max(0.0, self._flush_until - time.monotonic()))
                                      if stopping else backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)
        except Exception:   # a bug here must not take the agent down; the spool keeps what was not sent
            log.exception("shipper stopped by an internal error; windows stay spooled in %s", self.spool.directory)
        finally:
            if socket is not None:
                socket.close(linger=0)
            context.term()

    def _wait_for_window(self, timeout: float | None) -> None:
        """Block until a window is submitted (or stop() is called), at most ``timeout`` seconds; spool it."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return
        if item is not _WAKE:
            self._spool(item)

    def _spool_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _WAKE:
                self._spool(item)

    def _spool(self, item: dict | SupportsPayload) -> None:
        body = item if isinstance(item, dict) else item.to_payload()
        message = self.message(self.agent_id, self.tester, body)
        try:
            self._record_unspooled_loss()
            self.spool.append(message)
        except OSError as error:
            self.spool_failed += 1
            self.last_problem = f"cannot spool a window: {error.strerror}"
            log.error("spool %s: %s; the window is lost (reported upstream)", self.spool.directory,
                      self.last_problem)

    def _record_unspooled_loss(self) -> None:
        new = self.unspooled_lost - self._unspooled_recorded
        if new > 0:
            self.spool.record_unspooled_loss(new)
            self._unspooled_recorded += new

    def _connect(self, context: zmq.Context) -> zmq.Socket:
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.IMMEDIATE, 1)        # no queueing for a collector that is not connected
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, int(RETRY_MAX_S * 1000))
        if self.curve is not None:
            connect_curve(socket, self.curve)
        socket.connect(self.endpoint)
        return socket

    def _deliver_oldest(self, socket: zmq.Socket) -> str:
        """Send the oldest spooled message and wait for its ack: "settled" (stored, or refused for good),
        "not_connected" or "no_ack"."""
        oldest = self.spool.oldest()
        if oldest is None:
            return "settled"
        seq, data = oldest
        try:
            socket.send(data, zmq.NOBLOCK)
        except zmq.Again:
            return "not_connected"     # ZeroMQ keeps connecting in the background
        deadline = time.monotonic() + self.ack_timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            if not socket.poll(max(1, int(remaining * 1000)), zmq.POLLIN):
                break
            try:
                reply = decode_trusted(socket.recv(zmq.NOBLOCK))
            except (zmq.Again, ValueError):
                continue
            verdict = classify_reply(reply, seq)
            if verdict is Reply.ACK:
                self.spool.ack(seq)
                self.acked += 1
                self.last_ack_at = time.time()
                return "settled"
            if verdict is Reply.PERMANENT:
                self.spool.dead_letter(seq, f"{reply.get('code')}: {str(reply.get('message'))[:MAX_PROBLEM_CHARS]}")
                return "settled"
            if verdict is Reply.TRANSIENT:   # sent again after the ack timeout (the socket is renewed first)
                self.last_problem = f"collector error on seq {seq}: {reply.get('code')}: {reply.get('message')}"
                log.warning("%s", self.last_problem)
            # Reply.UNRELATED: a late reply to a message already settled
        return "no_ack"
