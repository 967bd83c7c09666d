"""Incidents from stored windows, in process: the real DriftMonitor builds the windows from the drift floor's
held-out parts (tests/conftest.py), the real Store keeps them, the IncidentTracker judges them. Each window holds
200 parts per site, one judged block; a site's baseline is judged from its third block on.

The fleet scenarios with real agent processes, the synthetic floor's lots and ground truth are in test_fleet.py.
"""
from __future__ import annotations

import doctest
import sqlite3

import numpy as np
import pytest

from edge_agent.collector import baselines, report
from edge_agent.collector.incidents import IncidentConfig, IncidentTracker
from edge_agent.collector.prometheus import FleetState
from edge_agent.collector.store import Store
from edge_agent.daemon.drift import DriftMonitor, DriftReference
from edge_agent.wire.stats import parse_stats

SITES = (1, 2, 3, 4)
PARTS = 200                    # per site and window: one block


class Fleet:
    """Agents sending windows of the drift floor's product into one store and tracker, in step."""

    def __init__(self, floor, path, config: IncidentConfig | None = None):
        self.floor = floor
        self.store = Store(path)
        self.tracker = IncidentTracker(config or IncidentConfig(), self.store)
        self.reference = DriftReference.from_manifest(floor.manifest)
        self.model = {"name": floor.ref.name, "version": floor.ref.version,
                      "checksum": floor.registry.checksum(floor.ref)}
        self.seq: dict[str, int] = {}
        self.clock = 1000.0
        self.events: list[dict] = []

    def window(self, agent: str, *, shift: dict[int, float] | None = None, offsets: dict[int, float] | None = None,
               score_shift: float = 0.0) -> list[dict]:
        """One window of ``agent`` (tester ``tester-<agent>``): ``shift`` and ``offsets`` move the first three tests
        by that many robust sigmas at those sites; ``score_shift`` moves every score by reference sigmas."""
        manifest, floor = self.floor.manifest, self.floor
        monitor = DriftMonitor(self.reference, self.model, window_parts=10 ** 6)
        seq = self.seq[agent] = self.seq.get(agent, 0) + 1
        rng = np.random.default_rng([seq, sum(map(ord, agent))])
        sigma = np.array([limit.robust_sigma for limit in manifest.pat.limits[:3]])
        threshold = manifest.models.outlier.threshold
        for site in SITES:
            moved = (shift or {}).get(site, 0.0) + (offsets or {}).get(site, 0.0)
            for part in rng.integers(len(floor.readings), size=PARTS):
                row = floor.readings[part].copy()
                row[:3] += moved * sigma
                score = float(floor.scores[part]) + score_shift * self.reference.score_scale
                monitor.update(1, site, row, score, score < threshold)
        body = monitor.close("parts").to_payload()
        body["window"].update(start=self.clock, end=self.clock + 1.0)
        message = {"type": "stats", "v": 1, "agent_id": agent, "tester": f"tester-{agent}", "seq": seq, **body,
                   "spool": {"stream": "s", "dropped_total": 0, "dropped_seq_ranges": [], "unspooled_lost": 0}}
        window = parse_stats(message)
        with self.store.transaction():
            added = self.store.add_window(window, self.clock)
            events = self.tracker.for_window(window, added, self.clock)
        self.clock += 1.0
        self.events += events
        return events

    def rounds(self, n: int, agents: tuple[str, ...], **moved) -> None:
        """``n`` windows of every agent in turn; ``moved``: agent -> keyword arguments of ``window``."""
        for _ in range(n):
            for agent in agents:
                self.window(agent, **moved.get(agent, {}))

    def incidents(self) -> list[dict]:
        connection = sqlite3.connect(self.store.path)
        connection.row_factory = sqlite3.Row
        rows = [dict(row) for row in connection.execute("SELECT * FROM incidents ORDER BY id")]
        for row in rows:
            row["tests"] = {t["test"]: dict(t) for t in connection.execute(
                "SELECT * FROM incident_tests WHERE incident_id = ?", (row["id"],))}
        connection.close()
        return rows


