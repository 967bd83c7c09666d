"""edge-replay: real STDF files (the real a595 wafer-sort file and synthetic lots) played into real agent processes.

Two packages are trained once per module: "a595" on the real file itself (small forests), "syn" on a synthetic
lot of 1,200 parts x 30 tests. The replayed synthetic lot is another lot of the same product, written as STDF
with two of the model's tests left out and one test the model does not know added.
"""
from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest

from edge_agent.client import BACKING_OFF, TIMEOUT, AgentClient
from edge_agent.package.manifest import OUTLIER_FILE
from edge_agent.package.registry import Registry
from edge_agent.processes import free_tcp_endpoint, start_agent, stop
from trainer import synth
from trainer.ingest import load_tables
from trainer.ingest.stdf import read_stdf
from trainer.package import build_package
from trainer.replay import ReplayError, load_replay, main, replay, send_schedule
from trainer.stdf_writer import write_stdf
from trainer.table import TestMeta as Meta
from trainer.train import TrainConfig, fit

A595 = Path(__file__).parent / "data" / "stdf" / "a595.stdf.gz"
A595_CONSTANT_TESTS = {"200:VDD supply <> setup_device", "425:VTP_CK <> vin"}   # dropped by validation at fit
REPO = Path(__file__).resolve().parents[1]
N_TESTS = 30
REPLY_MS = 10_000.0   # generous: a reply that does not come at all fails a test, a slow one (a busy machine) does not


def _publish(registry: Registry, name: str, table, seed: int, signer):
    trained = fit(table, TrainConfig(name=name, n_trees=50, yield_trees=30, seed=seed), progress=lambda _: None)
    files, manifest = build_package(trained, table, {}, [])
    ref = registry.publish(name, files, manifest, reason="test_replay", signer=signer)
    registry.promote(name, ref.version, "production", "test_replay")
    return trained


@pytest.fixture(scope="module")
def world(tmp_path_factory, keys):
    root = tmp_path_factory.mktemp("replay")
    registry = Registry(root / "models")
    a595_table, _ = load_tables([str(A595)])
    a595_model = _publish(registry, "a595", a595_table, seed=1, signer=keys.signer)

    training = root / "train.stdf"
    config = synth.SynthConfig(parts=1200, tests=N_TESTS, lots=1, seed=21, excursions=("latent_outliers",))
    catalog = synth.test_catalog(config)
    write_stdf(training, synth.generate(config, chunk_parts=500), catalog, sites_per_touchdown=config.sites)
    _publish(registry, "syn", load_tables([str(training)])[0], seed=2, signer=keys.signer)

    # The lot to replay: the same product, other parts; two model tests absent, one unknown test added.
    replayed = synth.SynthConfig(parts=600, tests=N_TESTS, lots=1, seed=22, first_lot_index=2,
                                 excursions=("latent_outliers",))
    frame = pd.concat(list(synth.generate(replayed, chunk_parts=250)), ignore_index=True)
    absent = [catalog[3].column, catalog[17].column]
    frame["9999:EXTRA"] = np.linspace(0.0, 1.0, len(frame))
    tests = [t for t in catalog if t.column not in absent] + [Meta(column="9999:EXTRA", name="EXTRA", number=9999)]
    lot = root / "replay_lot.stdf"
    write_stdf(lot, frame.drop(columns=absent), tests, sites_per_touchdown=replayed.sites)

    logs = root / "logs"
    logs.mkdir()
    agents = {}
    try:
        for name in ("a595", "syn"):
            endpoint = free_tcp_endpoint()
            agents[name] = (start_agent(registry.root, name, endpoint, "--no-drift", *keys.trust_args,
                                        log_path=logs / f"{name}.log"), endpoint)
        yield {"root": root, "registry": registry, "a595_model": a595_model, "lot": lot, "absent": absent,
               "endpoints": {name: endpoint for name, (_, endpoint) in agents.items()}}
    finally:
        for process, _ in agents.values():
            stop(process)


def _features(world, name: str) -> list[str]:
    registry = world["registry"]
    return registry.manifest(registry.resolve(name)).columns


def _offline_scores(world, name: str, rows: np.ndarray) -> np.ndarray:
    registry = world["registry"]
    folder = registry.package_dir(registry.resolve(name))
    session = ort.InferenceSession(str(folder / OUTLIER_FILE), providers=["CPUExecutionProvider"])
    return session.run(["score"], {"readings": rows.astype(np.float32)})[0].reshape(-1)


