"""Deciding scored parts: what the agent does with a part's readings once the graphs have scored them.

``PartDecider.decide`` takes rows already scored (a single request's one row, a score_batch slice's rows, a
rehearsal's row) and returns each part's result as the reply carries it (``wire.score.part_result``). Its steps, in
order: coverage (enough readings for the models?), static PAT, dynamic PAT, drift, explain, bin, count, audit. What a
decision leaves behind goes to its ``Sink``: the counters, the drift statistics, the audit and shadow record.
``REHEARSAL`` is the sink of a keep-warm rehearsal, which leaves nothing; a rehearsal also passes no dynamic PAT, so
no site window changes.

A part with too few readings (``BinPolicy.min_readings_share``) gets its own bin, null scores, static PAT on what it
has, and stays out of the dynamic PAT window and the drift statistics (its scores describe the imputed medians, and
its empty readings would take a window slot from a real part).
"""
from __future__ import annotations

import time
from typing import Protocol, Sequence

import numpy as np

from .binning import BinPolicy, Decision, decide, decide_insufficient
from .metrics import Metrics
from .pat import DynamicPat
from .scoring import LoadedModel
from .stages import AUDIT, BIN, DRIFT, EXPLAIN, PAT
from ..wire.score import Part, part_result


class DriftHook(Protocol):
    """Streaming drift statistics (edge_agent.daemon.upstream.AgentDrift): every scored part, idle ticks, status."""

    def update(self, model: LoadedModel, part: Part, readings: np.ndarray, score: float) -> None: ...

    @property
    def queued(self) -> int: ...

    def take_queued(self, parts: int | None = None) -> None: ...

    def tick(self) -> None: ...

    def status(self) -> dict: ...


class LifecycleHook(Protocol):
    """Audit and shadow challenger (edge_agent.daemon.lifecycle.Lifecycle): every decided part, idle ticks, status."""

    def decided(self, model: LoadedModel, part: Part, row: np.ndarray, score: float | None,
                probability: float | None, decision: Decision) -> None: ...

    def tick(self) -> None: ...

    def status(self) -> dict: ...


class Sink:
    """Where decided parts leave their traces: ``metrics`` counts them, ``drift`` takes their statistics,
    ``lifecycle`` audits them and queues them for the shadow challenger. None: that trace is not left."""

    __slots__ = ("metrics", "drift", "lifecycle")

    def __init__(self, metrics: Metrics | None = None, drift: DriftHook | None = None,
                 lifecycle: LifecycleHook | None = None):
        self.metrics, self.drift, self.lifecycle = metrics, drift, lifecycle


REHEARSAL = Sink()   # a keep-warm rehearsal: the whole path, no counts, no drift, no audit


class PartDecider:
    """The agent's decision for scored parts, under one bin policy."""

    def __init__(self, policy: BinPolicy):
        self.policy = policy

    def decide(self, model: LoadedModel, dynamic: DynamicPat | None, sink: Sink, parts: Sequence[Part],
               rows: Sequence[np.ndarray], scores: Sequence[float], probabilities: Sequence[float],
               sample: list[int] | None = None) -> list[dict]:
        """Each part's result: ``parts[k]``'s float32 readings ``rows[k]``, scored ``scores[k]`` (outlier) and
        ``probabilities[k]`` (pass) by ``model``. ``dynamic``: the site windows the parts join (None: none);
        ``sample``: a stage sample (edge_agent/daemon/stages.py) timing the steps, for a single part.

        The rows are judged as one matrix where a step does not depend on the parts before it: coverage, static PAT
        and the two model thresholds, one numpy pass over all rows (a touchdown's 16 sites cost about what one site
        did). Dynamic PAT, drift, explanations, bin, counts and audit follow part by part in the parts' order, as
        each part's site window holds the parts of that site before it: every part gets the decision it would get
        alone."""
        policy, static_pat, metrics, drift, lifecycle = self.policy, model.static_pat, sink.metrics, sink.drift, \
            sink.lifecycle
        matrix = np.stack(rows) if len(rows) > 1 else rows[0][None, :]
        present = np.count_nonzero(matrix == matrix, axis=1)   # coverage (NaN != NaN: readings present)
        needed = policy.needed_readings(matrix.shape[1])
        outside = static_pat.outside(matrix)
        with_breaks = outside.any(axis=1)
        score_of, probability_of = np.asarray(scores, np.float64), np.asarray(probabilities, np.float64)
        outliers = score_of < model.outlier_threshold
        results = []
        for k, part in enumerate(parts):
            row, score, probability = rows[k], float(score_of[k]), float(probability_of[k])
            static = static_pat.breaks_of(row, outside[k]) if with_breaks[k] else []
            if present[k] < needed:
                results.append(self._insufficient(model, sink, part, row, int(present[k]), static))
                continue
            breaks = dynamic.check_and_add(part, row) if dynamic is not None else []
            if sample is not None:
                sample[PAT] = time.perf_counter_ns()
            if drift is not None:
                drift.update(model, part, row, score)
                if sample is not None:
                    sample[DRIFT] = time.perf_counter_ns()
            outlier = bool(outliers[k])
            drivers = model.explainer.drivers(row) if outlier or static or breaks else []
            if sample is not None:
                sample[EXPLAIN] = time.perf_counter_ns()
            decision = decide(policy, static=static, dynamic=breaks, score=score,
                              score_threshold=model.outlier_threshold, pass_probability=probability,
                              pass_threshold=model.pass_threshold, drivers=drivers,
                              observed_only=model.observed_only)
            if metrics is not None:
                _count(metrics, decision)
                if sample is not None:
                    sample[BIN] = time.perf_counter_ns()
            if lifecycle is not None:
                lifecycle.decided(model, part, row, score, probability, decision)
                if sample is not None:
                    sample[AUDIT] = time.perf_counter_ns()
            results.append(part_result(score, outlier, probability, probability < model.pass_threshold, decision,
                                       static + breaks, drivers, int(present[k])))
        return results

    def _insufficient(self, model: LoadedModel, sink: Sink, part: Part, row: np.ndarray, present: int,
                      static: list) -> dict:
        decision = decide_insufficient(self.policy, present=present, tests=len(row), static=static)
        if sink.metrics is not None:
            _count(sink.metrics, decision)
        if sink.lifecycle is not None:
            sink.lifecycle.decided(model, part, row, None, None, decision)
        return part_result(None, None, None, None, decision, static, (), present, insufficient=True)


def _count(metrics: Metrics, decision: Decision) -> None:
    metrics.parts_scored += 1
    metrics.bins[decision.name] += 1
    for flag in decision.flags:
        metrics.flags[flag] += 1