@pytest.fixture
def fleet(tmp_path, drift_floor):
    made = []

    def make(config: IncidentConfig | None = None) -> Fleet:
        made.append(Fleet(drift_floor, tmp_path / f"fleet{len(made)}.sqlite", config))
        return made[-1]
    yield make
    for f in made:
        f.store.close()


AGENTS = ("a", "b", "c")


def test_permanent_site_offsets_are_normal_and_raise_no_incident(fleet):
    """Sites off by 0.5 and 0.8 sigma from their siblings from the first part on: their own baselines learn it."""
    f = fleet()
    f.rounds(8, AGENTS, b={"offsets": {2: 0.8, 4: -0.5}})
    assert f.incidents() == [] and f.events == []
    stored = f.store.db.execute("SELECT count(*), min(parts) FROM baselines").fetchone()
    assert stored[0] == len(AGENTS) * len(SITES) and stored[1] >= 1000 * 0.9


def test_one_site_moved_opens_one_site_incident_that_closes_when_the_site_is_back(fleet, drift_floor):
    f = fleet()
    f.rounds(3, AGENTS, b={"offsets": {2: 0.5}})
    f.rounds(3, AGENTS, b={"offsets": {2: 0.5}, "shift": {2: 2.0}})
    (incident,) = f.incidents()
    assert (incident["scope"], incident["diagnosis"], incident["tester"], incident["head"], incident["site"]) == \
        ("site", "site fault", "tester-b", 1, 2)
    assert set(incident["tests"]) == set(drift_floor.columns[:3]) and incident["retrain"] == 0
    for test in incident["tests"].values():
        assert test["psi_peak"] > 10 * test["noise"] and test["n"] == PARTS and test["n_baseline"] >= 400
        assert test["psi_siblings"] < 0.2
    assert "No retrain" in incident["recommendation"] and "probe card" in incident["summary"]
    assert [e["kind"] for e in f.events] == ["incident_opened"]            # opened once, updated quietly
    assert f.events[0]["scope"] == "site" and f.events[0]["tester"] == "tester-b"
    f.rounds(3, AGENTS, b={"offsets": {2: 0.5}})                          # fixed: back at the old baseline
    (incident,) = f.incidents()
    assert incident["status"] == "closed" and "back at its baseline" in incident["closed_because"]
    assert [e["kind"] for e in f.events] == ["incident_opened", "incident_closed"]


def test_a_tester_moved_alone_waits_for_the_fleet_and_opens_a_tester_incident(fleet):
    f = fleet()
    f.rounds(3, AGENTS)
    everywhere = {site: 2.5 for site in SITES}
    f.window("a", shift=everywhere)
    assert f.incidents() == []                       # b and c have not reported this period yet
    f.window("b")
    f.window("c")
    (incident,) = f.incidents()
    assert (incident["scope"], incident["diagnosis"], incident["tester"]) == ("tester", "tester or handler fault",
                                                                             "tester-a")
    assert incident["others_held"] == 2 and incident["retrain"] == 0
    assert all(t["psi_fleet"] > 2.0 and t["psi"] > 2.0 for t in incident["tests"].values())


def test_the_whole_fleet_moved_opens_one_fleet_incident_that_recommends_a_retrain(fleet, drift_floor):
    f = fleet()
    f.rounds(3, AGENTS)
    moved = {"shift": {site: 2.5 for site in SITES}, "score_shift": -1.5}
    f.rounds(2, AGENTS, **{agent: moved for agent in AGENTS})
    (incident,) = f.incidents()
    assert (incident["scope"], incident["diagnosis"], incident["status"]) == ("fleet", "process or material moved",
                                                                              "open")
    assert incident["retrain"] == 1 and incident["recommendation"].startswith(f"Retrain {drift_floor.ref.name}/")
    assert "tester-a, tester-b, tester-c" in incident["summary"] and incident["score_psi"] > 0.25
    assert set(incident["tests"]) == set(drift_floor.columns[:3])


