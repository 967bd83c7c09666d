"""The shadow challenger: a second package scored beside the champion on every part, off the reply's path.

The serving thread only queues what it decided (``record``: one deque append, measured by edge-bench as
``shadow.record_us_per_part``); a thread of lower CPU priority scores the queued parts with the challenger in one
onnxruntime call per batch and counts how the two agree, per (head, site). The reply never waits for the challenger
and never carries its decision. The queue is bounded (``queue_parts``): a part that finds it full is not scored in
shadow and is counted (``skipped``), so a challenger slower than the test floor costs evidence, never latency.

What is counted per (champion, challenger, head, site), shipped with the drift windows (STATS_PROTOCOL.md,
``shadow``): parts, bin agreement and the bin confusion matrix, sums for the outlier scores' correlation, outliers,
predicted fails and disagreements with PAT of each model. The challenger's bin uses its own static PAT limits and
the champion's dynamic PAT outcome (the site windows belong to the agent, not to a package).
"""
from __future__ import annotations

import collections
import logging
import threading

import numpy as np

from .binning import PASS, BinPolicy, deciding_condition
from .reload import yield_cpu_to_serving

log = logging.getLogger("edge_agent.shadow")

_PAT = ("static_pat", "dynamic_pat")


class SiteAgreement:
    """Agreement counts of one (head, site) for one (champion, challenger) pair."""

    __slots__ = ("parts", "agree", "confusion", "sums", "outliers", "fails", "pat_disagree")

    def __init__(self):
        self.parts = self.agree = 0
        self.confusion: collections.Counter[tuple[int, int]] = collections.Counter()
        self.sums = np.zeros(6)                   # n, sx, sy, sxx, syy, sxy of (champion, challenger) scores
        self.outliers, self.fails, self.pat_disagree = [0, 0], [0, 0], [0, 0]   # [champion, challenger]

    def to_wire(self, head: int, site: int) -> dict:
        n, sx, sy, sxx, syy, sxy = self.sums.tolist()
        return {"head": head, "site": site, "parts": self.parts, "agree": self.agree,
                "confusion": [[a, b, count] for (a, b), count in sorted(self.confusion.items())],
                "score_sums": {"n": int(n), "sx": sx, "sy": sy, "sxx": sxx, "syy": syy, "sxy": sxy},
                "outliers": list(self.outliers), "fails": list(self.fails), "pat_disagree": list(self.pat_disagree)}


