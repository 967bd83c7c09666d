"""Slow replies and their causes: every reply sent later than ``slow_reply_ms`` after its request arrived is kept, in
a bounded ring, with where its time went and what else the agent was doing meanwhile.

What else: the serving loop and its helpers mark each piece of work they do besides serving a request in
``ACTIVITIES`` (start, end, kind): a garbage collection (``gc.callbacks``), a drift window closing on a tick, the
lifecycle's tick (audit batch, shadow challenger), work between parts (a dynamic PAT refresh, drift statistics), a
keep-warm rehearsal, a model reload taken in, a control request, and, from the shipper threads, a window or audit
batch sent upstream (a thread holding the GIL: the serving thread waits for it). A slow reply's causes are the
activities that overlapped its time in the agent, by the milliseconds each took of it, the time it waited for its
turn behind other requests ("queued"), and what is left: "unexplained" (its own path, or a process that did not
run: the machine paused it, or another process had the cores). The largest of them is the reply's cause.

The ring is read by the health reply (``slow_replies``) and the causes are counted in the metrics
(``edge_agent_slow_replies{cause}``); edge-bench's cadence section summarizes them per profile as a table of causes.
Cost: one comparison per reply under the threshold; two clock reads and a deque append per activity.
"""
from __future__ import annotations

import gc
import time
from collections import Counter, deque

RING = 64                     # slow replies kept
ACTIVITY_RING = 1024          # activities kept (a slow reply looks back over these)
QUEUED = "queued"             # waited for its turn behind other requests
UNEXPLAINED = "unexplained"   # no activity of the agent overlapped: the process was not running
MIN_ACTIVITY_S = 20e-6        # shorter activities are not kept: they explain no slow reply, and would fill the ring


class Activities:
    """What the agent did besides serving requests: the last ``ACTIVITY_RING`` (start, end, kind), perf_counter
    seconds. Appended from the serving thread and the shipper threads (a deque append is atomic)."""

    def __init__(self) -> None:
        self._events: deque[tuple[float, float, str]] = deque(maxlen=ACTIVITY_RING)
        self._gc_started = 0.0

    def mark(self, kind: str, start: float, end: float | None = None) -> None:
        end = time.perf_counter() if end is None else end
        if end - start >= MIN_ACTIVITY_S:
            self._events.append((start, end, kind))

    def overlapping(self, start: float, end: float) -> Counter[str]:
        """Seconds of each kind of activity within [start, end]."""
        spent: Counter[str] = Counter()
        for began, ended, kind in reversed(self._snapshot()):
            if ended < start - 1.0:   # activities are marked in the order they end, give or take a thread's
                break
            overlap = min(ended, end) - max(began, start)
            if overlap > 0:
                spent[kind] += overlap
        return spent

    def _snapshot(self) -> tuple[tuple[float, float, str], ...]:
        while True:
            try:
                return tuple(self._events)
            except RuntimeError:   # appended to while copied (a shipper thread, a collection's callback): again
                continue

    def watch_gc(self) -> None:
        gc.callbacks.append(self._gc)

    def unwatch_gc(self) -> None:
        if self._gc in gc.callbacks:
            gc.callbacks.remove(self._gc)

    def _gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.mark(f"gc (generation {info.get('generation')})", self._gc_started)


ACTIVITIES = Activities()     # one per process: the agent's serving loop and its threads all mark here


class SlowReplies:
    """The replies over ``threshold_ms`` (0: none recorded), their causes counted."""

    def __init__(self, threshold_ms: float, by_cause: Counter[str], activities: Activities = ACTIVITIES):
        self.threshold_s = threshold_ms / 1000.0
        self.activities = activities
        self.total = 0
        self.by_cause = by_cause     # the largest cause of each slow reply (the metrics' counter)
        self._ring: deque[dict] = deque(maxlen=RING)

    def check(self, kind: str, received: float, started: float | None, sent: float,
              stages: dict[str, float] | None) -> None:
        """A reply sent at ``sent`` for a ``kind`` request received at ``received`` whose (first) turn started at
        ``started`` (None: answered outside a turn); ``stages``: its stage breakdown in us, when it was sampled."""
        elapsed = sent - received
        if not self.threshold_s or elapsed < self.threshold_s:
            return
        causes = self.activities.overlapping(received, sent)
        if started is not None and started - received > 0:
            causes[QUEUED] += started - received
        left = elapsed - sum(causes.values())
        if left > 0:
            causes[UNEXPLAINED] = left
        cause = max(causes, key=causes.get)
        self.total += 1
        self.by_cause[cause] += 1
        self._ring.append({"at": time.time() - (time.perf_counter() - sent), "type": kind,
                           "agent_us": round(elapsed * 1e6, 1), "cause": cause,
                           "causes_ms": {name: round(seconds * 1e3, 3) for name, seconds in causes.most_common()},
                           "stages_us": stages})

    def status(self) -> dict:
        return {"threshold_ms": self.threshold_s * 1000.0, "total": self.total, "by_cause": dict(self.by_cause),
                "recent": list(self._ring)}