def test_the_first_tester_to_get_moved_material_is_a_tester_incident_until_the_others_move_the_same_way(fleet):
    """New material reaches testers at different times: the first one's tester incident becomes the fleet's."""
    f = fleet()
    f.rounds(3, AGENTS)
    moved = {"shift": {site: 2.5 for site in SITES}, "score_shift": -1.5}
    f.window("a", **moved)
    f.rounds(1, ("b", "c"))
    (early,) = f.incidents()
    assert early["scope"] == "tester" and early["tester"] == "tester-a"
    f.rounds(2, AGENTS, **{agent: moved for agent in AGENTS})
    (incident,) = f.incidents()
    assert (incident["id"], incident["scope"], incident["status"]) == (early["id"], "fleet", "open")
    assert incident["tester"] is None and incident["retrain"] == 1 and "on 3 testers" in incident["summary"]
    assert [e["kind"] for e in f.events][:2] == ["incident_opened", "incident_updated"]
    assert f.events[1]["scope"] == "fleet"


def test_a_fleet_move_that_leaves_the_model_alone_is_no_reason_to_retrain(fleet):
    f = fleet()
    f.rounds(3, AGENTS)
    f.rounds(2, AGENTS, **{agent: {"shift": {site: 2.5 for site in SITES}} for agent in AGENTS})
    (incident,) = f.incidents()
    assert incident["scope"] == "fleet" and incident["retrain"] == 0
    assert incident["recommendation"].startswith("No retrain: the process moved on 3 testers but the model's "
                                                 "outputs did not")


def test_incidents_and_baselines_survive_a_collector_restart(fleet, tmp_path, drift_floor):
    f = fleet()
    f.rounds(3, AGENTS)
    f.rounds(2, AGENTS, b={"shift": {3: 2.0}})
    (before,) = f.incidents()
    restarted = IncidentTracker(IncidentConfig(), f.store)       # a new collector process on the same database
    f.tracker = restarted
    f.rounds(1, AGENTS, b={"shift": {3: 2.0}})
    (after,) = f.incidents()                                    # the same incident, updated, not a second one
    assert after["id"] == before["id"] and after["blocks"] == before["blocks"] + 1


def test_report_leads_with_open_incidents_and_bands_psi_so_0_2_1_and_5_differ(fleet, tmp_path, drift_floor):
    f = fleet()
    f.rounds(3, AGENTS)
    f.rounds(2, AGENTS, b={"shift": {3: 2.0}})
    out = tmp_path / "report.html"
    report.write_report(f.store.path, out)
    page = out.read_text()
    assert page.index("Open incidents (1)") < page.index("Retrain recommendation") < page.index("Agents and")
    assert "<td>site fault</td><td>tester-b h1/s3</td>" in page and "<td>no retrain</td>" in page
    colours = {report.PSI_BANDS[report._band(v)][1] for v in (0.2, 1.0, 5.0)}
    assert len(colours) == 3


def test_the_alert_hook_and_metrics_count_incident_events():
    state = FleetState(60.0)
    for kind in ("incident_opened", "incident_updated", "incident_opened", "incident_closed"):
        state.count({"kind": kind, "scope": "site"})
    state.count({"kind": "psi"})
    metrics = {m.name: {s.labels.get("scope", s.labels.get("kind")): s.value for s in m.samples}
               for m in state.collect()}
    assert metrics["edge_collector_incidents_opened"]["site"] == 2
    assert metrics["edge_collector_incidents_open"]["site"] == 1
    assert metrics["edge_collector_alerts"]["psi"] == 1


def test_the_statistics_examples_run():
    assert doctest.testmod(baselines).failed == 0 and doctest.testmod(report).failed == 0
