"""Coverage: parts with too few readings are left out of training and never turned into a plain decision.

The trainer reports them by file and count; the agent (a real process) gives them the insufficient_readings bin
with null scores; edge-replay counts them and refuses a file that shares too few of the model's tests.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from edge_agent.daemon.binning import INSUFFICIENT, BinPolicy, decide_insufficient
from edge_agent.client import AgentClient
from edge_agent.daemon.config import ConfigError, load_config
from trainer.ingest import load_tables
from trainer.stdf_writer import write_stdf
from trainer.synth import SynthConfig, write

REPO = Path(__file__).resolve().parents[1]
REPLY_MS = 30_000.0   # generous: a loaded 2-core machine; a reply that never comes still fails


def test_trainer_reports_parts_without_enough_readings_by_file_and_leaves_them_out(tmp_path):
    """Two files: a datalog that logged every other part (and stops at the first fail) and one that logged
    every part. The first gets a SPARSE_PARTS finding with its count; its unlogged parts are not trained on."""
    paths = []
    for name, extra in (("sampled", {"datalog_every": 2, "stop_on_fail": True}), ("full", {})):
        paths.append(str(tmp_path / f"{name}.parquet"))
        write(SynthConfig(seed=3, parts=1200, tests=20, lots=1, excursions=(), first_lot_index=len(paths),
                          **extra), paths[-1])
    frames = {path: pd.read_parquet(path) for path in paths}
    tests = [c for c in frames[paths[0]].columns if ":" in c]
    counts = {path: frame[tests].notna().sum(axis=1).to_numpy() for path, frame in frames.items()}
    sparse = {path: int(np.sum(count < 10)) for path, count in counts.items()}
    assert sparse[paths[0]] > 600 and sparse[paths[1]] == 0

    table, report = load_tables(paths)
    (finding,) = report.by_code("SPARSE_PARTS")
    assert finding.file == paths[0] and finding.count == sparse[paths[0]]
    assert f"{sparse[paths[0]]:,} of 1,200 parts" in finding.message and "left out of training" in finding.message
    assert len(table) == 2400 - sparse[paths[0]] and report.sparse_parts == sparse[paths[0]]
    assert (table.frame[table.test_columns].notna().sum(axis=1) >= 10).all()

    kept, kept_report = load_tables(paths, keep_sparse_parts=True)
    assert len(kept) == 2400 and "kept" in kept_report.by_code("SPARSE_PARTS")[0].message


def test_parts_without_readings_get_insufficient_readings_never_pass(floor_agent, pathological_floor):
    """The next lot, as its sampled, stop-on-fail datalog holds it, through a real agent: every part with readings
    for fewer than half the model's tests (tester fails among them) gets its own bin, null scores and the count of
    its tests; every other part gets scores; none of the first kind is binned pass."""
    floor = pathological_floor
    columns = floor.manifest.columns
    frame = floor.next_lot.frame
    rows = floor.next_lot.readings(columns).astype(np.float32)
    present = np.count_nonzero(~np.isnan(rows), axis=1)
    parts = [{"lot": lot, "sublot": sublot, "wafer": wafer, "site": int(site)}
             for lot, sublot, wafer, site in frame[["lot", "sublot", "wafer", "site"]].itertuples(index=False)]
    with AgentClient(floor_agent, timeout_ms=REPLY_MS) as client:
        results = []
        for start in range(0, len(rows), 400):
            results += client.score_batch(list(zip(parts[start:start + 400], rows[start:start + 400])))
        health = client.health(timeout_ms=REPLY_MS)
    assert all(r.decided for r in results)
    few = present < len(columns) / 2
    failing_without_readings = few & ~frame["passed"].to_numpy(bool)
    assert few.sum() > 1900 and (present == 0).sum() > 1900 and failing_without_readings.sum() > 10
    for result, count, too_few in zip(results, present, few):
        assert result.tests_present == count
        assert result.insufficient_readings == too_few
        if too_few:
            assert (result.bin_name, result.bin) == (INSUFFICIENT, 25)
            assert result.outlier_score is None and result.pass_probability is None and result.outlier is None
            assert f"{count} of the model's {len(columns)} tests" in result.why
        else:
            assert result.bin_name != INSUFFICIENT and isinstance(result.outlier_score, float)
    assert health["bins"][INSUFFICIENT] == few.sum()   # other tests of this agent send parts with readings
    # The lot's last sublot restarted every site's dynamic PAT window: same lot id, another sublot.
    groups = {site["group"] for key, site in health["dynamic_pat"]["sites"].items() if key.startswith("1/")}
    assert groups and all(group.startswith("SYN0005/B/") for group in groups), groups


def test_the_share_of_readings_a_decision_needs_is_configured_and_checked(tmp_path):
    strict = BinPolicy(min_readings_share=0.9)
    assert strict.needed_readings(200) == 180 and BinPolicy().needed_readings(200) == 100
    decision = decide_insufficient(strict, present=150, tests=200, static=[])
    assert (decision.name, decision.bin, decision.flags) == (INSUFFICIENT, 25, [INSUFFICIENT])
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nmodel = "m"\n[security]\nallow_unsigned = true\n[binning]\nmin_readings_share = 0.9\n'
                    '[binning.bins]\ninsufficient_readings = 40\n')
    policy = load_config(path).binning.policy()
    assert policy.min_readings_share == 0.9 and policy.bins[INSUFFICIENT] == 40
    path.write_text('[agent]\nmodel = "m"\n[binning]\nmin_readings_share = 1.5\n')
    with pytest.raises(ConfigError, match=r"binning.min_readings_share: expected .*got 1.5"):
        load_config(path)


def _replay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.replay", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_edge_replay_counts_parts_without_readings_and_refuses_a_file_sharing_too_few_tests(pathological_floor,
                                                                                           tmp_path):
    floor = pathological_floor
    columns = floor.manifest.columns
    registry = str(floor.registry.root)
    lot = floor.next_lot
    first_sublot = lot.frame["sublot"] == "A"
    table = lot.frame[first_sublot.to_numpy()]
    stdf = write_stdf(tmp_path / "next_A.stdf", table, lot.tests)
    rows = lot.readings(columns)[first_sublot.to_numpy()]
    without = int(np.sum(np.isnan(rows).all(axis=1)))
    done = _replay(stdf.path, "--registry", registry, "--model", "floor", "--dump", str(tmp_path / "m.jsonl"),
                   "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["replay"]
    assert report["parts"] == len(table) and report["parts_without_readings"] == without > 500
    assert report["shared_tests"] == len(columns)

    few = [t for t in lot.tests if t.column in columns][:60]    # 60 of the model's tests
    identity = [c for c in table.columns if c not in lot.test_columns]
    narrow = write_stdf(tmp_path / "narrow.stdf", table[[*identity, *(t.column for t in few)]], few)
    refused = _replay(narrow.path, "--registry", registry, "--model", "floor", "--dump", str(tmp_path / "n.jsonl"))
    assert refused.returncode == 2
    assert (f"60 of the model's {len(columns)} tests ({60 / len(columns):.0%}), fewer than --min-shared-tests 50%"
            in refused.stderr)
    assert "Traceback" not in refused.stderr
    accepted = _replay(narrow.path, "--registry", registry, "--model", "floor", "--dump", str(tmp_path / "n.jsonl"),
                       "--min-shared-tests", "0.25")
    assert accepted.returncode == 0, accepted.stderr