class ShadowScorer:
    """``offer`` a challenger (any thread), ``record`` each decided part (serving thread), ``take`` the counts at a
    drift window's close (serving thread); the scoring runs on this object's own thread."""

    def __init__(self, policy: BinPolicy, *, queue_parts: int = 4096, batch_parts: int = 64):
        self.policy = policy
        self.queue_parts, self.batch_parts = queue_parts, batch_parts
        self.challenger = None                     # the LoadedModel scored in shadow (None: no shadow scoring)
        self.skipped = 0                           # parts not scored in shadow: the queue was full (serving thread)
        self.scored = 0                            # written by the shadow thread only
        self.failed = 0
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()              # guards _blocks between the shadow thread and take()
        self._blocks: dict[tuple[str, str], dict] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="edge-agent-shadow", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, challenger) -> None:
        """Score ``challenger`` (a LoadedModel, or None to stop) from the next part on."""
        self.challenger = challenger
        log.info("shadow challenger: %s", "none" if challenger is None else
                 f"{challenger.ref} (checksum {challenger.checksum[:12]})")

    def record(self, champion, part, row: np.ndarray, score: float, probability: float, decision) -> None:
        """Queue one part the champion decided (serving thread): a few hundred nanoseconds, never a wait."""
        challenger = self.challenger
        if challenger is None or challenger.columns != champion.columns:
            return
        queue = self._queue
        if len(queue) >= self.queue_parts:
            self.skipped += 1
            return
        queue.append((champion, challenger, part.head, part.site, row, score, probability, decision))
        if len(queue) == self.batch_parts:
            self._wake.set()

    def tick(self) -> None:
        """The serving loop is idle: score what waits, however few."""
        if self._queue:
            self._wake.set()

    def take(self) -> list[dict]:
        """The counts since the last take, as the ``shadow`` blocks of a stats window (empty: nothing to report)."""
        with self._lock:
            blocks, self._blocks = self._blocks, {}
        skipped, self.skipped = self.skipped, 0
        if not blocks and not skipped:
            return []
        wire = [{"champion": block["champion"], "challenger": block["challenger"], "skipped": 0,
                 "sites": [site.to_wire(head, number) for (head, number), site in sorted(block["sites"].items())]}
                for block in blocks.values()]
        if wire:
            wire[-1]["skipped"] = skipped
        return wire

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def status(self) -> dict:
        challenger = self.challenger
        return {"challenger": None if challenger is None else challenger.identity, "scored": self.scored,
                "queued": len(self._queue), "queue_parts": self.queue_parts, "skipped_since_window": self.skipped,
                "failed": self.failed}

    # ---- the shadow thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        yield_cpu_to_serving()
        while not self._stopping:
            self._wake.wait()
            self._wake.clear()
            while self._queue and not self._stopping:
                batch = [self._queue.popleft() for _ in range(min(self.batch_parts, len(self._queue)))]
                try:
                    self._score(batch)
                except Exception:   # a challenger bug costs shadow evidence, never the agent
                    self.failed += len(batch)
                    log.exception("shadow scoring of %d part(s) failed", len(batch))

    def _score(self, batch: list[tuple]) -> None:
        challenger = batch[0][1]
        same = [item for item in batch if item[1] is challenger]   # a challenger swap mid-batch: the rest next time
        for item in reversed(batch[len(same):]):
            self._queue.appendleft(item)
        scores, probabilities = challenger.score(np.stack([item[4] for item in same]))
        policy, bins = self.policy, self.policy.bins
        counted = []
        for (champion, _, head, site, row, score, probability, decision), c_score, c_probability in zip(
                same, scores.tolist(), probabilities.tolist()):
            fired = {"static_pat": bool(challenger.static_pat.breaks(row)),
                     "dynamic_pat": "dynamic_pat" in decision.flags,
                     "ml_outlier": c_score < challenger.outlier_threshold,
                     "predicted_fail": c_probability < challenger.pass_threshold}
            deciding = deciding_condition(policy, fired)
            c_bin = bins[PASS] if deciding is None else bins[deciding]
            outlier = score < champion.outlier_threshold
            pat = any(flag in decision.flags for flag in _PAT)
            c_pat = fired["static_pat"] or fired["dynamic_pat"]
            counted.append((champion.identity, head, site, decision.bin, c_bin, score, c_score,
                            (outlier, fired["ml_outlier"]), (probability < champion.pass_threshold,
                                                             fired["predicted_fail"]), (outlier != pat,
                                                                                        fired["ml_outlier"] != c_pat)))
        with self._lock:
            for identity, head, site, b, c_bin, score, c_score, outliers, fails, pat_disagree in counted:
                key = (identity["checksum"], challenger.checksum)
                block = self._blocks.get(key)
                if block is None:
                    block = self._blocks[key] = {"champion": dict(identity), "challenger": dict(challenger.identity),
                                                 "sites": {}}
                tally = block["sites"].get((head, site))
                if tally is None:
                    tally = block["sites"][(head, site)] = SiteAgreement()
                tally.parts += 1
                tally.agree += b == c_bin
                tally.confusion[(b, c_bin)] += 1
                tally.sums += (1.0, score, c_score, score * score, c_score * c_score, score * c_score)
                for i in (0, 1):
                    tally.outliers[i] += outliers[i]
                    tally.fails[i] += fails[i]
                    tally.pat_disagree[i] += pat_disagree[i]
        self.scored += len(same)
