"""The agent's counters and latency histogram, read by the health reply and the Prometheus endpoint.

The serving loop is the only writer and touches plain ints and one list, so recording costs well under a
microsecond; the Prometheus collector reads them at scrape time from its own thread (reads of ints and
list items are atomic under the GIL; a scrape may see one part more in one counter than in another).
"""
from __future__ import annotations

import bisect
import math
import time
from collections import Counter

PROMETHEUS_BOUNDS_S = (10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 100e-3, 1.0)
_FINE_PER_DECADE = 50     # bucket width about 4.7 %: the error bound of a reported percentile
_FINE_RANGE_S = (1e-6, 10.0)


class LatencyHistogram:
    """Log-spaced buckets from 1 us to 10 s (plus the Prometheus bounds, so those counts are exact)."""

    def __init__(self) -> None:
        low, high = (math.log10(v) for v in _FINE_RANGE_S)
        steps = int(round((high - low) * _FINE_PER_DECADE))
        fine = {10 ** (low + i / _FINE_PER_DECADE) for i in range(steps + 1)}
        self.bounds = sorted(fine | set(PROMETHEUS_BOUNDS_S))   # bucket i holds values <= bounds[i]
        self.counts = [0] * (len(self.bounds) + 1)              # last bucket: above the range
        self.count = 0
        self.total_s = 0.0
        self.max_s = 0.0

    def record(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.total_s += seconds
        if seconds > self.max_s:
            self.max_s = seconds

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-quantile (never under-reports), capped at the maximum."""
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank and n:
                return min(self.bounds[i] if i < len(self.bounds) else self.max_s, self.max_s)
        return self.max_s

    def cumulative(self, bounds: tuple[float, ...]) -> list[int]:
        """Counts of values <= each of ``bounds`` (each must be one of this histogram's bounds)."""
        cumulative, running, out = {}, 0, []
        for bound, n in zip(self.bounds, self.counts):
            running += n
            cumulative[bound] = running
        for bound in bounds:
            out.append(cumulative[bound])
        return out

    def summary_us(self) -> dict:
        """Percentiles, maximum and mean in microseconds; ``buckets``: [upper bound in us, count at or below]."""
        def us(value: float | None) -> float | None:
            return None if value is None else round(value * 1e6, 1)
        return {"count": self.count, "p50": us(self.quantile(0.50)), "p95": us(self.quantile(0.95)),
                "p99": us(self.quantile(0.99)), "max": us(self.max_s if self.count else None),
                "mean": us(self.total_s / self.count if self.count else None),
                "buckets": [[us(bound), n] for bound, n in zip(PROMETHEUS_BOUNDS_S,
                                                               self.cumulative(PROMETHEUS_BOUNDS_S))]}


class Metrics:
    """Everything the agent counts."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self.requests: Counter[str] = Counter()       # by request type ("invalid" when the envelope is not valid)
        self.errors: Counter[str] = Counter()         # by protocol error code, batch items included
        self.bins: Counter[str] = Counter()           # recommended bin names
        self.flags: Counter[str] = Counter()          # conditions that fired (several per part possible)
        self.replies_dropped: Counter[str] = Counter()  # "unroutable" (client gone), "queue_full"
        self.reloads: Counter[str] = Counter()        # "loaded", "refused"
        self.rollbacks = 0
        self.slow_replies: Counter[str] = Counter()   # replies over slow_reply_ms, by their largest cause (slow.py)
        self.parts_scored = 0
        self.parts_scored_ahead = 0                   # their graphs ran in an earlier request's call (server.py)
        self.latency = LatencyHistogram()             # receipt of a request to its reply sent

    def uptime_s(self) -> float:
        return time.time() - self.started_at

    def snapshot(self) -> dict:
        return {"uptime_s": round(self.uptime_s(), 3), "parts_scored": self.parts_scored,
                "parts_scored_ahead": self.parts_scored_ahead,
                "requests": dict(self.requests), "errors": dict(self.errors), "bins": dict(self.bins),
                "flags": dict(self.flags), "replies_dropped": dict(self.replies_dropped),
                "reloads": dict(self.reloads), "rollbacks": self.rollbacks, "latency_us": self.latency.summary_us()}


class PrometheusCollector:
    """Exposes ``Metrics``, the serving model and drift shipping in Prometheus text format at scrape time."""

    def __init__(self, metrics: Metrics, model_identity, drift=None, lifecycle=None) -> None:
        self.metrics = metrics
        self.model_identity = model_identity   # callable -> {"name", "version", "checksum"}
        self.drift = drift                     # callable -> the drift hook's status(), or None: drift is off
        self.lifecycle = lifecycle             # callable -> the lifecycle hook's status(), or None

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        m = self.metrics
        yield _labelled(CounterMetricFamily("edge_agent_requests", "Requests received, by type", labels=["type"]),
                        m.requests)
        yield _labelled(CounterMetricFamily("edge_agent_errors", "Error replies, by protocol error code",
                                            labels=["code"]), m.errors)
        yield CounterMetricFamily("edge_agent_parts_scored", "Parts scored", value=m.parts_scored)
        yield CounterMetricFamily("edge_agent_parts_scored_ahead", "Parts whose graphs ran in an earlier waiting "
                                  "request's onnxruntime call", value=m.parts_scored_ahead)
        yield _labelled(CounterMetricFamily("edge_agent_bins", "Recommended bins, by name", labels=["bin"]), m.bins)
        yield _labelled(CounterMetricFamily("edge_agent_flags", "Parts for which a condition fired",
                                            labels=["condition"]), m.flags)
        yield _labelled(CounterMetricFamily("edge_agent_replies_dropped", "Replies ZeroMQ could not deliver",
                                            labels=["reason"]), m.replies_dropped)
        yield _labelled(CounterMetricFamily("edge_agent_reloads", "Model reload attempts, by outcome",
                                            labels=["outcome"]), m.reloads)
        yield CounterMetricFamily("edge_agent_rollbacks", "Rollbacks to the previous model", value=m.rollbacks)
        yield _labelled(CounterMetricFamily("edge_agent_slow_replies", "Replies sent later than slow_reply_ms after "
                                            "their request arrived, by their largest cause", labels=["cause"]),
                        m.slow_replies)
        yield GaugeMetricFamily("edge_agent_uptime_seconds", "Seconds since the agent started", value=m.uptime_s())
        identity = self.model_identity()
        info = GaugeMetricFamily("edge_agent_model_info", "The model serving now (value 1)",
                                 labels=["name", "version", "checksum"])
        info.add_metric([identity["name"], identity["version"], identity["checksum"]], 1)
        yield info
        histogram = m.latency
        buckets = [(_le(b), n) for b, n in zip(PROMETHEUS_BOUNDS_S, histogram.cumulative(PROMETHEUS_BOUNDS_S))]
        buckets.append(("+Inf", histogram.count))
        yield HistogramMetricFamily("edge_agent_request_seconds", "Time from receiving a request to sending its reply",
                                    buckets=buckets, sum_value=histogram.total_s)
        if self.drift is not None:
            drift = self.drift()
            windows = CounterMetricFamily("edge_agent_drift_windows", "Drift windows by what became of them: acked "
                                          "(stored by the collector), dead_lettered (refused for good, kept in the "
                                          "spool's dead-letter folder), dropped (lost: full spool, refused, unspooled)",
                                          labels=["outcome"])
            for outcome, value in (("acked", drift["acked"]), ("dead_lettered", drift["dead_lettered"]),
                                   ("dropped", drift["dropped_total"] + drift["unspooled_lost"])):
                windows.add_metric([outcome], value)
            yield windows
            yield GaugeMetricFamily("edge_agent_drift_spooled", "Drift windows waiting in the spool for an ack",
                                    value=drift["spooled"])
        if self.lifecycle is not None:
            yield from _lifecycle_families(self.lifecycle())


def _lifecycle_families(status: dict):
    """The audit's batches, the shadow challenger's parts and the registry service link (edge_agent/daemon/lifecycle.py)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    audit, shadow, fleet = status["audit"], status["shadow"], status["fleet"]
    if audit is not None:
        batches = CounterMetricFamily("edge_agent_audit_batches", "Audit batches of decisions by what became of "
                                      "them: acked (stored by the collector), dropped (lost: full audit spool, "
                                      "refused, unspooled; alerted by the collector)", labels=["outcome"])
        batches.add_metric(["acked"], audit["acked"])
        batches.add_metric(["dropped"], audit["dropped_total"] + audit["unspooled_lost"])
        yield batches
        yield CounterMetricFamily("edge_agent_audit_decisions", "Decisions recorded for the audit",
                                  value=audit["recorded"] + audit["open_batch"])
    if shadow is not None:
        parts = CounterMetricFamily("edge_agent_shadow_parts", "Parts the shadow challenger scored, and those whose "
                                    "scoring failed", labels=["outcome"])
        parts.add_metric(["scored"], shadow["scored"])
        parts.add_metric(["failed"], shadow["failed"])
        yield parts
    if fleet is not None:
        yield GaugeMetricFamily("edge_agent_registry_service_online", "1 while the registry service answers, 0 while "
                                "the agent serves from its cache (offline)", value=int(fleet["state"] == "online"))

def start_prometheus(metrics: Metrics, model_identity, host: str, port: int, *, drift=None, lifecycle=None):
    """Serve /metrics on host:port from a daemon thread; returns (server, thread)."""
    from prometheus_client import CollectorRegistry, start_http_server
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PrometheusCollector(metrics, model_identity, drift, lifecycle))
    return start_http_server(port, addr=host, registry=registry)


def _labelled(family, counts: Counter):
    for label, value in sorted(counts.items()):
        family.add_metric([label], value)
    return family


def _le(bound: float) -> str:
    return f"{bound:.6g}"
