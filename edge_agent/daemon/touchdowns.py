"""When a tester's next touchdown is due, so the agent can rehearse just before it.

On this project's VM, whatever runs first after the serving thread has slept pays for the wake-up: both graphs took
623 us after 0.3 s idle against 48 us warm, and a bare ZeroMQ send 127-185 us after 5 ms of sleep against 6 us
(docs/performance-log.md, "At a tester's cadence"). Rehearsing every ``keep_warm_ms`` (score_path.py ``KeepWarm``) leaves the caches
warm only for the first part that comes soon after a rehearsal. A tester's index time is regular, so the start of
its next touchdown is the last start plus the last gap between starts: rehearsing ``LEAD_S`` before then meets
the part with warm caches. In alternated A/B runs of two agents (2 runs each, AMD EPYC day), the agent's own p50
fell from 931-978 to 746-754 us at 10 parts/s and from 957-973 to 724-750 us at 100 parts/s (end to end 4-10 %
less); bursts of 16 sites every second and 1,000 parts/s showed no difference beyond the runs' spread. A wrong
guess costs one rehearsal (about 0.1-0.3 ms of CPU), and a part that arrives during it waits for at most that
rehearsal.
"""
from __future__ import annotations

LEAD_S = 0.0008        # rehearse this long before the next touchdown is due: a cold rehearsal takes about 0.3 ms
PAUSE_S = 0.003        # a request after at least this long without one starts a touchdown (none at 1,000 parts/s)
MAX_GAP_S = 3.0        # a longer gap between touchdowns is a lot change or a stop, not the index time


class TouchdownClock:
    """The start of the last touchdown and the gap before it; ``rehearse_in`` says when to rehearse for the next."""

    __slots__ = ("last", "started", "gap", "rehearsed")

    def __init__(self) -> None:
        self.last = float("-inf")      # perf_counter() seconds of the last request
        self.started = float("-inf")   # ... of the first request of the last touchdown
        self.gap = float("inf")        # between the last two touchdowns' starts
        self.rehearsed = True          # the rehearsal for the next touchdown is done (or none is planned)

    def arrived(self, now: float) -> None:
        """A request arrived at ``now``: after a pause of ``PAUSE_S``, it starts a touchdown."""
        if now - self.last > PAUSE_S:
            self.gap, self.started, self.rehearsed = now - self.started, now, False
        self.last = now

    def rehearse_in(self, now: float) -> float | None:
        """Seconds from ``now`` until the rehearsal for the next touchdown (<= 0: due); None when none is planned
        (done already, or the last gap was no index time)."""
        if self.rehearsed or not self.gap < MAX_GAP_S:
            return None
        return self.started + self.gap - LEAD_S - now

    def rehearsing(self, now: float) -> bool:
        """A rehearsal runs at ``now``: the one before the next touchdown, if that one is due (True then)."""
        due = self.rehearse_in(now)
        if due is not None and due <= 0:
            self.rehearsed = True
            return True
        return False