def test_a595_replayed_into_an_agent_every_part_decided_scores_as_offline(world, tmp_path):
    """The real file, through `python -m trainer.replay`: all 336 parts decided in file order, each outlier
    score equal to an offline onnxruntime score and to scikit-learn's decision_function of the same row."""
    replies_path = tmp_path / "replies.jsonl"
    done = subprocess.run([sys.executable, "-m", "trainer.replay", str(A595), "--registry",
                           str(world["registry"].root), "--model", "a595", "--connect", world["endpoints"]["a595"],
                           "--replies", str(replies_path), "--json", "--timeout-ms", str(REPLY_MS)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["replay"]["parts"] == 336 and report["replay"]["features"] == 106
    # Validation dropped two constant tests before training: the file has them, the model does not.
    assert set(report["replay"]["tests_dropped"]) == A595_CONSTANT_TESTS
    assert report["replay"]["tests_missing_count"] == 0
    assert report["replies"]["decided"] == 336 and report["replies"]["no_decision"] == {}
    assert report["replies"]["round_trip_us"]["count"] == 336
    print("a595 replay round trip us:", report["replies"]["round_trip_us"], "agent us:", report["replies"]["agent_us"])

    replies = [json.loads(line) for line in replies_path.read_text().splitlines()]
    table = read_stdf(A595).table
    assert [r["part"]["part_id"] for r in replies] == table.frame["part_id"].tolist()
    assert [(r["part"]["wafer"], r["part"]["x"], r["part"]["y"]) for r in replies] == \
        list(zip(table.frame["wafer"], table.frame["x"], table.frame["y"]))
    assert all(r["decided"] and r["model_version"] == "1" and r["bin"] is not None for r in replies)

    rows = table.readings(_features(world, "a595")).astype(np.float32)
    # Parts with readings for fewer than half the model's tests (14 without any) get no scores.
    scored = np.count_nonzero(~np.isnan(rows), axis=1) >= 53
    assert [r["insufficient_readings"] for r in replies] == (~scored).tolist()
    assert report["replies"]["insufficient_readings"] == 26 and report["replay"]["parts_without_readings"] == 14
    assert all(r["outlier_score"] is None and r["bin_name"] == "insufficient_readings"
               for r in replies if r["insufficient_readings"])
    replies = [r for r in replies if not r["insufficient_readings"]]
    rows = rows[scored]
    sent = np.array([r["outlier_score"] for r in replies])
    np.testing.assert_allclose(sent, _offline_scores(world, "a595", rows), atol=1e-5, rtol=0)
    sklearn = world["a595_model"].outlier.decision_function(rows.astype(np.float64))
    np.testing.assert_allclose(sent, sklearn, atol=1e-5, rtol=0)
    threshold = world["registry"].manifest(world["registry"].resolve("a595")).models.outlier.threshold
    assert [r["outlier"] for r in replies] == (sent < threshold).tolist()
    assert sum(r["outlier"] for r in replies) == report["replies"]["outliers"]


def test_synthetic_lot_tests_missing_are_nan_unknown_tests_dropped(world):
    features = _features(world, "syn")
    plan = load_replay(world["lot"], features)
    assert plan.missing_tests == world["absent"] and plan.dropped_tests == ["9999:EXTRA"]
    assert len(plan) == 600 and plan.readings.shape == (600, N_TESTS)
    for column in world["absent"]:
        assert np.isnan(plan.readings[:, features.index(column)]).all()

    replies = io.StringIO()
    with AgentClient(world["endpoints"]["syn"], timeout_ms=REPLY_MS) as client:
        summary = replay(plan, client, replies=replies)
    assert summary.parts == summary.decided == 600
    # The agent imputes the absent tests inside its graph exactly as the offline session does.
    table = read_stdf(world["lot"]).table
    present = [c for c in features if c in table.test_columns]
    rows = np.full((600, N_TESTS), np.nan, np.float32)
    rows[:, [features.index(c) for c in present]] = table.readings(present)
    expected = _offline_scores(world, "syn", rows)
    got = np.array([json.loads(line)["outlier_score"] for line in replies.getvalue().splitlines()])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_dump_writes_the_messages_without_an_agent(world, tmp_path, capsys):
    out = tmp_path / "messages.jsonl"
    nobody = free_tcp_endpoint()
    assert main([str(world["lot"]), "--registry", str(world["registry"].root), "--model", "syn",
                 "--connect", nobody, "--dump", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "600 messages written" in printed and "sent as NaN): 2" in printed and "dropped): 1" in printed

    messages = [json.loads(line) for line in out.read_text().splitlines()]
    table = read_stdf(world["lot"]).table
    assert len(messages) == len(table) == 600
    assert [m["id"] for m in messages] == list(range(1, 601))
    assert all(m["type"] == "score" and m["v"] == 1 for m in messages)
    assert [m["part"]["part_id"] for m in messages] == table.frame["part_id"].tolist()
    features = _features(world, "syn")
    for message, (_, row) in zip(messages[:50], table.frame.iterrows()):
        assert len(message["readings"]) == len(features)
        for column, value in zip(features, message["readings"]):
            if column in world["absent"] or np.isnan(row[column]):
                assert value is None
            else:
                assert value == float(np.float32(row[column]))


def test_pace_file_schedule_follows_the_test_times(world):
    """--pace file: part i goes out when the tester finished it, the running sum of PRR TEST_T / speed."""
    plan = load_replay(world["lot"], _features(world, "syn"))
    times = read_stdf(world["lot"]).table.frame["test_time_ms"].to_numpy(np.float64)
    assert np.isfinite(times).all() and (times > 0).all()
    np.testing.assert_array_equal(plan.test_time_ms, times)
    schedule = send_schedule(plan.test_time_ms, speed=10)
    assert schedule[0] == pytest.approx(times[0] / 10_000)
    np.testing.assert_allclose(np.diff(schedule), times[1:] / 10_000)
    assert schedule[-1] == pytest.approx(times.sum() / 10_000)
    # A part without a recorded test time (a595 records none) is sent without waiting.
    np.testing.assert_array_equal(send_schedule(np.array([100.0, np.nan, 50.0])), [0.1, 0.1, 0.15])
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ReplayError, match="speed"):
            send_schedule(times, bad)


def test_replay_waits_for_each_part_on_the_schedule(world):
    """The sending loop against a virtual clock (sleep advances it): every part leaves at, not before, its time."""
    plan = load_replay(world["lot"], _features(world, "syn"))
    schedule = send_schedule(plan.test_time_ms, speed=1)
    now = [1000.0]
    sent_at = []

    def sleep(seconds: float) -> None:
        assert seconds > 0
        now[0] += seconds

    with AgentClient(world["endpoints"]["syn"], timeout_ms=REPLY_MS) as client:
        score = client.score
        client.score = lambda row, part: (sent_at.append(now[0]), score(row, part))[1]
        summary = replay(plan, client, schedule=schedule, clock=lambda: now[0], sleep=sleep)
    assert summary.decided == 600
    np.testing.assert_allclose(np.array(sent_at) - 1000.0, schedule, atol=1e-9)


def test_agent_not_answering_is_counted_per_part(world):
    """During a replay a silent agent costs each part no more than the client's timeout or back-off: the client
    backs off once 3 timeouts in a row span backoff_after_s (0.25 s), after at most 1 + 0.25 / 0.03 of them."""
    plan = load_replay(A595, _features(world, "a595"))
    with AgentClient(free_tcp_endpoint(), timeout_ms=30, backoff_s=60) as client:
        summary = replay(plan, client)
    assert summary.decided == 0 and summary.parts == 336
    assert 3 <= summary.no_decision[TIMEOUT] <= 1 + math.ceil(0.25 / 0.03)
    assert summary.no_decision[TIMEOUT] + summary.no_decision[BACKING_OFF] == 336


def test_features_from_the_agent(world, capsys):
    assert main([str(A595), "--features-from-agent", "--connect", world["endpoints"]["a595"], "--json",
                 "--timeout-ms", str(REPLY_MS)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["replay"]["features"] == 106 and report["replies"]["decided"] == 336


@pytest.mark.parametrize("case", ["not_stdf", "unknown_model", "no_agent", "other_model", "both_sources"])
def test_unusable_input_is_a_message_and_exit_2(world, tmp_path, capsys, case):
    registry = str(world["registry"].root)
    fake = tmp_path / "lot.stdf"
    fake.write_text("lot,part_id\nL1,1\n")
    args, words = {
        "not_stdf": ([str(fake), "--model", "syn", "--dump", str(tmp_path / "d.jsonl")], "not an STDF file"),
        "unknown_model": ([str(A595), "--model", "nosuch", "--connect", world["endpoints"]["a595"]], "nosuch"),
        "no_agent": ([str(A595), "--model", "a595", "--connect", free_tcp_endpoint()], "no reply from the agent"),
        "other_model": ([str(world["lot"]), "--model", "syn", "--connect", world["endpoints"]["a595"]],
                        "serves a595 version 1 with 106 features"),
        "both_sources": ([str(A595), "--model", "a595", "--features-from-agent"], "either --model"),
    }[case]
    assert main([*args, "--registry", registry]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-replay: error:") and words in err and "Traceback" not in err
