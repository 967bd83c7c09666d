"""Configuration of every program: declared constraints, one message per problem, one TOML loader.

Each config object gets a bad value and must name the field, what it expected and what it got; files with
several problems must list every one in one error, before any work starts.
"""
from __future__ import annotations

import doctest

import pytest

from edge_agent import checked
from edge_agent.collector.alerts import AlertConfig, AlertConfigError, load_alert_config
from edge_agent.collector.cli import main as collector_main
from edge_agent.collector.incidents import IncidentConfig
from edge_agent.daemon.config import (AgentConfig, BinningConfig, ConfigError, DriftConfig, LoggingConfig, MetricsConfig,
                               PatConfig, SecurityConfig, load_config)
from trainer.synth import SynthConfig
from trainer.train import TrainConfig, TrainConfigError, fit


def test_the_checked_module_example_runs():
    assert doctest.testmod(checked).failed == 0


@pytest.mark.parametrize("config", [AgentConfig(), MetricsConfig(), LoggingConfig(), PatConfig(), BinningConfig(),
                                    DriftConfig(), SecurityConfig(), AlertConfig(), IncidentConfig(), TrainConfig(),
                                    SynthConfig()],
                         ids=lambda config: type(config).__name__)
def test_every_config_object_declares_every_field_and_its_defaults_are_usable(config):
    """``problems()`` looks every field up in CONSTRAINTS, so an undeclared field is a KeyError here."""
    assert config.problems() == []


AGENT_FILES = [
    ('[agent]\nmax_batch = 0', "agent.max_batch: expected a positive number, got 0"),
    ('[agent]\nmax_batch = "many"', "agent.max_batch: expected an integer, got 'many'"),
    ('[agent]\nwatch_interval_s = -1', "agent.watch_interval_s: expected a positive number, got -1.0"),
    ('[agent]\nstage = ""', "agent.stage: expected a non-empty string, got ''"),
    ('[agent]\nyield_variant = "int4"', "agent.yield_variant: expected one of ('float32', 'int8'), got 'int4'"),
    ('[agent]\nbind = "http://x"', "agent.bind: expected tcp://host:port or ipc:///path, got 'http://x'"),
    ('[agent]\nmax_message_bytes = 2000\ntransport_max_message_bytes = 1000',
     "agent.transport_max_message_bytes: expected at least max_message_bytes (2000) so that oversized requests get "
     "an error reply, got 1000"),
    ('[metrics]\nport = 70000', "metrics.port: expected a number in [0, 65535], got 70000"),
    ('[logging]\nformat = "xml"', "logging.format: expected one of ('plain', 'json'), got 'xml'"),
    ('[pat]\nwindow = 50\nmin_parts = 60', "pat.min_parts: expected at most window (50), got 60"),
    ('[pat]\nk_sigma = 0', "pat.k_sigma: expected a positive number, got 0.0"),
    ('[pat]\ndynamic = "yes"', "pat.dynamic: expected true or false, got 'yes'"),
    ('[binning]\norder = ["gut_feeling"]', "binning.order names unknown condition(s) ['gut_feeling']"),
    ('[binning.bins]\npass = 70000', "binning.bins.pass: expected a bin number 0..65535, got 70000"),
    ('[drift]\nwindow_seconds = 0', "drift.window_seconds: expected a positive number, got 0.0"),
    ('[drift]\nspool_dir = ""', "drift.spool_dir: expected a folder for the windows not yet acknowledged, got ''"),
    ('[agnet]\nmodel = "m"', "unknown table [agnet]; expected [agent], [metrics], [logging], [pat], [binning], "
                             "[drift], [fleet], [audit], [shadow] or [security]"),
    ('[agent]\nmodle = "m"', "[agent] modle: unknown key; expected one of bind, drain_quiet_ms, "),
    ('[agent]\nbind = "tcp://*:5555"', "agent.bind: tcp://*:5555 listens on every network interface; without CURVE "
                                       "only a loopback address"),
    ('[security]\ncontrol_bind = "tcp://127.0.0.1:5556"',
     "security.control_keys: expected the public certificates (file or folder) allowed to send reload and rollback"),
    ('[security]\nscore_keys = "clients"', "security.key: expected this agent's CURVE secret certificate "
                                          "(*.key_secret) for score_keys, got ''"),
    ('[drift]\ncollector = "tcp://10.0.0.5:5560"', "drift.collector: tcp://10.0.0.5:5560 is not on this controller"),
    ('pat = 3', "pat: expected a table [pat], got 3"),
]
ALERT_FILES = [
    ("[alerts]\npsi_min_parts = 0", "alerts.psi_min_parts: expected a positive number, got 0"),
    ("[alerts]\npsi_threshold = -0.1", "alerts.psi_threshold: expected a positive number, got -0.1"),
    ("[alerts]\noutlier_margin = 2", "alerts.outlier_margin: expected a number in [0, 1], got 2.0"),
    ('[alerts]\nsilent_after_s = "15m"', "alerts.silent_after_s: expected a number, got '15m'"),
    ("[alerts]\nchange_detector = 1", "alerts.change_detector: expected true or false, got 1"),
    ("[alerts]\nhook = \"notify 'oncall\"",
     "alerts.hook: expected a command line with balanced quotes, got \"notify 'oncall\""),
    ("[alerts]\npsi = 0.2", "[alerts] psi: unknown key; expected one of change_detector, hook, hook_timeout_s, "),
    ("[alert]\npsi_threshold = 0.2", "unknown table [alert]; expected [alerts] or [incidents]"),
    ("[incidents]\ntester_psi = 0", "incidents.tester_psi: expected a positive number, got 0"),
    ("[incidents]\nfalse_alarm = 0.9", "incidents.false_alarm: expected a number in (0, 0.5), got 0.9"),
]


