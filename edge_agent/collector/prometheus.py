"""The collector's Prometheus exposition: fleet state kept in memory, read at scrape time."""
from __future__ import annotations

import threading
import time
from collections import Counter

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .alerts import KINDS
from .diagnosis import SCOPES


class FleetState:
    """What Prometheus shows, kept in memory; the receive loop writes, scrapes read, under one lock."""

    def __init__(self, silent_after_s: float):
        self.silent_after_s = silent_after_s
        self.lock = threading.Lock()
        self.received = 0
        self.duplicates = 0
        self.invalid = 0
        self.unstorable = 0
        self.agent_id_mismatches = 0
        self.audit_records = 0
        self.alerts: Counter[str] = Counter({kind: 0 for kind in KINDS})
        self.incidents_opened: Counter[str] = Counter({scope: 0 for scope in SCOPES})
        self.incidents_open: Counter[str] = Counter({scope: 0 for scope in SCOPES})
        self.last_seen: dict[str, float] = {}
        self.psi: dict[tuple[str, str], float] = {}     # (tester, test) -> latest PSI, worst site

    def judged(self, tester: str, psi: dict[str, float]) -> None:
        with self.lock:
            for column, value in psi.items():
                self.psi[(tester, column)] = value

    def count(self, alert: dict) -> None:
        """An alert or an incident event (kind ``incident_opened``, ``incident_updated``, ``incident_closed``)."""
        with self.lock:
            if alert["kind"] == "incident_opened":
                self.incidents_opened[alert["scope"]] += 1
                self.incidents_open[alert["scope"]] += 1
            elif alert["kind"] == "incident_closed":
                self.incidents_open[alert["scope"]] -= 1
            elif not alert["kind"].startswith("incident_"):
                self.alerts[alert["kind"]] += 1

    def collect(self):
        now = time.time()
        with self.lock:
            yield _counter("edge_collector_messages_received", "Stats messages received (valid or not)",
                           self.received)
            yield _counter("edge_collector_duplicates_dropped", "Windows received again and not stored again",
                           self.duplicates)
            yield _counter("edge_collector_invalid_messages", "Messages refused as invalid", self.invalid)
            yield _counter("edge_collector_unstorable_windows", "Valid windows refused for good after their store "
                           "failed repeatedly while the database worked", self.unstorable)
            yield _counter("edge_collector_agent_id_mismatches", "Windows refused because their agent_id was not "
                           "the id of the CURVE key that sent them", self.agent_id_mismatches)
            yield _counter("edge_collector_audit_records", "Decisions stored from agents' audit batches",
                           self.audit_records)
            alerts = CounterMetricFamily("edge_collector_alerts", "Alerts raised, by kind", labels=["kind"])
            for kind, count in sorted(self.alerts.items()):
                alerts.add_metric([kind], count)
            yield alerts
            opened = CounterMetricFamily("edge_collector_incidents_opened", "Incidents opened, by scope",
                                         labels=["scope"])
            open_now = GaugeMetricFamily("edge_collector_incidents_open", "Incidents open now, by scope",
                                         labels=["scope"])
            for scope in SCOPES:
                opened.add_metric([scope], self.incidents_opened[scope])
                open_now.add_metric([scope], self.incidents_open[scope])
            yield opened
            yield open_now
            alive = sum(1 for seen in self.last_seen.values() if now - seen <= self.silent_after_s)
            yield GaugeMetricFamily("edge_collector_agents_alive",
                                    "Agents heard from within the silence limit", value=alive)
            yield GaugeMetricFamily("edge_collector_agents_known", "Agents ever heard from", value=len(self.last_seen))
            psi = GaugeMetricFamily("edge_collector_psi", "Latest PSI judged for a test on a tester (its worst "
                                    "site, over at least the alert rule's minimum readings)", labels=["tester", "test"])
            for (tester, test), value in sorted(self.psi.items()):
                psi.add_metric([tester, test], value)
            yield psi


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
