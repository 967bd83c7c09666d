"""The yield model chosen and judged on the future: a raw SECOM-style file (its own `Time` and `Pass/Fail` with
-1 = pass) trains through forward folds whose every candidate shows in the card with the failing parts behind each
figure; a model that cannot be told from chance is refused, or published only as advisory and marked so."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from edge_agent.package.registry import Registry
from trainer.evaluation import forward_folds
from trainer.forward import AUTO_CANDIDATES, bootstrap_auc, screen_signals

SECOM = Path(__file__).parent / "data" / "secom" / "secom_first70_40signals.csv.gz"
RAW = ("--label-column", "Pass/Fail", "--pass-value", "-1", "--time-column", "Time", "--label-kind", "outcome",
       "--trees", "20", "--yield-trees", "20", "--unsigned", "--min-rows", "100")


def _edge_train(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.cli", "fit", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900)


def test_secom_raw_columns_train_on_forward_folds_and_the_card_compares_every_candidate(tmp_path):
    done = _edge_train("--data", str(SECOM), *RAW, "--registry", str(tmp_path / "reg"), "--name", "secom",
                       "--advisory", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "parsed: 2008-07-19T11:55:00 to 2008-09-26T03:12:00 UTC; 1,097 parts with a label, 78 failing" in done.stderr
    registry = Registry(tmp_path / "reg")
    ref = registry.resolve("secom", "candidate")
    manifest = registry.manifest(ref)
    card = (registry.package_dir(ref) / "model_card.md").read_text()
    forward = manifest.metrics.yield_model["forward"]
    assert [c["name"] for c in forward["candidates"]] and {c["name"] for c in forward["candidates"]} == set(AUTO_CANDIDATES)
    assert len(forward["folds"]) == 5 and all(len(c["fold_auc"]) == 5 for c in forward["candidates"])
    for name in AUTO_CANDIDATES:
        assert f"| {name} (" in card
    for fold in forward["folds"]:
        assert f"({fold['test_fails']} failing)" in card
    assert "Chosen: " in card and forward["choice"] in card
    metrics = manifest.metrics.yield_model
    assert metrics["roc_auc_low"] <= metrics["roc_auc"] <= metrics["roc_auc_high"]
    assert metrics["fail_parts"] == sum(f["test_fails"] for f in forward["folds"]) > 0
    assert "yield ROC AUC, 95% interval" in card and "relearns" not in card
    assert manifest.models.yield_model.label_source.source == "outcome"


def test_a_model_at_chance_is_refused_and_published_only_as_advisory(tmp_path):
    frame = pd.read_csv(SECOM)
    frame["Pass/Fail"] = np.where(np.random.default_rng(3).random(len(frame)) < 0.1, 1, -1)  # labels of nothing
    data = tmp_path / "random_labels.csv"
    frame.to_csv(data, index=False)
    registry = tmp_path / "reg"
    refused = _edge_train("--data", str(data), *RAW, "--registry", str(registry), "--name", "noise", cwd=tmp_path)
    assert refused.returncode != 0
    last = refused.stderr.strip().splitlines()[-1]
    assert "cannot be told from chance" in last and "more failing parts" in last and "--advisory" in last
    assert not (registry / "noise").exists() or not list((registry / "noise").iterdir())
    published = _edge_train("--data", str(data), *RAW, "--registry", str(registry), "--name", "noise",
                            "--advisory", cwd=tmp_path)
    assert published.returncode == 0, published.stderr[-3000:]
    reg = Registry(registry)
    ref = reg.resolve("noise", "candidate")
    gate = reg.manifest(ref).models.yield_model.gate
    assert gate.advisory is True and gate.passed is False and gate.auc_low < 0.55
    assert json.loads((reg.package_dir(ref) / "manifest.json").read_text())["models"]["yield"]["gate"]["advisory"]
    assert "ADVISORY" in (reg.package_dir(ref) / "model_card.md").read_text()


def test_forward_folds_train_only_on_earlier_parts():
    times = np.random.default_rng(0).permutation(1000).astype(float)
    folds = forward_folds(pd.DataFrame({"timestamp": times}), k=5, min_train_share=0.4)
    pairs = folds.pairs()
    assert len(pairs) == 5 and len(pairs[0][0]) == 400
    for train, test in pairs:
        assert times[train].max() < times[test].min()


def test_screens_and_the_bootstrap_interval():
    X = np.random.default_rng(1).normal(size=(200, 5))
    X[:, 1] = 3.0
    X[:150, 2] = np.nan
    X[:, 4] = X[:, 0]
    keep, removed = screen_signals(X)
    assert keep.tolist() == [True, False, False, True, False]
    assert removed == {"mostly_missing": 1, "constant": 1, "duplicated": 1}
    y = (np.random.default_rng(2).random(2000) < 0.9).astype(int)
    interval = bootstrap_auc(y, y + np.random.default_rng(4).normal(scale=2.0, size=2000), seed=0, draws=300)
    assert interval.low < interval.point < interval.high and interval.fails == int((y == 0).sum())