def _load_agent(path):
    return load_config(path, require_model=False)


@pytest.mark.parametrize("load, error, toml, message",
                         [(_load_agent, ConfigError, *case) for case in AGENT_FILES]
                         + [(load_alert_config, AlertConfigError, *case) for case in ALERT_FILES])
def test_each_bad_value_of_a_configuration_file_is_named(tmp_path, load, error, toml, message):
    path = tmp_path / "program.toml"
    path.write_text(toml + "\n")
    with pytest.raises(error) as raised:
        load(path)
    assert message in str(raised.value)
    assert str(raised.value).startswith(f"configuration ({path}) is not usable:\n  - ")


def test_where_windows_go_matters_only_when_they_are_shipped(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[drift]\nenabled = false\nspool_dir = ""\ncollector = "x"\n')
    assert _load_agent(path).drift.enabled is False


def test_a_file_with_several_problems_lists_every_one_once(tmp_path):
    """Unknown keys, wrong types, bad ranges and a missing model: one error, one line each, file and command line
    together (a command-line value replaces the file's)."""
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nmax_batch = 0\nqueue = 5\n[metrics]\nport = "x"\n[drift]\nchange_delta = 0\n'
                    '[pat]\nreset_on = "shift"\n')
    with pytest.raises(ConfigError) as raised:
        load_config(path, {"metrics.port": 0, "watch_interval_s": 0.0})
    assert str(raised.value).splitlines() == [
        f"configuration ({path} and the command line) is not usable:",
        f"  - {path}: [agent] queue: unknown key; expected one of bind, drain_quiet_ms, keep_warm_ms, max_batch, "
        "max_message_bytes, max_queued_bytes, max_request_age_ms, model, queue_length, registry, shutdown_timeout_s, "
        "slow_reply_ms, stage, stage_sample_every, transport_max_message_bytes, turn_parts, version, watch_interval_s, "
        "yield_variant",
        "  - agent.max_batch: expected a positive number, got 0",
        "  - agent.watch_interval_s: expected a positive number, got 0.0",
        "  - agent.model: a model name is required (--model or [agent] model)",
        "  - security.trusted_keys: expected the trainer's public signing key(s), a file or a folder (--trusted-keys "
        "or [security] trusted_keys); only development mode (allow_unsigned = true) serves without",
        "  - pat.reset_on: expected one of ('lot', 'sublot', 'wafer', 'never'), got 'shift'",
        "  - drift.change_delta: expected a positive number, got 0.0"]


