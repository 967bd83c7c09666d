"""The one summary of an agent's score replies, shared by every tool that streams parts through an agent.

    summary = ReplySummary()
    for part, result in ...:        # part: the identity map sent, result: AgentClient.score's ScoreResult
        summary.add(part, result)
    print(summary.describe())       # for people
    json.dumps(summary.as_dict())   # for programs
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from .client import BACKING_OFF, ENCODE_FAILED, SEND_QUEUE_FULL, TIMEOUT, TOO_LARGE_TO_SEND, ScoreResult

TOP_OUTLIERS = 10
PERCENTILES = (50, 90, 99)
# No-decision reasons decided on the client's side before any reply arrived: their "round trip" is a
# timeout or nothing, not the agent's answer time, so it stays out of the latency figures.
NO_REPLY_REASONS = frozenset((TIMEOUT, BACKING_OFF, SEND_QUEUE_FULL, ENCODE_FAILED, TOO_LARGE_TO_SEND))
PAT_FLAGS = ("static_pat", "dynamic_pat")
ML_FLAG = "ml_outlier"


class ReplySummary:
    """Counts of decisions, bins and flags, where PAT and the ML outlier model disagree, the most anomalous
    parts, no-decision reasons, the model versions that decided, and latency (round trip and agent-side)."""

    def __init__(self) -> None:
        self.parts = 0
        self.bins: Counter[str] = Counter()
        self.flags: Counter[str] = Counter()
        self.versions: Counter[str] = Counter()
        self.no_decision: Counter[str] = Counter()
        self.outliers = 0
        self.predicted_fail = 0
        self.insufficient_readings = 0
        self.pat_and_ml = 0
        self.ml_flagged: list[dict] = []
        self.ml_only: list[dict] = []
        self.pat_only: list[dict] = []
        self._scored: list[tuple[float, dict]] = []
        self._round_trip_us: list[float] = []
        self._agent_us: list[float] = []

    def add(self, part: dict, result: ScoreResult) -> None:
        self.parts += 1
        replied = result.decided or result.error_code not in NO_REPLY_REASONS
        if replied and result.round_trip_us is not None:
            self._round_trip_us.append(result.round_trip_us)
        if not result.decided:
            self.no_decision[result.error_code] += 1
            return
        if result.agent_us is not None:
            self._agent_us.append(result.agent_us)
        self.bins[result.bin_name] += 1
        self.flags.update(result.flags)
        self.versions[str(result.model["version"]) if result.model else "?"] += 1
        self.outliers += bool(result.outlier)
        self.predicted_fail += bool(result.predicted_fail)
        self.insufficient_readings += result.insufficient_readings
        ml = ML_FLAG in result.flags
        pat = any(flag in result.flags for flag in PAT_FLAGS)
        if ml:
            self.ml_flagged.append(part)
        if ml and pat:
            self.pat_and_ml += 1
        elif ml:
            self.ml_only.append({**part, "why": result.why})   # names the tests furthest from typical
        elif pat:
            self.pat_only.append({**part, "tests": sorted({b["test"] for b in result.pat})})
        if result.outlier_score is not None:   # None: too few readings for a meaningful score
            self._scored.append((result.outlier_score, part))

    @property
    def decided(self) -> int:
        return sum(self.bins.values())

    def most_anomalous(self, count: int = TOP_OUTLIERS) -> list[dict]:
        ranked = sorted(self._scored, key=lambda item: item[0])[:count]
        return [{**part, "outlier_score": score} for score, part in ranked]

    def as_dict(self) -> dict:
        return {
            "parts": self.parts, "decided": self.decided, "no_decision": dict(self.no_decision),
            "bins": dict(self.bins), "flags": dict(self.flags), "outliers": self.outliers,
            "predicted_fail": self.predicted_fail, "insufficient_readings": self.insufficient_readings,
            "model_versions": dict(self.versions),
            "ml_outlier_parts": self.ml_flagged, "pat_and_ml_outlier": self.pat_and_ml, "ml_outlier_only": self.ml_only, "pat_only": self.pat_only,
            "most_anomalous": self.most_anomalous(),
            "round_trip_us": latency_figures(self._round_trip_us),
            "agent_us": latency_figures(self._agent_us),
        }

    def describe(self) -> str:
        lines = [f"parts sent {self.parts:,}, decided {self.decided:,}, no decision "
                 f"{sum(self.no_decision.values()):,}" + _counts(self.no_decision, " (", ")")]
        if self.decided:
            lines += [f"bins          {_counts(self.bins)}",
                      f"flags         {_counts(self.flags) or 'none'}",
                      f"outliers      {self.outliers:,} ML outlier(s), {self.predicted_fail:,} predicted fail; "
                      f"PAT and ML agree on {self.pat_and_ml:,}, ML only {len(self.ml_only):,}, "
                      f"PAT only {len(self.pat_only):,}",
                      f"readings      {self.insufficient_readings:,} part(s) with too few readings for a decision "
                      "by the models (insufficient_readings)",
                      f"models        {_counts(self.versions)} (version: parts)"]
        lines += [f"round trip us {_latency_text(latency_figures(self._round_trip_us))}",
                  f"agent us      {_latency_text(latency_figures(self._agent_us))}"]
        for entry in self.most_anomalous(5):
            where = " ".join(f"{k}={entry[k]}" for k in ("lot", "wafer", "x", "y", "site", "part_id") if k in entry)
            lines.append(f"  anomalous   {entry['outlier_score']:+.4f}  {where}")
        return "\n".join(lines)


def latency_figures(values_us: list[float]) -> dict:
    """count, p50, p90, p99 and max in microseconds (None without values)."""
    if not values_us:
        return {"count": 0, **{f"p{p}": None for p in PERCENTILES}, "max": None}
    values = np.asarray(values_us, dtype=np.float64)
    figures = {f"p{p}": round(float(v), 1) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))}
    return {"count": len(values), **figures, "max": round(float(values.max()), 1)}


def _counts(counter: Counter, before: str = "", after: str = "") -> str:
    if not counter:
        return ""
    return before + ", ".join(f"{key} {count:,}" for key, count in counter.most_common()) + after


def _latency_text(figures: dict) -> str:
    if not figures["count"]:
        return "no replies"
    return (f"p50 {figures['p50']:,.0f}  p90 {figures['p90']:,.0f}  p99 {figures['p99']:,.0f}  "
            f"max {figures['max']:,.0f}  ({figures['count']:,} replies)")
