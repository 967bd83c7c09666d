"""Fleet scenarios with ground truth, replayed through real agents and a real collector, and the collector's
incidents scored against the truth (`edge-train fleet`).

A fleet is ``testers`` testers running one model of the product, each a synthetic floor of its own
(``trainer.synth``: its own sites with stable site offsets, its own slow drift, its own lots), each an
``edge-agent run`` process shipping drift windows to one ``edge-collector run`` process. Every tester tests
``lots`` lots of ``lot_parts`` parts, in step (a lot starts on every tester when the previous one has ended on
all of them), sent in ``score_batch`` requests in the order the prober tested them. The scenarios, what is
injected and the incident expected:

- ``normal``: nothing (lots differ as lots do); no incident.
- ``drifting_site``: one site of tester 2 drifts on 4 tests late in the second-to-last lot and is fixed for the
  last; one ``site`` incident there, no retrain.
- ``tester_shift``: every site of tester 3 steps by 2 sigma on 4 tests late in the second-to-last lot and is
  fixed for the last; one ``tester`` incident there, no retrain.
- ``process_shift``: the last lot of every tester comes from a moved process; one ``fleet`` incident and a
  retrain recommendation.

Scores per run: the incidents opened, the one matching the truth (scope, tester, head and site) with its
diagnosis and tests, false incidents (any other) per tester-lot, and the detection delay: parts the faulty
scope tested from the first faulty part until the incident opened (parts of that site for a site fault, parts of
that tester otherwise; for a fleet incident, of the tester whose block opened it).
"""
from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from edge_agent.checked import Checked, Interval
from edge_agent.client import AgentClient
from edge_agent.errors import EdgeError
from edge_agent.keys import SIGNING_PUBLIC, SIGNING_SECRET, create_signing_key, load_signing_key
from edge_agent.package.registry import Registry
from edge_agent.processes import free_tcp_endpoint, start_agent, start_collector, stop
from edge_agent.wire.codec import decode_trusted

from .replay import Replay, feature_columns, plan_from_table
from .synth import SynthConfig, excursion_plan, generate, test_catalog
from .table import ParametricTable

SCENARIOS = ("normal", "drifting_site", "tester_shift", "process_shift")
EXPECTED = {"normal": None, "drifting_site": "site", "tester_shift": "tester", "process_shift": "fleet"}
FAULTY_TESTER = {"drifting_site": 1, "tester_shift": 2}        # index in the fleet
BATCH = 100                      # parts per score_batch request
TRAINING_SEED = 7                # the training lots' floor; the testers' floors are other seeds
REPLY_MS = 30_000.0              # generous: a loaded machine slows replies, it must not lose parts


class FleetError(EdgeError):
    """A scenario that could not be run (an agent or the collector did not start, parts got no decision)."""


@dataclass(frozen=True)
class FleetConfig(Checked):
    ERROR = FleetError
    CONSTRAINTS = {"testers": [Interval(int, 2, 64)], "sites": [Interval(int, 2, 16)], "lots": [Interval(int, 2, 100)],
                   "lot_parts": [Interval(int, 400, None)], "tests": [Interval(int, 8, 5000)],
                   "seed": [Interval(int, 0, None)], "window_parts": [Interval(int, 10, None)],
                   "pace": [Interval(float, 0, None)]}

    testers: int = 4
    sites: int = 4
    lots: int = 3
    lot_parts: int = 3000
    tests: int = 200
    seed: int = 100              # tester k's floor is seed + k
    window_parts: int = 400
    # Parts per second per tester; 0: as fast as the agents answer. Unpaced, six testers send the collector
    # about a hundred times the windows a real fleet of that size does, its backlog grows to seconds, and the
    # detection delays in parts count that backlog.
    pace: float = 0.0

    def __post_init__(self) -> None:
        self.check()


@dataclass
class Truth:
    scenario: str
    scope: str | None                      # the incident expected: None, "site", "tester" or "fleet"
    agent_id: str | None = None            # site and tester faults
    head: int | None = None
    site: int | None = None
    tests: list[str] = field(default_factory=list)
    onset: dict[str, int] = field(default_factory=dict)       # agent -> first faulty part in its stream
    site_onset: int | None = None          # site fault: first faulty part among that site's parts