def test_commands_that_only_talk_to_the_agent_need_no_model(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nbind = "ipc:///tmp/agent.sock"\n')
    assert load_config(path, require_model=False).bind == "ipc:///tmp/agent.sock"


def test_alert_configuration_integers_are_numbers_and_defaults_stay(tmp_path):
    path = tmp_path / "collector.toml"
    path.write_text("[alerts]\npsi_threshold = 1\nrepeat_after_s = 0\n")
    config = load_alert_config(path)
    assert config.psi_threshold == 1.0 and isinstance(config.psi_threshold, float) and config.repeat_after_s == 0.0
    assert config.psi_min_parts == AlertConfig().psi_min_parts


def test_collector_refuses_its_configuration_before_opening_the_database(tmp_path, capsys):
    path = tmp_path / "collector.toml"
    path.write_text("[alerts]\npsi_min_parts = 0\nhook_timeout_s = 0\n")
    db = tmp_path / "stats.sqlite"
    assert collector_main(["run", "--db", str(db), "--config", str(path), "--metrics-port", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"edge-collector: error: configuration ({path}) is not usable:",
        "  - alerts.psi_min_parts: expected a positive number, got 0",
        "  - alerts.hook_timeout_s: expected a positive number, got 0.0"]
    assert not db.exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"n_trees": 0}, "n_trees: expected a positive number, got 0"),
    ({"n_trees": 2.5}, "n_trees: expected an integer, got 2.5"),
    ({"max_samples": 0}, "max_samples: expected 'auto', a positive integer or a number in (0, 1], got 0"),
    ({"max_samples": "all"}, "max_samples: expected 'auto', a positive integer or a number in (0, 1], got 'all'"),
    ({"max_features": 0.0}, "max_features: expected a positive integer or a number in (0, 1], got 0.0"),
    ({"contamination": 0.7}, "contamination: expected 'auto' or a number in (0, 0.5], got 0.7"),
    ({"target_outlier_rate": 2}, "target_outlier_rate: expected a number in (0, 0.5), got 2"),
    ({"train_outlier_on": "failing"}, "train_outlier_on: expected one of ('passing', 'all'), got 'failing'"),
    ({"yield_model": "xgboost"}, "yield_model: expected one of ('auto', 'random_forest', 'logistic', 'mlp', 'hist_gradient_boosting'), got 'xgboost'"),
    ({"yield_trees": 0}, "yield_trees: expected a positive number, got 0"),
    ({"yield_max_depth": 0}, "yield_max_depth: expected None or a positive integer, got 0"),
    ({"yield_threshold": 1.0}, "yield_threshold: expected a number in (0, 1), got 1.0"),
    ({"yield_label": ""}, "yield_label: expected None or a column name, got ''"),
    ({"holdout_fraction": 1.5}, "holdout_fraction: expected a number in (0, 1), got 1.5"),
    ({"pat_k_sigma": -6}, "pat_k_sigma: expected a positive number, got -6"),
    ({"drift_bins": 1}, "drift_bins: expected a number >= 2, got 1"),
    ({"seed": -1}, "seed: expected a number in [0, 4294967295], got -1"),
    ({"name": "my model"}, "name: expected a model name: letters, digits, '.', '_' or '-', first a letter or digit, "
                           "at most 128 characters, got 'my model'"),
])
def test_training_configuration_names_each_bad_value(kwargs, message):
    assert TrainConfig(**kwargs).problems() == [message]


def test_fit_checks_its_configuration_before_it_looks_at_the_table():
    """No table at all: the configuration's problems come first, as one error listing each."""
    with pytest.raises(TrainConfigError) as raised:
        fit(None, TrainConfig(n_trees=0, holdout_fraction=1.5))
    assert str(raised.value).splitlines() == ["configuration (TrainConfig) is not usable:",
                                              "  - n_trees: expected a positive number, got 0",
                                              "  - holdout_fraction: expected a number in (0, 1), got 1.5"]
    assert isinstance(raised.value, ValueError)
