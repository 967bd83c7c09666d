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

log = logging.getLogger("edge_agent.daemon.shadow")


class SiteAgreement:
    """Agreement counts of one (head, site) for one (champion, challenger) pair."""

    __slots__ = ("parts", "agree", "confusion", "sums", "outliers", "fails", "pat_disagree")

    def __init__(self):
        self.parts = self.agree = 0
        self.confusion: collections.Counter[tuple[int, int]] = collections.Counter()
        self.sums = [0, 0.0, 0.0, 0.0, 0.0, 0.0]  # n, sx, sy, sxx, syy, sxy of (champion, challenger) scores
        self.outliers, self.fails, self.pat_disagree = [0, 0], [0, 0], [0, 0]   # [champion, challenger]

    def to_wire(self, head: int, site: int) -> dict:
        n, sx, sy, sxx, syy, sxy = self.sums
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
        self._compatible: str | None = None         # the champion checksum whose columns match the challenger's
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="edge-agent-shadow", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, challenger) -> None:
        """Score ``challenger`` (a LoadedModel, or None to stop) from the next part on."""
        self._compatible = None
        self.challenger = challenger
        log.info("shadow challenger: %s", "none" if challenger is None else
                 f"{challenger.ref} (checksum {challenger.checksum[:12]})")

    def record(self, champion, part, row: np.ndarray, score: float, probability: float, decision) -> None:
        """Queue one part the champion decided (serving thread): a few hundred nanoseconds, never a wait."""
        challenger = self.challenger
        if challenger is None:
            return
        if champion.checksum != self._compatible:   # once per champion: same tests in the same order
            if challenger.columns != champion.columns:
                return
            self._compatible = champion.checksum
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
        if not blocks:
            return []   # parts skipped meanwhile are reported with the next block
        skipped, self.skipped = self.skipped, 0
        wire = [{"champion": block["champion"], "challenger": block["challenger"], "skipped": 0,
                 "sites": [site.to_wire(head, number) for (head, number), site in sorted(block["sites"].items())]}
                for block in blocks.values()]
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
        """Score one batch with the challenger and count it. Whole-batch numpy where it can (the models, static PAT,
        thresholds), so that the GIL this thread holds, which the serving thread then waits for, stays short."""
        challenger = batch[0][1]
        same = [item for item in batch if item[1] is challenger]   # a challenger swap mid-batch: the rest next time
        for item in reversed(batch[len(same):]):
            self._queue.appendleft(item)
        rows = np.stack([item[4] for item in same])
        scores, probabilities = challenger.score(rows)
        pat = challenger.static_pat
        static = ((rows < pat.low) | (rows > pat.high)).any(axis=1).tolist()   # NaN compares False: no break
        outliers = (scores < challenger.outlier_threshold).tolist()
        fails = (probabilities < challenger.pass_threshold).tolist()
        scores = scores.tolist()
        policy, bins = self.policy, self.policy.bins
        with self._lock:
            for k, (champion, _, head, site, _row, score, probability, decision) in enumerate(same):
                flags = decision.flags
                dynamic = "dynamic_pat" in flags
                fired = {"static_pat": static[k], "dynamic_pat": dynamic, "ml_outlier": outliers[k],
                         "predicted_fail": fails[k]}
                deciding = deciding_condition(policy, fired)
                c_bin = bins[PASS] if deciding is None else bins[deciding]
                tally = self._tally(champion, challenger, head, site)
                c_score, outlier = scores[k], score < champion.outlier_threshold
                tally.parts += 1
                tally.agree += decision.bin == c_bin
                tally.confusion[(decision.bin, c_bin)] += 1
                sums = tally.sums
                sums[0] += 1
                sums[1] += score
                sums[2] += c_score
                sums[3] += score * score
                sums[4] += c_score * c_score
                sums[5] += score * c_score
                tally.outliers[0] += outlier
                tally.outliers[1] += outliers[k]
                tally.fails[0] += probability < champion.pass_threshold
                tally.fails[1] += fails[k]
                tally.pat_disagree[0] += outlier != ("static_pat" in flags or dynamic)
                tally.pat_disagree[1] += outliers[k] != (static[k] or dynamic)
        self.scored += len(same)

    def _tally(self, champion, challenger, head: int, site: int) -> SiteAgreement:
        key = (champion.checksum, challenger.checksum)
        block = self._blocks.get(key)
        if block is None:
            block = self._blocks[key] = {"champion": dict(champion.identity), "challenger": dict(challenger.identity),
                                         "sites": {}}
        tally = block["sites"].get((head, site))
        if tally is None:
            tally = block["sites"][(head, site)] = SiteAgreement()
        return tally