@dataclass
class TesterLots:
    agent_id: str
    tester: str
    lots: list[Replay]                     # in testing order


def agent_name(k: int) -> tuple[str, str]:
    return f"agent-{k + 1}", f"tester-{k + 1}"


def lot_configs(scenario: str, config: FleetConfig, k: int) -> list[SynthConfig]:
    """Tester k's lots: one synthetic floor (seed + k) lot by lot, the scenario's excursion where it belongs."""
    if scenario not in SCENARIOS:
        raise FleetError(f"scenario {scenario!r}: expected one of {SCENARIOS}")
    faulty_lot = config.lots - 2 if scenario in FAULTY_TESTER else config.lots - 1
    configs = []
    for lot in range(config.lots):
        injected = ()
        if scenario == "process_shift" and lot == config.lots - 1:
            injected = ("process_shift",)
        elif scenario in FAULTY_TESTER and FAULTY_TESTER[scenario] == k and lot == faulty_lot:
            injected = (scenario,)
        configs.append(SynthConfig(seed=config.seed + k, parts=config.lot_parts, tests=config.tests, lots=1,
                                   sites=config.sites, first_lot_index=lot + 1, lot_prefix=f"T{k + 1}L",
                                   excursions=injected, start_time=1_704_700_800.0 + lot * 86_400.0))
    return configs


def build_fleet(scenario: str, config: FleetConfig, features: list[str]) -> tuple[list[TesterLots], Truth]:
    """Every tester's lots as the agents will receive them, and the ground truth."""
    truth = Truth(scenario, EXPECTED[scenario])
    fleet = []
    for k in range(config.testers):
        agent_id, tester = agent_name(k)
        replays, streamed = [], 0
        for lot_config in lot_configs(scenario, config, k):
            frame = pd.concat(generate(lot_config), ignore_index=True)
            table = ParametricTable(frame, test_catalog(lot_config), [f"trainer.fleet {scenario}"])
            replays.append(plan_from_table(table, features, frame["lot"].iloc[0]))
            labelled = np.flatnonzero(frame["truth_excursion"].to_numpy(str) != "")
            if labelled.size and agent_id not in truth.onset:
                _record_truth(truth, agent_id, streamed + int(labelled[0]), excursion_plan(lot_config)[0])
            streamed += len(frame)
        fleet.append(TesterLots(agent_id, tester, replays))
    _count_site_onset(truth, fleet)
    return fleet, truth


def _record_truth(truth: Truth, agent_id: str, onset: int, plan: dict) -> None:
    truth.onset[agent_id] = onset
    truth.tests = plan["tests"]
    if truth.scope != "fleet":
        truth.agent_id = agent_id
    if truth.scope == "site":
        truth.head, truth.site = int(plan["head"]), int(plan["site"])


def _count_site_onset(truth: Truth, fleet: list[TesterLots]) -> None:
    """A site fault's onset counted in that site's parts of the tester's whole stream."""
    if truth.scope != "site":
        return
    parts = [p for lots in fleet if lots.agent_id == truth.agent_id for replay in lots.lots for p in replay.parts]
    onset = truth.onset[truth.agent_id]
    truth.site_onset = sum(1 for p in parts[:onset] if p.get("head") == truth.head and p.get("site") == truth.site)


# ---- running a scenario -----------------------------------------------------------------------------------------

# The scenario runs in minutes, not days: testers count as silent, and tester-wide movements stop waiting for the
# rest of the fleet, within seconds. The hook appends what would have paged someone to paged.jsonl.
COLLECTOR_TOML = """[alerts]
silent_after_s = 120.0
hook = "/bin/sh -c 'cat >> \\"$0\\"; echo >> \\"$0\\"' {paged}"

[incidents]
fleet_wait_s = 20.0
fleet_period_s = 600.0
"""


