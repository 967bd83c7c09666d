"""Where the agent's own time goes: a per-stage breakdown of sampled score requests.

Every ``every``-th request carries a sample (a preallocated list) through the serving path; each stage
writes ``time.perf_counter_ns()`` at its end into its slot, and the finished sample's stage durations go into a
ring of the last ``RING`` samples, read by the health reply (``stages``; edge-bench's cadence section reads it per
profile with ``stages_since``). Measured in process (timeit, 2 cores): a request not sampled pays about 0.15 us (a
counter decrement and one ``is None`` test per stage), a sampled one about 3 us (at the default every 100th,
0.03 us a request on average).

Stages, in the order the serving path runs them: ``wait`` (receipt to the start of its turn: the inbox), ``decode``
(msgpack and envelope), ``validate`` (part identity and readings), ``graphs`` (the onnxruntime call running the
outlier and yield graphs as one), ``pat`` (static and dynamic PAT; a site's due refresh only if the agent had no
moment between parts to do it), ``drift`` (queueing the part's drift statistics, taken between parts), ``explain``
(drivers of a flagged part: next to nothing for the others), ``bin`` (the bin decision and counters), ``audit`` (the
audit record and shadow challenger queueing of edge_agent.daemon.lifecycle; zero when neither is on), ``encode`` (the reply
built and packed) and ``send`` (handing it to ZeroMQ). A stage a request skips (drift when it is off, all but
wait/decode/validate/pat for a part with too few readings) counts zero, its time going to the next stage that ran.
Only single score requests are filed: the sample of any other request (health, score_batch, a refused one) is
dropped.
"""
from __future__ import annotations

import time

import numpy as np

STAGES = ("wait", "decode", "validate", "graphs", "pat", "drift", "explain", "bin", "audit", "encode", "send")
(WAIT, DECODE, VALIDATE, GRAPHS, PAT, DRIFT, EXPLAIN, BIN, AUDIT, ENCODE, SEND) = range(1, len(STAGES) + 1)
RING = 4096          # samples kept: at the default every 100th request, the last ~400,000 requests


class StageSampler:
    """Hands out a sample to every ``every``-th request (0: never) and keeps the last ``RING`` finished ones.
    Single-threaded (the serving loop); a health reply reads it on the same thread."""

    def __init__(self, every: int):
        self.every = every
        self.taken = 0                  # samples finished since start: the sequence number of the latest
        self._countdown = every
        self._marks = [0] * (len(STAGES) + 1)   # [start, end of each stage]; reused: one sample in flight
        self._durations = [0] * len(STAGES)
        self._ring = np.zeros((RING, len(STAGES)), dtype=np.int64)

    def begin(self, received: float) -> list[int] | None:
        """The sample for a request received at ``received`` (time.perf_counter()) now starting its turn, or None
        (not this one)."""
        self._countdown -= 1
        if self._countdown or not self.every:
            return None
        self._countdown = self.every
        marks = self._marks
        for i in range(2, len(marks)):
            marks[i] = 0
        marks[0] = int(received * 1e9)   # perf_counter and perf_counter_ns read the same clock
        marks[WAIT] = time.perf_counter_ns()
        return marks

    def end(self, marks: list[int]) -> None:
        """File a finished sample: each stage's duration from the end of the last stage before it that ran."""
        durations, previous = self._durations, marks[0]
        for i in range(len(STAGES)):
            at = marks[i + 1]
            durations[i] = at - previous if at else 0
            previous = at or previous
        self._ring[self.taken % RING] = durations
        self.taken += 1

    def latest_us(self) -> dict[str, float]:
        """The stages of the sample filed last, in us (a slow reply's breakdown: edge_agent/daemon/slow.py)."""
        return {name: round(self._durations[i] / 1e3, 1) for i, name in enumerate(STAGES) if self._durations[i]}

    def summary(self, since: int = 0) -> dict:
        """Per stage p50, p99, max and mean (us) over the samples after number ``since`` still in the ring."""
        count = min(self.taken - max(0, since), RING)
        by_stage = {}
        if count > 0:
            rows = self._ring[(np.arange(self.taken - count, self.taken) % RING)] / 1e3
            p50, p99 = np.percentile(rows, [50, 99], axis=0)
            for i, name in enumerate(STAGES):
                by_stage[name] = {"p50_us": round(float(p50[i]), 1), "p99_us": round(float(p99[i]), 1),
                                  "max_us": round(float(rows[:, i].max()), 1),
                                  "mean_us": round(float(rows[:, i].mean()), 1)}
        return {"every": self.every, "taken": self.taken, "samples": max(0, count), "by_stage": by_stage}
