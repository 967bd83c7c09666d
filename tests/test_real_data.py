"""The real a595 wafer-sort file (tests/data/stdf, 3 wafers, 336 parts, big-endian): train on wafer 02, replay wafers
03 and 09 with `edge-replay --wafer 03 --wafer 09` into a real agent, as an engineer with a new floor's files would.

What the file holds: 14 parts have a part record and bins but no parametric reading and 12 more stopped early (2 to
42 of 108 tests); among the passing parts 13 tests are discrete (2 to 8 distinct values in instrument steps) and 4
constant.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_agent.package.registry import Registry
from edge_agent.processes import free_tcp_endpoint, start_agent, stop
from trainer.ingest import read_table
from trainer.package import build_and_publish
from trainer.table import ParametricTable
from trainer.train import TrainConfig, fit
from trainer.validate import validate

A595 = Path(__file__).parent / "data" / "stdf" / "a595.stdf.gz"
REPO = Path(__file__).resolve().parents[1]
TRAINING_WAFERS, REPLAYED_WAFERS = ("02",), ("03", "09")   # one wafer trains, two are held out
MIN_ROWS = 50           # one wafer: 112 parts, 98 of them with enough readings


@pytest.fixture(scope="module")
def held_out_wafer(tmp_path_factory, keys):
    """Package "a595" trained on wafer 02 (the validation leaves out its parts without enough readings); wafers 03
    and 09 replayed through a real agent; the replay's JSON report and its replies."""
    root = tmp_path_factory.mktemp("a595")
    table, findings = read_table(str(A595))
    training = ParametricTable(table.frame[table.frame["wafer"].isin(TRAINING_WAFERS).to_numpy()]
                               .reset_index(drop=True), table.tests, table.sources)
    training, report = validate([training], [str(A595)], min_rows=MIN_ROWS, findings=findings)
    report.raise_if_fatal()
    trained = fit(training, TrainConfig(name="a595", seed=3), progress=lambda _: None)
    registry = Registry(root / "models")
    ref = build_and_publish(trained, training, report.to_dict(), registry, [str(A595)], signer=keys.signer)
    registry.promote(ref.name, ref.version, "production", "test_real_data")
    endpoint = free_tcp_endpoint()
    agent = start_agent(registry.root, "a595", endpoint, "--no-drift", *keys.trust_args, log_path=root / "agent.log")
    try:
        replies_path = root / "replies.jsonl"
        done = subprocess.run([sys.executable, "-m", "trainer.replay", str(A595), "--registry", str(registry.root),
                               "--model", "a595", "--connect", endpoint,
                               *(option for wafer in REPLAYED_WAFERS for option in ("--wafer", wafer)),
                               "--replies", str(replies_path), "--json", "--timeout-ms", "30000"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        assert stop(agent) == 0
    assert done.returncode == 0, done.stderr
    replies = [json.loads(line) for line in replies_path.read_text().splitlines()]
    return {"table": table, "report": report, "manifest": registry.manifest(ref),
            "replay": json.loads(done.stdout), "replies": replies}


def test_a595_parts_without_readings_are_left_out_of_training_and_never_decided_as_pass(held_out_wafer):
    table = held_out_wafer["table"]
    frame = table.frame
    (finding,) = held_out_wafer["report"].by_code("SPARSE_PARTS")
    readings = table.readings()
    present = np.count_nonzero(~np.isnan(readings), axis=1)
    trained_wafers = frame["wafer"].isin(TRAINING_WAFERS).to_numpy()
    assert finding.count == int(np.sum(trained_wafers & (present < 0.5 * 106)))   # 106 tests are not constant

    replay, replies = held_out_wafer["replay"], held_out_wafer["replies"]
    wafer = frame["wafer"].isin(REPLAYED_WAFERS).to_numpy()
    features = held_out_wafer["manifest"].columns
    present_09 = np.count_nonzero(~np.isnan(table.readings(features)[wafer]), axis=1)
    assert replay["replay"]["parts"] == 224 and len(replies) == 224
    assert replay["replay"]["parts_without_readings"] == int(np.sum(present_09 == 0)) > 0
    assert [r["tests_present"] for r in replies] == present_09.tolist()
    insufficient = [r for r in replies if r["insufficient_readings"]]
    assert len(insufficient) == int(np.sum(present_09 < len(features) / 2))
    assert all(r["bin_name"] == "insufficient_readings" and r["outlier_score"] is None for r in insufficient)
    print(f"\na595 wafers {REPLAYED_WAFERS}: {len(insufficient)} parts insufficient_readings "
          f"({replay['replay']['parts_without_readings']} without any reading)")


def test_a595_static_pat_spares_the_passing_parts_of_the_held_out_wafers(held_out_wafer):
    """Discrete tests (VTN/VTP: 2-4 distinct values, IQR 0) get limits from their 5 mV resolution floor rather than
    none, and no more than 2 % of the held-out wafers' passing parts break a static PAT limit."""
    manifest = held_out_wafer["manifest"]
    limits = {limit.column: limit for limit in manifest.pat.limits}
    vtn = limits["410:VTN_DTI_0_TO_7 <> vin"]
    assert vtn.shape == "discrete" and vtn.resolution == pytest.approx(0.005, rel=1e-3) and vtn.low is not None
    frame = held_out_wafer["table"].frame
    passing = frame.loc[frame["wafer"].isin(REPLAYED_WAFERS), "passed"].to_numpy(bool)
    replies = held_out_wafer["replies"]
    decided = [r for r, ok in zip(replies, passing) if ok and not r["insufficient_readings"]]
    flagged = sum("static_pat" in r["flags"] for r in decided)
    assert len(decided) > 160 and flagged <= 0.02 * len(decided)
    print(f"\na595 wafers {REPLAYED_WAFERS}: static PAT flagged {flagged} of {len(decided)} passing parts")


def test_a595_ml_outliers_are_explained(held_out_wafer):
    replies = [r for r in held_out_wafer["replies"] if r["outlier"]]
    assert replies, "the held-out wafers have no ML outlier to explain"
    for reply in replies:
        assert reply["drivers"] and "furthest from typical: " in reply["why"] and "robust sigma" in reply["why"]
        assert reply["drivers"][0]["test"] in reply["why"]
    print(f"\na595: {len(replies)} ML outliers on the held-out wafers")
    for reply in replies[:3]:
        print(f"\na595 ML outlier {reply['part']}: {reply['why']}")