def run_scenario(scenario: str, config: FleetConfig, registry_root: str | Path, model: str, workdir: str | Path,
                 trusted_key: Path) -> tuple[Path, Truth, list[TesterLots]]:
    """Stream the scenario through real agents (trusting ``trusted_key``, the model's signer) into a real
    collector; the collector's database and the truth."""
    work = Path(workdir) / scenario
    work.mkdir(parents=True, exist_ok=True)
    fleet, truth = build_fleet(scenario, config, feature_columns(str(registry_root), model))
    db = work / "fleet.sqlite"
    db.unlink(missing_ok=True)
    collector_toml = work / "collector.toml"
    collector_toml.write_text(COLLECTOR_TOML.format(paged=work / "paged.jsonl"))
    (work / "paged.jsonl").unlink(missing_ok=True)
    collector_endpoint = free_tcp_endpoint()
    collector = start_collector(db, collector_endpoint, "--config", str(collector_toml),
                                log_path=work / "collector.log")
    agents = []
    try:
        endpoints = [free_tcp_endpoint() for _ in fleet]
        with ThreadPoolExecutor(len(fleet)) as pool:
            agents = list(pool.map(lambda item: _start_agent(work, registry_root, model, collector_endpoint,
                                                             trusted_key, config, *item), zip(fleet, endpoints)))
        try:
            _stream_in_step(fleet, endpoints, config.pace)
            # Every full window stored before the agents stop: a stopping agent leaves what is not acknowledged
            # within a few seconds in its spool, for its next start.
            _wait_for_windows(db, {t.agent_id: sum(map(len, t.lots)) // config.window_parts * config.window_parts
                                   for t in fleet})
        finally:
            for agent in agents:
                stop(agent)
    finally:
        stop(collector)
    return db, truth, fleet


def _start_agent(work: Path, registry_root, model: str, collector: str, trusted_key: Path, config: FleetConfig,
                 tester: TesterLots, endpoint: str):
    toml = work / f"{tester.agent_id}.toml"
    toml.write_text(f'[drift]\nagent_id = "{tester.agent_id}"\ntester = "{tester.tester}"\ncollector = "{collector}"\n'
                    f'window_parts = {config.window_parts}\nwindow_seconds = 3600.0\n'
                    f'spool_dir = "{work / (tester.agent_id + "-spool")}"\n'
                    f'[security]\ntrusted_keys = "{trusted_key}"\n')
    return start_agent(registry_root, model, endpoint, "--config", str(toml), log_path=work / f"{tester.agent_id}.log")


