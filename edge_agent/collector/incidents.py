"""Incidents: drift folded into one record with a scope, a diagnosis and what to do, opened once, updated, closed
when its scope is back at its baseline.

Each tester's blocks are judged against each site's own baseline (``baselines.py``); what moved becomes an
incident of one of three scopes, each with its diagnosis (``diagnosis.DIAGNOSES``) and what to do:

- ``site``: one (head, site) of one tester moved, its sibling sites held: "site fault"; check contacts, probe
  card and site calibration;
- ``tester``: most sites of one tester moved, the other testers of the model held in the same period: "tester
  or handler fault"; check the tester and handler;
- ``fleet``: the same tests moved on at least two testers and on at least half of those that reported in the
  period: "process or material moved"; retrain if the model's outputs moved too.

A tester-wide movement waits (at most ``fleet_wait_s``) for every tester of the model that reported within
``fleet_period_s`` to move the same way or to send a whole block, begun after the moved one began, that did not
move: the first tester to see a process change cannot tell it from its own fault. It is a fleet incident as soon
as half of those testers moved, whatever the rest will say. Material reaches testers at different times: when
the others move later, the first one's tester incident becomes the fleet incident (one incident per process
change and model). An incident takes new tests and testers as they move, keeps per test the latest and the
largest PSI with its noise level and sample sizes, and closes after ``close_after_blocks`` blocks of its scope
judged back at the baseline from before it opened (baselines in an incident do not learn).

Retrain is recommended by a fleet incident only, and only when the model's outputs moved with the process: the
outlier-score histogram of the moved blocks against the same testers' baselines above ``score_psi`` and above
what sampling gives, or the outlier rate up by ``outlier_margin`` with z > 4. A site or tester fault never
recommends it: the model would learn the fault. Every incident carries one sentence saying which, with the
numbers to check it.

Example ``collector.toml`` table (every key optional; these are the defaults)::

    [incidents]
    block_parts = 200          # parts per site in a judged block (a tester's windows are summed up to it)
    baseline_parts = 1000      # readings per test a site's baseline keeps (older ones fade)
    baseline_min_parts = 400   # a site is judged once its baseline holds this many
    site_psi = 0.8             # a site against its own baseline, and against it moved as its siblings moved
    tester_psi = 2.0           # most sites of a tester against their own baselines (above lot-to-lot changes)
    false_alarm = 1e-6         # chance per test and site that sampling alone passes the significance threshold
    fleet_wait_s = 1800.0      # a tester-wide movement waits this long at most for the other testers' data
    fleet_period_s = 3600.0    # testers heard from within this long are expected to report
    close_after_blocks = 2     # blocks back at baseline before an incident closes
    score_psi = 0.25           # retrain: the model's score histogram moved this much (and above its noise) ...
    outlier_margin = 0.01      # ... or its outlier rate rose by this much (z > 4)
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..checked import Checked, Interval
from ..wire.codec import decode_trusted, encode
from ..wire.stats import StatsWindow
from .baselines import Block, ModelBins, SiteCounts, Verdict, judge
from .diagnosis import DIAGNOSES, FLEET, SITE, TESTER, Evidence, describe, event, site_evidence, tester_evidence
from .store import Added, Store

log = logging.getLogger("edge_agent.collector.incidents")

HISTORY = 32                   # judged blocks kept per agent for the fleet comparison


@dataclass
class IncidentConfig(Checked):
    SCOPE = "incidents"
    CONSTRAINTS = {"block_parts": [Interval(int, 20, None)],
                   "baseline_parts": [Interval(int, 20, None)],
                   "baseline_min_parts": [Interval(int, 20, None)],
                   "site_psi": [Interval(float, 0, None, closed="neither")],
                   "tester_psi": [Interval(float, 0, None, closed="neither")],
                   "false_alarm": [Interval(float, 0, 0.5, closed="neither")],
                   "fleet_wait_s": [Interval(float, 0, None)],
                   "fleet_period_s": [Interval(float, 0, None)],
                   "close_after_blocks": [Interval(int, 1, None)],
                   "score_psi": [Interval(float, 0, None, closed="neither")],
                   "outlier_margin": [Interval(float, 0, 1)]}

    block_parts: int = 200
    baseline_parts: int = 1000
    baseline_min_parts: int = 400
    site_psi: float = 0.8
    tester_psi: float = 2.0
    false_alarm: float = 1e-6
    fleet_wait_s: float = 1800.0
    fleet_period_s: float = 3600.0
    close_after_blocks: int = 2
    score_psi: float = 0.25
    outlier_margin: float = 0.01


# ---- an incident ---------------------------------------------------------------------------------------------

@dataclass
class Incident:
    scope: str
    checksum: str
    model: str
    agent_id: str | None           # site and tester scope
    tester: str | None
    head: int | None               # site scope
    site: int | None
    members: dict[str, list]       # agent_id -> [tester, blocks back at baseline in a row]
    start: float                   # data time: first moved block's start, latest moved block's end
    end: float
    opened_at: float
    opened_window_id: int
    tests: dict[str, Evidence] = field(default_factory=dict)
    id: int | None = None
    updated_at: float = 0.0
    last_window_id: int | None = None
    closed_at: float | None = None
    closed_because: str | None = None
    blocks: int = 0
    parts: int = 0
    others: int | None = None      # tester scope: other testers of the model that held in the same period
    retrain: bool = False
    recommendation: str = ""
    summary: str = ""
    score_psi: float | None = None
    score_noise: float | None = None
    outlier_rate: float | None = None
    baseline_outlier_rate: float | None = None
    moved_outputs: SiteCounts | None = None     # in memory: the moved blocks' score histograms (fleet)

    @property
    def diagnosis(self) -> str:
        return DIAGNOSES[self.scope]

    def testers(self) -> list[str]:
        return sorted(tester for tester, _ in self.members.values())

    def to_row(self) -> dict:
        return {"id": self.id, "model_checksum": self.checksum, "model": self.model, "scope": self.scope,
                "diagnosis": self.diagnosis, "status": "open" if self.closed_at is None else "closed",
                "agent_id": self.agent_id, "tester": self.tester, "head": self.head, "site": self.site,
                "members": encode([[a, t, q] for a, (t, q) in sorted(self.members.items())]),
                "start": self.start, "end": self.end, "opened_at": self.opened_at, "updated_at": self.updated_at,
                "closed_at": self.closed_at, "closed_because": self.closed_because,
                "opened_window_id": self.opened_window_id, "last_window_id": self.last_window_id,
                "blocks": self.blocks, "parts": self.parts, "others_held": self.others,
                "retrain": int(self.retrain),
                "recommendation": self.recommendation, "score_psi": self.score_psi, "score_noise": self.score_noise,
                "outlier_rate": self.outlier_rate, "baseline_outlier_rate": self.baseline_outlier_rate,
                "summary": self.summary}

    @classmethod
    def from_rows(cls, row, tests) -> Incident:
        incident = cls(row["scope"], row["model_checksum"], row["model"], row["agent_id"], row["tester"], row["head"],
                       row["site"], {a: [t, q] for a, t, q in decode_trusted(row["members"])}, row["start"],
                       row["end"], row["opened_at"], row["opened_window_id"])
        for name in ("id", "updated_at", "last_window_id", "blocks", "parts", "recommendation", "summary",
                     "score_psi", "score_noise", "outlier_rate", "baseline_outlier_rate"):
            setattr(incident, name, row[name])
        incident.retrain, incident.others = bool(row["retrain"]), row["others_held"]
        for t in tests:
            incident.tests[t["test"]] = Evidence(*(_nan(t[k]) for k in Evidence.__dataclass_fields__))
        return incident


def _nan(value):
    return float("nan") if value is None else value


# ---- the tracker ---------------------------------------------------------------------------------------------

@dataclass(eq=False)
class _Judged:
    """One judged block of an agent, kept for the fleet comparison."""

    start: float
    end: float
    moved: set[int]              # tests on which most sites moved
    verdict: Verdict
    pooled: SiteCounts           # all sites summed


@dataclass(eq=False)
class _Agent:
    """One agent running one model."""

    agent_id: str
    tester: str
    model: ModelBins
    block: Block | None = None
    judged: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    latest_window_id: int = 0


@dataclass(eq=False)
class _Pending:
    """A tester-wide movement waiting for the other testers' data of the same period."""

    agent: _Agent
    tests: set[int]
    start: float                 # data time: the start of the first block that moved (the change began in it)
    since: float                 # collector time it started waiting


