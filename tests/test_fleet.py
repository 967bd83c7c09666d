"""The collector's incidents scored against ground truth, with real processes: `edge-train fleet` trains a model,
then per scenario starts one `edge-collector run` and four `edge-agent run` processes (4 sites each, their own
synthetic floors) and streams 3 lots of 3,000 parts per tester through them (trainer/fleet.py): about 45 s.

Then the README's demo (smaller), whose report is opened in headless Chromium (tests/browser.py): about 20 s.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import sqlite3
from pathlib import Path

import pytest
from browser import render

from edge_agent.wire.codec import decode_trusted
from trainer.cli import main as edge_train
from trainer.fleet import FAULTY_TESTER, SCENARIOS, FleetConfig, agent_name, lot_configs
from trainer.synth import excursion_plan

CONFIG = FleetConfig()          # the command's defaults: 4 testers x 4 sites, 3 lots of 3,000 parts, 200 tests


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("fleet")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = edge_train(["fleet", "--workdir", str(work)])
    return {"status": status, "printed": printed.getvalue(), "work": work}


def _incidents(evaluated: dict, scenario: str) -> list[dict]:
    with sqlite3.connect(evaluated["work"] / "run1" / scenario / "fleet.sqlite") as connection:
        connection.row_factory = sqlite3.Row
        rows = [dict(row) for row in connection.execute("SELECT * FROM incidents ORDER BY id")]
        for row in rows:
            row["tests"] = [t[0] for t in connection.execute("SELECT test FROM incident_tests WHERE incident_id = ?",
                                                             (row["id"],))]
            row["testers"] = sorted(tester for _, tester, _ in decode_trusted(row["members"]))
    return rows


def _paged(evaluated: dict, scenario: str) -> list[dict]:
    log = evaluated["work"] / "run1" / scenario / "paged.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


def _truth(scenario: str) -> dict:
    """The injected excursion, as the synthetic floor plans it for the faulty tester's faulty lot."""
    k = FAULTY_TESTER[scenario]
    (plan,) = excursion_plan(lot_configs(scenario, CONFIG, k)[CONFIG.lots - 2])
    return {**plan, "agent_id": agent_name(k)[0], "tester": agent_name(k)[1]}


def test_every_scenario_passes_and_the_table_says_so(evaluated):
    printed = evaluated["printed"]
    assert evaluated["status"] == 0, printed
    for scenario in SCENARIOS:
        assert re.search(rf"^{scenario}: 1/1 runs pass; false incidents 0 in 12 tester-lots", printed, re.M), printed


def test_normal_lots_open_no_incident_and_page_nobody(evaluated):
    assert _incidents(evaluated, "normal") == []
    assert _paged(evaluated, "normal") == []


def test_a_drifting_site_opens_one_site_fault_there_naming_its_tests_and_advises_no_retrain(evaluated):
    truth = _truth("drifting_site")
    (incident,) = _incidents(evaluated, "drifting_site")
    assert (incident["scope"], incident["diagnosis"], incident["agent_id"], incident["tester"], incident["head"],
            incident["site"]) == ("site", "site fault", truth["agent_id"], truth["tester"], truth["head"],
                                  truth["site"])
    assert len(set(incident["tests"]) & set(truth["tests"])) >= 3 and len(truth["tests"]) == 4
    assert incident["retrain"] == 0 and incident["recommendation"].startswith("No retrain")
    assert incident["status"] == "closed"                     # the site was fixed for the last lot
    paged = _paged(evaluated, "drifting_site")
    assert [(e["kind"], e["scope"], e["tester"]) for e in paged] == [
        ("incident_opened", "site", truth["tester"]), ("incident_closed", "site", truth["tester"])]


def test_a_tester_wide_shift_opens_one_tester_incident(evaluated):
    truth = _truth("tester_shift")
    (incident,) = _incidents(evaluated, "tester_shift")
    assert (incident["scope"], incident["diagnosis"], incident["tester"]) == ("tester", "tester or handler fault",
                                                                             truth["tester"])
    assert set(incident["tests"]) == set(truth["tests"]) and incident["retrain"] == 0
    assert incident["others_held"] == CONFIG.testers - 1


def test_a_fleet_wide_process_shift_opens_one_fleet_incident_that_recommends_a_retrain(evaluated):
    (plan,) = excursion_plan(lot_configs("process_shift", CONFIG, 0)[-1])
    (incident,) = _incidents(evaluated, "process_shift")
    assert (incident["scope"], incident["diagnosis"]) == ("fleet", "process or material moved")
    assert incident["testers"] == [agent_name(k)[1] for k in range(CONFIG.testers)]
    assert set(incident["tests"]) == set(plan["tests"])
    assert incident["retrain"] == 1 and incident["recommendation"].startswith("Retrain fleet/1: the process moved on 4 "
                                                                              "testers and the model's outputs moved")


def test_the_demo_leads_with_the_drifting_site_and_its_report_shows_incidents_and_banded_psi(tmp_path, capsys):
    """The README's demo, smaller (6,000 training parts): the first thing it reports is the drifting site's
    incident, with no retrain advice; its report opened in Chromium shows the incident table first and heat tables
    whose colours tell PSI 0.2, 1 and 5 apart."""
    from trainer.demo import run_demo
    assert run_demo(str(tmp_path / "demo"), parts=6000, tests=200, stream_parts=6000, seed=7,
                    registry_root=str(tmp_path / "models"), name="demo") == 0
    printed = capsys.readouterr().out
    results = printed[printed.index("== 4/5 results"):].splitlines()
    truth = json.loads(Path(tmp_path / "demo" / "stream_lot.parquet.truth.json").read_text())
    drift = next(e for e in truth["excursions"] if e["kind"] == "drifting_site")
    # about 3,000 parts with readings (the sampled datalog logs every other part): 2 full windows, the shutdown one
    assert re.fullmatch(r"collector: 1 incident\(s\) from [34] drift windows", results[1])
    assert results[2].startswith(f"  #1 (open) site fault at demo-tester head {drift['head']} site {drift['site']} ")
    assert sum(test in results[2] for test in drift["tests"]) >= 3
    assert results[3].strip().startswith("No retrain")

    page = render(tmp_path / "demo" / "fleet_report.html", tmp_path / "chromium-profile")
    headings = page["headings"]
    assert headings[0] == "Open incidents (1)" and headings[1] == "Retrain recommendation per model (1)"
    cells = page["cells"]
    assert "site fault" in cells and f"demo-tester h{drift['head']}/s{drift['site']}" in cells
    assert "no retrain" in cells and "retrain" not in cells
    # The package's PAT screen checks reach the report through the agent's drift windows.
    assert "PAT screens per model, as trained (good and failing parts flagged on later training parts)" in headings
    assert {"static", "dynamic"} <= set(cells)
    legend = {value: colour for value, colour, table in page["colours"] if table == "legend"}
    assert len({legend[0.2], legend[1], legend[5]}) == 3
    bands = sorted(legend)
    for value, colour, table in page["colours"]:
        if table == "heat":                 # every cell wears its band's colour
            assert colour == legend[max(edge for edge in bands if edge <= value)], (value, colour)
    assert max(value for value, _, table in page["colours"] if table == "heat") > 2   # the drifting site's tests
    for width, height, source in page["images"]:
        assert width > 300 and height > 150 and source == "data:image/png;base64,"
