"""edge-bench: one real quick run (real agents, collector, sockets, sessions) and the README table renderer.

No wall-clock thresholds: the figures are checked for presence, sign and internal consistency only.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import sklearn
import zmq

from bench import cadence, report
from bench.latency_suite import QUICK_PARTS
from edge_agent.client import TIMEOUT
from edge_agent.daemon.stages import STAGES
from edge_agent.wire.score import Code

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, "-m", "bench.cli", "--quick", "--json", str(out / "out.json"),
                           "--markdown", str(out / "out.md"), "--plots", str(out / "plots")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "out.json").read_text())


def _number(figures: dict, key: str) -> float:
    value = figures[key]
    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{key} = {value!r}"
    assert math.isfinite(value), f"{key} = {value!r}"
    return float(value)


def test_required_keys_present_and_positive(quick_run):
    _, figures = quick_run
    for key in report.REQUIRED_KEYS:
        assert key in figures, key
        if key != "machine":
            assert _number(figures, key) > 0, key


def test_percentiles_are_ordered_in_every_e2e_run(quick_run):
    _, figures = quick_run
    runs = [k.removesuffix(".p50_us") for k in figures if k.startswith("e2e.") and k.endswith(".p50_us")]
    assert "e2e.tcp.rate_1000" in runs and "e2e.ipc.rate_1000" in runs and "e2e.tcp.rate_1000.drift_off" in runs
    for run in runs:
        ladder = [_number(figures, f"{run}.{p}_us") for p in ("p50", "p90", "p99", "p999", "max")]
        assert ladder == sorted(ladder), (run, ladder)
        assert ladder[0] > 0
    for rate, sent in QUICK_PARTS.items():
        # Every part sent is scored, shed by a saturated agent (its queues are bounded in bytes and in age) or
        # counted as a timeout, and no other answer is an error. How many are shed or time out is not asserted:
        # 5,000 parts/s one part per request saturates a 2-core machine (README).
        no_decision = figures[f"e2e.tcp.rate_{rate}.no_decision"]
        assert set(no_decision) <= {TIMEOUT, Code.OVERLOADED, Code.DEADLINE_EXCEEDED}, no_decision
        answered = _number(figures, f"e2e.tcp.rate_{rate}.parts")
        assert answered > 0 and answered + sum(no_decision.values()) == sent, (rate, answered, no_decision)
    # Latency from the due time includes the round trip of the same part.
    assert figures["e2e.tcp.rate_1000.p50_us"] >= figures["e2e.tcp.rate_1000.round_trip.p50_us"] - 0.1


def test_every_cadence_profile_has_its_floor_breakdown_and_ratios(quick_run):
    _, figures = quick_run
    profiles = cadence.plan(quick=True)
    assert {p.name for p in profiles} >= {"steady_1", "steady_10", "steady_100", "steady_1000"}
    assert any(p.burst for p in profiles)
    models = _number(figures, "cadence.models_inproc.p50_us")
    for profile in profiles:
        key = f"cadence.{profile.name}"
        # Every request is scored, or shed by an agent that fell behind on a loaded machine (never another error); a
        # touchdown sent as one message is one request, its latency every site's.
        no_decision = figures[f"{key}.no_decision"]
        assert set(no_decision) <= {TIMEOUT, Code.OVERLOADED, Code.DEADLINE_EXCEEDED}, (profile.name, no_decision)
        assert figures[f"{key}.parts"] + sum(no_decision.values()) == profile.messages(profile.parts(quick=True))
        for what in ("e2e", "agent", "floor"):
            ladder = [_number(figures, f"{key}.{what}.{p}_us") for p in ("p50", "p99", "p999", "max")]
            assert ladder == sorted(ladder) and ladder[0] > 0, (key, what, ladder)
            assert 0 <= figures[f"{key}.{what}.over_10ms"] <= figures[f"{key}.parts"]
        # The ratios are of the figures beside them (those rounded to 0.1 us, the ratios to 0.01).
        assert _number(figures, f"{key}.ratio_e2e_over_floor_p50") == pytest.approx(
            figures[f"{key}.e2e.p50_us"] / figures[f"{key}.floor.p50_us"], rel=0.01)
        assert _number(figures, f"{key}.ratio_agent_over_models_p50") == pytest.approx(
            figures[f"{key}.agent.p50_us"] / models, rel=0.01)
        assert _number(figures, f"{key}.ratio_floor_p99_over_p50") == pytest.approx(
            figures[f"{key}.floor.p99_us"] / figures[f"{key}.floor.p50_us"], rel=0.01)
        # The models timed on the profile's own schedule, within the profile's part count and the time budget.
        at_cadence = figures[f"{key}.models_at_cadence.p50_us"]
        assert 0 < at_cadence <= figures[f"{key}.models_at_cadence.p99_us"]
        assert 1 <= figures[f"{key}.models_at_cadence.parts"] <= profile.parts(quick=True)
        assert _number(figures, f"{key}.ratio_agent_over_models_at_cadence_p50") == pytest.approx(
            figures[f"{key}.agent.p50_us"] / at_cadence, rel=0.01)
        # A part's latency from its scheduled send includes the agent's own time for it.
        assert figures[f"{key}.e2e.max_us"] >= figures[f"{key}.agent.p50_us"]
        assert figures[f"{key}.behind_schedule"] == (figures[f"{key}.late_sends"] > 0)
        parts = figures[f"{key}.parts"]
        if profile.one_message:   # only single score requests are stage-sampled (edge_agent/daemon/stages.py)
            assert figures[f"{key}.stage.samples"] == 0
            continue
        # The breakdown covers this profile's scored parts only (every part is sampled in the benchmark; a reply that
        # came too late for the client was still sampled).
        assert parts <= figures[f"{key}.stage.samples"] <= parts + no_decision.get(TIMEOUT, 0)
        for stage in STAGES:
            assert 0 <= _number(figures, f"{key}.stage.{stage}.p50_us") <= figures[f"{key}.stage.{stage}.max_us"]
        assert figures[f"{key}.stage.audit.p50_us"] > 0   # drift on
        # A part scored ahead counts 0 for its graphs, the part whose call scored it the call's time.
        ahead = figures[f"{key}.scored_ahead_share"]
        assert 0 <= ahead * parts <= parts + no_decision.get(TIMEOUT, 0)
        assert figures[f"{key}.stage.graphs.max_us"] > 0
        if ahead < 0.4:
            assert figures[f"{key}.stage.graphs.p50_us"] > 0
    assert figures["cadence.behind_schedule"] == [p.name for p in profiles
                                                  if figures[f"cadence.{p.name}.behind_schedule"]]
    assert figures["cadence.agent_exit_status"] == 0


def test_inproc_ratios_match_the_medians(quick_run):
    _, figures = quick_run
    compact = _number(figures, "inproc.compact.p50_us")
    for engine in ("sklearn", "skl2onnx"):
        ratio = _number(figures, f"inproc.ratio_{engine}_over_compact")
        assert ratio == pytest.approx(_number(figures, f"inproc.{engine}.p50_us") / compact, abs=0.051)
    assert figures["inproc.compact.max_abs_diff"] < 1e-4   # the compact graph reproduces scikit-learn
    assert any(k.endswith(".int8.p50_us") for k in figures), "no quantized variant was measured"


def test_throughput_footprint_and_machine(quick_run):
    _, figures = quick_run
    assert figures["throughput.batched_parts_per_s"] == figures["throughput.one_core.parts_per_s"]
    assert len(figures["throughput.one_core.agent_cpus"]) == 1
    assert figures["throughput.one_core.no_decision"] == 0
    assert _number(figures, "agent.rss_after_parts_mb") > 0
    assert figures["agent.rss_after_parts_count"] >= 1000
    assert figures["agent.rss_after_parts_no_decision"] == 0
    machine = figures["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"]
    assert machine["numpy"] == np.__version__ and machine["sklearn"] == sklearn.__version__
    assert machine["onnxruntime"] == onnxruntime.__version__ and machine["pyzmq"] == zmq.__version__
    assert machine["python"] == ".".join(map(str, sys.version_info[:3]))
    assert len(machine["load_before"]) == 3 and len(machine["load_after"]) == 3


def test_every_key_is_documented(quick_run):
    _, figures = quick_run
    keys_md = (REPO / "bench" / "KEYS.md").read_text()
    documented = {line.split("`")[1] for line in keys_md.splitlines() if line.startswith("| `")}
    patterns = [re.sub(r"<[a-z_]+>", "[^.]+", re.escape(d).replace(r"\<", "<").replace(r"\>", ">"))
                for d in documented]
    missing = [k for k in figures if not any(re.fullmatch(p, k) for p in patterns)]
    assert not missing, f"keys not in bench/KEYS.md: {missing}"


def test_markdown_and_plots_written(quick_run):
    out, figures = quick_run
    summary = (out / "out.md").read_text()
    assert "e2e.tcp.rate_1000" in summary and "## Targets" in summary
    assert "| steady_1 |" in summary and "Where the agent's own time goes" in summary
    for name in ("e2e_latency.png", "scaling.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _met_cells(table: str) -> dict[str, str]:
    cells = {}
    for line in table.splitlines():
        parts = [c.strip() for c in line.strip("|").split("|")]
        if len(parts) == 4 and parts[0] and parts[0] != "---":
            cells[parts[0]] = parts[3]
    return cells


def test_readme_table_met_column_follows_the_figures(quick_run):
    out, figures = quick_run
    printed = subprocess.run([sys.executable, "-m", "bench.cli", "--readme-table", str(out / "out.json")],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
    cells = _met_cells(printed)
    for target in report.TARGETS:
        measured = figures[target.key]
        expected = {"<": measured < target.value, "<=": measured <= target.value,
                    ">=": measured >= target.value}[target.comparison]
        assert cells[target.label] == ("yes" if expected else "no"), target.label
        # The tail targets carry the bare echo's own figure, from the same run, beside the agent's.
        line = next(line for line in printed.splitlines() if line.startswith(f"| {target.label} |"))
        floor = f"the bare echo itself: {report._number(figures[target.floor_key])}" if target.floor_key else None
        assert (floor in line) if floor else ("bare echo" not in line), line
    assert f"{figures['machine']['cores']} cores" in printed

    # Flip every figure to the other side of its target: the met column must flip with it.
    flipped = dict(figures)
    for target in report.TARGETS:
        passing = target.value * (0.5 if target.comparison != ">=" else 2.0)
        failing = target.value * (2.0 if target.comparison != ">=" else 0.5)
        flipped[target.key] = failing if cells[target.label] == "yes" else passing
    flipped_cells = _met_cells(report.readme_table(flipped))
    for target in report.TARGETS:
        assert flipped_cells[target.label] != cells[target.label], target.label


def test_readme_table_refuses_a_file_that_is_not_results(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    done = subprocess.run([sys.executable, "-m", "bench.cli", "--readme-table", str(bad)], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "bad.json" in done.stderr and "Traceback" not in done.stderr