class IncidentTracker:
    """Turns stored windows into incidents; rows go to the store inside the caller's transaction.

    Baselines and incidents are stored (they survive a restart); open blocks, the fleet history and waiting
    tester-wide movements live in memory (a restart starts them again)."""

    def __init__(self, config: IncidentConfig, store: Store):
        self.config = config
        self.store = store
        self._agents: dict[tuple[str, str], _Agent] = {}
        self._models: dict[str, ModelBins] = {}
        self.reload()

    def reload(self) -> None:
        """State from the store (at start, and after a failed transaction: its windows come again)."""
        self._baselines = {key: SiteCounts(*value) for key, value in self.store.baselines().items()}
        self._open = {incident.id: incident for incident in
                      (Incident.from_rows(row, tests) for row, tests in self.store.open_incidents())}
        self._pending: list[_Pending] = []
        for agent in self._agents.values():
            agent.block = None

    def open_incidents(self) -> list[Incident]:
        return list(self._open.values())

    # ---- input -----------------------------------------------------------------------------------------------

    def for_window(self, window: StatsWindow, added: Added, now: float) -> list[dict]:
        """Judge the agent's block when this window completes it; the incident events (opened, updated, closed)."""
        m = window.message
        if m["model"]["checksum"] not in self._models:
            self._models[m["model"]["checksum"]] = ModelBins.from_message(m)
        model = self._models[m["model"]["checksum"]]
        events = []
        previous = added.previous
        if previous is not None and previous["model_checksum"] != model.checksum:
            events += self._model_replaced(m["agent_id"], previous["model_checksum"], model.label, now)
        agent = self._agents.setdefault((m["agent_id"], model.checksum), _Agent(m["agent_id"], m["tester"], model))
        agent.tester, agent.latest_window_id = m["tester"], added.window_id
        if not m["sites"]:
            return events
        block = agent.block or Block(m["window"]["start"], m["window"]["end"])
        for site in m["sites"]:
            block.sites.setdefault((site["head"], site["site"]), SiteCounts.empty(model)).add(site)
        block.end = m["window"]["end"]
        agent.block = None if block.full(self.config.block_parts) else block
        if agent.block is None:
            baselines = {s: self._baselines.get((agent.agent_id, model.checksum, *s)) for s in block.sites}
            verdict = judge(block, baselines, model, self.config)
            events += self._judge_sites(agent, verdict, now)
            events += self._judge_tester(agent, verdict, now)
            agent.judged.append(_Judged(block.start, block.end, set(np.flatnonzero(verdict.tester_moved).tolist()),
                                        verdict, block.pooled()))
            self._learn(agent, verdict, now)
        return events + self.tick(now)

    def tick(self, now: float) -> list[dict]:
        """Decide the tester-wide movements whose fleet comparison is complete or whose wait ran out."""
        events = []
        for pending in list(self._pending):
            if pending in self._pending:         # a decision before may have settled it
                events += self._decide(pending, now)
        return events

    # ---- sites -----------------------------------------------------------------------------------------------

    def _judge_sites(self, agent: _Agent, verdict: Verdict, now: float) -> list[dict]:
        events = []
        model = agent.model
        for row, (head, site) in enumerate(verdict.sites):
            incident = self._find(SITE, model.checksum, agent.agent_id, head, site)
            moved = np.flatnonzero(verdict.site_moved[row])
            if moved.size:
                evidence = {model.columns[t]: site_evidence(verdict, row, t) for t in moved}
                if incident is None:
                    incident = self._new(SITE, agent, verdict, now, head=head, site=site)
                events += self._moved(incident, agent, evidence, verdict, now)
            elif incident is not None:
                judged = self._indices(incident, model)
                if not np.isnan(verdict.psi[row, judged]).all():
                    events += self._quiet(incident, agent, verdict, now)
        return events

    # ---- testers and the fleet -------------------------------------------------------------------------------

    def _judge_tester(self, agent: _Agent, verdict: Verdict, now: float) -> list[dict]:
        events = []
        model = agent.model
        moved = set(np.flatnonzero(verdict.tester_moved).tolist())
        judged = ~np.isnan(verdict.tester_psi)
        for incident in [i for i in self._open.values() if i.checksum == model.checksum and i.scope != SITE]:
            tests = set(self._indices(incident, model))
            member = agent.agent_id in incident.members
            if moved & tests and (member or incident.scope == FLEET):
                # The same tester moving on (its own incident, or a further tester of a process change): the tests
                # that moved with the incident's belong to it.
                events += self._moved(incident, agent, tester_evidence(model, verdict, moved), verdict, now)
                moved = set()
            elif member and judged[list(tests)].any():
                events += self._quiet(incident, agent, verdict, now)
        if moved:
            waiting = next((p for p in self._pending if p.agent is agent), None)
            if waiting is None:
                self._pending.append(_Pending(agent, moved, verdict.block.start, now))
            else:
                waiting.tests |= moved
        return events

    def _decide(self, pending: _Pending, now: float) -> list[dict]:
        agent, c = pending.agent, self.config
        for incident in self._open.values():       # another tester already showed it is the process
            tests = set(self._indices(incident, agent.model))
            if incident.scope == FLEET and incident.checksum == agent.model.checksum and pending.tests & tests:
                self._pending.remove(pending)
                latest = agent.judged[-1].verdict
                return self._moved(incident, agent, tester_evidence(agent.model, latest, pending.tests), latest, now)
        others = [a for a in self._agents.values() if a is not agent and a.model.checksum == agent.model.checksum
                  and a.judged and a.judged[-1].end >= pending.start - c.fleet_period_s]
        # A tester moved with this one if a block of it overlapping or after this one's first moved block moved on
        # the test; it held once a whole block of it began after that block began (one that began before may hold
        # few of the changed parts).
        since = {a.agent_id: [j for j in a.judged if j.end > pending.start] for a in others}
        movers = {t: [agent] + [a for a in others if any(t in j.moved for j in since[a.agent_id])]
                  for t in pending.tests}
        reported = [a for a in others if any(j.start >= pending.start for j in a.judged)
                    or any(j.moved & pending.tests for j in since[a.agent_id])]

        def fleet_wide(testers: int) -> set[int]:
            return {t for t, who in movers.items() if len(who) >= 2 and 2 * len(who) >= testers}
        if len(reported) < len(others) and now - pending.since < c.fleet_wait_s:
            # Still waiting for some testers; what already moved on most of the fleet cannot become a tester fault.
            fleet = fleet_wide(1 + len(others))
            if not fleet:
                return []
            self._pending.append(_Pending(agent, pending.tests - fleet, pending.start, pending.since))
            pending.tests = fleet
        else:
            fleet = fleet_wide(1 + len(reported))
        self._pending.remove(pending)
        self._pending = [p for p in self._pending if p.tests]
        latest = agent.judged[-1].verdict
        events = []
        if fleet:
            members = {a.agent_id: a for t in fleet for a in movers[t]}
            incident, events = self._fleet_incident(agent, fleet, latest, now)
            opened = incident.id is None
            for member in [m for m in members.values() if m.agent_id not in incident.members]:
                blocks = ([j for j in agent.judged if j.start >= pending.start] if member is agent
                          else since[member.agent_id])
                for judged in [j for j in blocks if j.moved & fleet]:
                    self._moved(incident, member, tester_evidence(member.model, judged.verdict, judged.moved & fleet),
                                judged.verdict, now, announce=False)
            for other in [p for p in self._pending if p.agent.agent_id in members]:
                other.tests -= fleet            # their movement is this incident's
                if not other.tests:
                    self._pending.remove(other)
            events.append(event(incident, "opened" if opened else "updated", now))
        rest = pending.tests - fleet
        if rest:
            held = [j for a in reported for j in since[a.agent_id] if not j.moved & rest]
            incident = self._find(TESTER, agent.model.checksum, agent.agent_id) or self._new(TESTER, agent, latest,
                                                                                             now)
            incident.others = len(reported)
            evidence = tester_evidence(agent.model, latest, rest, [j.pooled for j in held])
            events += self._moved(incident, agent, evidence, latest, now)
        return events

    def _fleet_incident(self, agent: _Agent, tests: set[int], verdict: Verdict, now: float) -> tuple[Incident,
                                                                                                   list[dict]]:
        """The model's open fleet incident; else the tester incident on these tests of the first tester that saw
        the change (material reaches testers at different times), now known to be the process's; else a new one.
        One process change per model at a time: a further tester incident on its tests merges into it."""
        model = agent.model
        incident = next((i for i in self._open.values() if i.scope == FLEET and i.checksum == model.checksum), None)
        events = []
        for early in [i for i in self._open.values() if i.scope == TESTER and i.checksum == model.checksum
                      and set(self._indices(i, model)) & tests]:
            if incident is None:
                early.scope, early.agent_id, early.tester, early.others = FLEET, None, None, None
                incident = early
            else:
                events += self._close(early, f"merged into incident #{incident.id}: the other testers moved too", now)
        return incident or self._new(FLEET, agent, verdict, now), events

    # ---- incident life -----------------------------------------------------------------------------------------

    def _new(self, scope: str, agent: _Agent, verdict: Verdict, now: float, *, head: int | None = None,
             site: int | None = None) -> Incident:
        local = scope != FLEET
        return Incident(scope, agent.model.checksum, agent.model.label, agent.agent_id if local else None,
                        agent.tester if local else None, head, site, {}, verdict.block.start, verdict.block.end, now,
                        agent.latest_window_id)

    def _moved(self, incident: Incident, agent: _Agent, evidence: dict[str, Evidence], verdict: Verdict, now: float,
               *, announce: bool = True) -> list[dict]:
        """The incident's scope moved again (or for the first time) in this block."""
        opened = incident.id is None
        before = (set(incident.tests), set(incident.members), incident.retrain)
        for name, new in evidence.items():
            if name in incident.tests:
                incident.tests[name].update(new)
            else:
                incident.tests[name] = new
        incident.members.setdefault(agent.agent_id, [agent.tester, 0])[1] = 0
        incident.start, incident.end = min(incident.start, verdict.block.start), max(incident.end, verdict.block.end)
        incident.blocks += 1
        incident.parts += int(verdict.block.parts)
        incident.last_window_id = agent.latest_window_id
        if incident.scope == FLEET:
            pooled = verdict.block.pooled()
            if incident.moved_outputs is None:
                incident.moved_outputs = pooled
            else:
                incident.moved_outputs.score_counts += pooled.score_counts
                incident.moved_outputs.parts += pooled.parts
                incident.moved_outputs.outliers += pooled.outliers
        describe(incident, agent.model, self._baselines, self.config)
        self._save(incident, now)
        if opened:
            return [event(incident, "opened", now)] if announce else []
        changed = before != (set(incident.tests), set(incident.members), incident.retrain)
        return [event(incident, "updated", now)] if changed and announce else []

    def _quiet(self, incident: Incident, agent: _Agent, verdict: Verdict, now: float) -> list[dict]:
        """A block of the incident's scope judged back at its baseline."""
        member = incident.members.setdefault(agent.agent_id, [agent.tester, 0])
        member[1] += 1
        if all(quiet >= self.config.close_after_blocks for _, quiet in incident.members.values()):
            return self._close(incident, f"back at its baseline for {self.config.close_after_blocks} block(s)", now)
        self._save(incident, now)
        return []

    def _close(self, incident: Incident, because: str, now: float) -> list[dict]:
        incident.closed_at, incident.closed_because = now, because
        self._save(incident, now)
        del self._open[incident.id]
        return [event(incident, "closed", now)]

    def _model_replaced(self, agent_id: str, old: str, new_label: str, now: float) -> list[dict]:
        """An agent serves another model: its incidents under the old one can never be judged again."""
        self._pending = [p for p in self._pending if p.agent.agent_id != agent_id or p.agent.model.checksum != old]
        events = []
        for incident in [i for i in self._open.values() if i.checksum == old and agent_id in i.members]:
            if incident.scope == FLEET and len(incident.members) > 1:
                del incident.members[agent_id]
                self._save(incident, now)
            else:
                events += self._close(incident, f"agent {agent_id} now serves {new_label}", now)
        return events

    def _find(self, scope: str, checksum: str, agent_id: str, head: int | None = None,
              site: int | None = None) -> Incident | None:
        return next((i for i in self._open.values() if i.scope == scope and i.checksum == checksum
                     and i.agent_id == agent_id and i.head == head and i.site == site), None)

    def _save(self, incident: Incident, now: float) -> None:
        incident.updated_at = now
        incident.id = self.store.save_incident(incident.to_row())
        for name, evidence in incident.tests.items():
            self.store.save_incident_test(incident.id, name, evidence.__dict__)
        if incident.closed_at is None:
            self._open[incident.id] = incident

    # ---- baselines -------------------------------------------------------------------------------------------

    def _learn(self, agent: _Agent, verdict: Verdict, now: float) -> None:
        """Each site learns its block but for the tests that moved there or across the tester, or that an open
        incident or a waiting tester-wide movement holds (a site still warming up learns everything)."""
        model = agent.model
        held = verdict.tester_moved.copy()
        for pending in (p for p in self._pending if p.agent is agent):
            held[list(pending.tests)] = True
        for incident in self._open.values():
            if incident.checksum == model.checksum and incident.scope != SITE and agent.agent_id in incident.members:
                held[self._indices(incident, model)] = True
        for row, (head, site) in enumerate(verdict.sites):
            key = (agent.agent_id, model.checksum, head, site)
            baseline = self._baselines.get(key)
            frozen = held | verdict.site_moved[row]
            incident = self._find(SITE, model.checksum, agent.agent_id, head, site)
            if incident is not None:
                frozen[self._indices(incident, model)] = True
            if baseline is None or baseline.parts < self.config.baseline_min_parts:
                baseline = baseline or SiteCounts.empty(model)
                frozen[:] = False
            baseline.learn(verdict.block.sites[(head, site)], self.config.baseline_parts, frozen)
            self._baselines[key] = baseline
            judged = [None if np.isnan(v) else float(v) for v in verdict.psi[row]]
            self.store.save_baseline(key, baseline.counts, baseline.score_counts, baseline.parts, baseline.outliers,
                                     now, judged, verdict.block.end)

    @staticmethod
    def _indices(incident: Incident, model: ModelBins) -> list[int]:
        return [model.columns.index(name) for name in incident.tests if name in model.columns]