def _stream_in_step(fleet: list[TesterLots], endpoints: list[str], pace: float) -> None:
    """Each tester on its own thread; lot n starts everywhere once lot n - 1 has ended everywhere; at most
    ``pace`` parts per second per tester (0: no limit)."""
    barrier = threading.Barrier(len(fleet))
    failures: list[str] = []

    def test(tester: TesterLots, endpoint: str) -> None:
        with AgentClient(endpoint, timeout_ms=REPLY_MS) as client:
            for replay in tester.lots:
                barrier.wait()
                began = time.monotonic()
                for start in range(0, len(replay), BATCH):
                    if pace:
                        time.sleep(max(0.0, began + start / pace - time.monotonic()))
                    results = client.score_batch(list(zip(replay.parts[start:start + BATCH],
                                                          replay.readings[start:start + BATCH])))
                    undecided = [r.error_message for r in results if not r.decided]
                    if undecided:
                        failures.append(f"{tester.tester}: {len(undecided)} part(s) got no decision: {undecided[0]}")
                        barrier.abort()
                        return

    threads = [threading.Thread(target=test, args=pair) for pair in zip(fleet, endpoints)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise FleetError("; ".join(failures))


def _wait_for_windows(db: Path, parts: dict[str, int], timeout_s: float = 300.0) -> None:
    """Until the windows stored hold at least ``parts[agent]`` parts of every agent."""
    deadline = time.monotonic() + timeout_s
    while True:
        with sqlite3.connect(db) as connection:
            stored = dict(connection.execute("SELECT agent_id, sum(parts) FROM windows GROUP BY agent_id").fetchall())
        short = {agent: (stored.get(agent) or 0, wanted) for agent, wanted in parts.items()
                 if (stored.get(agent) or 0) < wanted}
        if not short:
            return
        if time.monotonic() > deadline:
            raise FleetError(f"{db}: windows missing after {timeout_s:.0f} s (agent: stored, streamed parts): {short}")
        time.sleep(0.2)


# ---- scoring ----------------------------------------------------------------------------------------------------

@dataclass
class Score:
    scenario: str
    run: int
    tester_lots: int
    incidents: list[dict]
    truth: Truth
    matched: dict | None
    false_incidents: int
    tests_found: int
    retrain: bool
    delay_parts: int | None

    @property
    def passed(self) -> bool:
        expected_retrain = self.truth.scope == "fleet"
        if self.truth.scope is None:
            return not self.incidents and not self.retrain
        return (self.matched is not None and self.false_incidents == 0 and self.retrain == expected_retrain
                and self.tests_found >= min(3, len(self.truth.tests)))

    def row(self) -> list[str]:
        found = ", ".join(sorted(f"{i['scope']}: {i['diagnosis']}" for i in self.incidents)) or "none"
        where = "-" if self.truth.scope is None else _where(self.truth.scope, self.truth.agent_id, self.truth.head,
                                                             self.truth.site)
        return [self.scenario, str(self.run), str(len(self.incidents)), found, where,
                "-" if self.truth.scope is None else ("yes" if self.matched else "NO"),
                f"{self.tests_found}/{len(self.truth.tests)}" if self.truth.tests else "-",
                "yes" if self.retrain else "no", f"{self.false_incidents / self.tester_lots:.3f}",
                "-" if self.delay_parts is None else str(self.delay_parts), "pass" if self.passed else "FAIL"]


HEADER = ["scenario", "run", "incidents", "scope: diagnosis", "truth", "found", "tests", "retrain",
          "false/lot", "delay (parts)", "verdict"]


def _where(scope: str, agent_id: str | None, head, site) -> str:
    return {"site": f"site {agent_id} h{head}/s{site}", "tester": f"tester {agent_id}", "fleet": "fleet"}[scope]


def score_run(db: Path, truth: Truth, fleet: list[TesterLots], run: int = 1) -> Score:
    with sqlite3.connect(db) as connection:
        connection.row_factory = sqlite3.Row
        incidents = [dict(row) for row in connection.execute("SELECT * FROM incidents ORDER BY id")]
        for incident in incidents:
            incident["tests"] = [r[0] for r in connection.execute(
                "SELECT test FROM incident_tests WHERE incident_id = ?", (incident["id"],))]
            incident["members"] = [a for a, _, _ in decode_trusted(incident["members"])]
        candidates = [i for i in incidents if _matches(i, truth)]      # the one naming most of the truth's tests
        matched = max(candidates, key=lambda i: (len(set(i["tests"]) & set(truth.tests)), -i["id"]), default=None)
        delay = None if matched is None else _delay(connection, matched, truth)
    lots = sum(len(t.lots) for t in fleet)
    found = len(set(matched["tests"]) & set(truth.tests)) if matched else 0
    return Score(truth.scenario, run, lots, incidents, truth, matched, len(incidents) - (matched is not None), found,
                 any(i["retrain"] for i in incidents), delay)


def _matches(incident: dict, truth: Truth) -> bool:
    if incident["scope"] != truth.scope:
        return False
    if truth.scope == "site":
        return (incident["agent_id"], incident["head"], incident["site"]) == (truth.agent_id, truth.head, truth.site)
    return truth.scope == "fleet" or incident["agent_id"] == truth.agent_id


def _delay(connection: sqlite3.Connection, incident: dict, truth: Truth) -> int:
    """Parts the faulty scope tested from its first faulty part until the window the incident opened with."""
    agent_id = connection.execute("SELECT agent_id FROM windows WHERE id = ?",
                                  (incident["opened_window_id"],)).fetchone()[0]
    if truth.scope == "site":
        tested = connection.execute(
            "SELECT coalesce(sum(s.parts), 0) FROM windows w JOIN site_windows s ON s.window_id = w.id "
            "WHERE w.agent_id = ? AND w.id <= ? AND s.head = ? AND s.site = ?",
            (agent_id, incident["opened_window_id"], truth.head, truth.site)).fetchone()[0]
        return int(tested) - truth.site_onset
    tested = connection.execute("SELECT coalesce(sum(parts), 0) FROM windows WHERE agent_id = ? AND id <= ?",
                                (agent_id, incident["opened_window_id"])).fetchone()[0]
    return int(tested) - truth.onset[agent_id]


# ---- the whole evaluation -----------------------------------------------------------------------------------------

def train_fleet_model(config: FleetConfig, registry_root: str | Path, name: str, signing_key: Path, *,
                      training_parts: int = 9000, n_trees: int = 100, progress=print) -> str:
    """Train the product's model on three lots of another floor, publish it signed by ``signing_key`` and promote
    it to production."""
    from .ingest import load_tables
    from .package import build_and_publish
    from .synth import write
    from .train import TrainConfig, fit

    registry = Registry(registry_root)
    lots = Path(registry_root).parent / f"{name}-training.parquet"
    write(SynthConfig(seed=TRAINING_SEED, parts=training_parts, tests=config.tests, lots=3, sites=config.sites,
                      excursions=()), lots)
    table, report = load_tables([str(lots)])
    trained = fit(table, TrainConfig(name=name, n_trees=n_trees, yield_trees=30, seed=TRAINING_SEED),
                  progress=lambda message: None)
    ref = build_and_publish(trained, table, report.to_dict(), registry, [str(lots)],
                            signer=load_signing_key(signing_key))
    registry.promote(ref.name, ref.version, "production", reason="trainer.fleet evaluation")
    progress(f"model {ref.name}/{ref.version}: trained on 3 lots, {training_parts:,} parts x {config.tests} tests")
    return ref.name


def evaluate(config: FleetConfig, workdir: str | Path, *, scenarios: tuple[str, ...] = SCENARIOS, repeats: int = 1,
             progress=print) -> list[Score]:
    """Train once, then run every scenario ``repeats`` times (run r uses tester floors seed + 100 r + k)."""
    work = Path(workdir)
    # The evaluation's own trainer key (kept in the workdir for a rerun): its agents serve signed packages, as
    # deployed ones do.
    signing_key, trusted_key = (work / "keys" / f"fleet-trainer{suffix}" for suffix in (SIGNING_SECRET, SIGNING_PUBLIC))
    if not signing_key.exists():
        create_signing_key(work / "keys", "fleet-trainer")
    name = train_fleet_model(config, work / "models", "fleet", signing_key, progress=progress)
    scores = []
    for run in range(1, repeats + 1):
        run_config = FleetConfig(**{**config.__dict__, "seed": config.seed + 100 * (run - 1)})
        for scenario in scenarios:
            started = time.perf_counter()
            db, truth, fleet = run_scenario(scenario, run_config, work / "models", name, work / f"run{run}",
                                            trusted_key)
            scores.append(score_run(db, truth, fleet, run))
            progress(f"{scenario} run {run}: {len(scores[-1].incidents)} incident(s), "
                     f"{time.perf_counter() - started:.0f} s ({db})")
    return scores


def table(scores: list[Score]) -> str:
    """The per-run table and, per scenario, false incidents per tester-lot and the median detection delay."""
    rows = [HEADER] + [s.row() for s in scores]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    lines.append("")
    for scenario in dict.fromkeys(s.scenario for s in scores):
        mine = [s for s in scores if s.scenario == scenario]
        delays = [s.delay_parts for s in mine if s.delay_parts is not None]
        lines.append(f"{scenario}: {sum(s.passed for s in mine)}/{len(mine)} runs pass; false incidents "
                     f"{sum(s.false_incidents for s in mine)} in {sum(s.tester_lots for s in mine)} tester-lots "
                     f"({sum(s.false_incidents for s in mine) / sum(s.tester_lots for s in mine):.3f} per lot)"
                     + (f"; detection delay median {int(np.median(delays))} parts (min {min(delays)}, max "
                        f"{max(delays)})" if delays else ""))
    return "\n".join(lines)
