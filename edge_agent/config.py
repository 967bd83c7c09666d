"""Agent configuration: defaults, a TOML file, then command-line overrides (in that order of precedence).

Example ``agent.toml`` (every key optional; these are the defaults)::

    [agent]
    registry = "models"              # registry root folder
    model = ""                       # model name (required here or on the command line)
    stage = "production"             # stage to follow; the agent reloads when it points to a new version
    version = ""                     # pin one version instead of following the stage
    bind = "tcp://127.0.0.1:5555"    # tcp://host:port or ipc:///path
    bind_all_interfaces = false      # must be true to bind tcp://*:port or 0.0.0.0 (no authentication!)
    yield_variant = "float32"        # or "int8" where the package ships one
    max_message_bytes = 1048576      # larger requests get a message_too_large error reply
    transport_max_message_bytes = 4194304   # larger still: ZeroMQ drops the connection (ZMQ_MAXMSGSIZE)
    max_batch = 500                  # parts per score_batch
    queue_length = 1000              # ZeroMQ high-water marks (messages) per client, both directions
    watch_interval_s = 2.0           # how often the followed stage is checked
    shutdown_timeout_s = 5.0         # SIGTERM: answer what arrived, for at most this long
    drain_quiet_ms = 100             # SIGTERM: stop after the socket was quiet this long

    [metrics]
    port = 9464                      # Prometheus /metrics; 0 turns it off
    host = "127.0.0.1"

    [logging]
    format = "plain"                 # or "json" (one JSON object per line)
    level = "INFO"

    [pat]
    dynamic = true
    window = 100                     # parts per (head, site) rolling window
    min_parts = 30                   # warm-up baseline before dynamic PAT acts
    k_sigma = 6.0
    refresh_parts = 25               # every test's dynamic limits are at most this many parts old
    reset_on = "lot"                 # "lot", "wafer" or "never": a new one restarts a site's window
    max_sites = 512

    [binning]
    order = ["static_pat", "dynamic_pat", "ml_outlier", "predicted_fail"]
    [binning.bins]
    pass = 1
    static_pat = 21
    dynamic_pat = 22
    ml_outlier = 23
    predicted_fail = 24

    [drift]                          # streaming drift statistics, shipped to the fleet collector
    enabled = true
    agent_id = ""                    # default: the host name
    tester = ""                      # default: the agent id
    collector = "tcp://127.0.0.1:5560"
    window_parts = 5000              # a window closes after this many parts or seconds, whichever first
    window_seconds = 300.0
    spool_dir = "edge-agent-spool"   # unacknowledged windows wait here (a daemon: /var/lib/edge-agent/spool)
    spool_max_messages = 10000       # beyond either bound the oldest windows are dropped, counted and reported
    spool_max_bytes = 268435456
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .binning import CONDITIONS, BinPolicy, check_policy
from .errors import EdgeError
from .settings import read_toml

LOG_FORMATS = ("plain", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
RESET_ON = ("lot", "wafer", "never")
YIELD_VARIANTS = ("float32", "int8")
_ALL_INTERFACES = ("*", "0.0.0.0", "[::]", "::")


class ConfigError(EdgeError):
    """A configuration value that cannot be used; names the file (if any) and the key."""


@dataclass
class MetricsConfig:
    port: int = 9464
    host: str = "127.0.0.1"


@dataclass
class LoggingConfig:
    format: str = "plain"
    level: str = "INFO"


@dataclass
class PatConfig:
    dynamic: bool = True
    window: int = 100
    min_parts: int = 30
    k_sigma: float = 6.0
    refresh_parts: int = 25
    reset_on: str = "lot"
    max_sites: int = 512


@dataclass
class BinningConfig:
    order: list[str] = field(default_factory=lambda: list(CONDITIONS))
    bins: dict[str, int] = field(default_factory=lambda: dict(BinPolicy().bins))

    def policy(self) -> BinPolicy:
        return BinPolicy(tuple(self.order), dict(self.bins))


@dataclass
class DriftConfig:
    """``[drift]`` in agent.toml. Every field is a plain str/int/float/bool so the agent's loader can set it."""

    enabled: bool = True
    agent_id: str = ""                         # default: the host name
    tester: str = ""                           # default: the agent id
    collector: str = "tcp://127.0.0.1:5560"    # the collector's ROUTER
    window_parts: int = 5000                   # a window closes after this many parts ...
    window_seconds: float = 300.0              # ... or this long, whichever comes first
    max_sites: int = 512                       # (head, site) pairs tracked; parts of more sites are counted apart
    spool_dir: str = "edge-agent-spool"        # windows wait here until acknowledged (a daemon: /var/lib/...)
    spool_max_messages: int = 10_000
    spool_max_bytes: int = 256 << 20
    ack_timeout_s: float = 5.0
    queue_length: int = 1000                   # windows waiting for the shipper thread
    change_delta: float = 0.25                 # Page-Hinkley on the outlier score, in reference sigmas
    change_threshold: float = 25.0
    change_min_parts: int = 30

    def problems(self) -> list[str]:
        """What is wrong, as "drift.<key>: ..." lines (empty when usable)."""
        problems = []
        for name in ("window_parts", "max_sites", "spool_max_messages", "spool_max_bytes", "queue_length",
                     "change_min_parts"):
            if getattr(self, name) < 1:
                problems.append(f"drift.{name}: expected a positive number, got {getattr(self, name)}")
        for name in ("window_seconds", "ack_timeout_s", "change_delta", "change_threshold"):
            if not getattr(self, name) > 0:
                problems.append(f"drift.{name}: expected a positive number, got {getattr(self, name)}")
        scheme, sep, _ = self.collector.partition("://")
        if self.enabled and (not sep or scheme not in ("tcp", "ipc")):
            problems.append(f"drift.collector: expected tcp://host:port or ipc:///path, got {self.collector!r}")
        if self.enabled and not self.spool_dir:
            problems.append("drift.spool_dir: a folder is required")
        return problems


@dataclass
class AgentConfig:
    registry: str = "models"
    model: str = ""
    stage: str = "production"
    version: str = ""
    bind: str = "tcp://127.0.0.1:5555"
    bind_all_interfaces: bool = False
    yield_variant: str = "float32"
    max_message_bytes: int = 1 << 20
    transport_max_message_bytes: int = 4 << 20
    max_batch: int = 500
    queue_length: int = 1000
    watch_interval_s: float = 2.0
    shutdown_timeout_s: float = 5.0
    drain_quiet_ms: int = 100
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    pat: PatConfig = field(default_factory=PatConfig)
    binning: BinningConfig = field(default_factory=BinningConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)


_SECTIONS = {"metrics": MetricsConfig, "logging": LoggingConfig, "pat": PatConfig, "binning": BinningConfig,
             "drift": DriftConfig}


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                require_model: bool = True) -> AgentConfig:
    """Defaults, then the TOML file at ``path``, then ``overrides`` ({"bind": ..., "metrics.port": ...}).

    ``require_model=False`` for commands that only talk to a running agent (they need the bind address).
    """
    config = AgentConfig()
    source = "defaults"
    if path is not None:
        source = str(path)
        _apply_document(config, read_toml(path, ConfigError), source)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.rpartition(".")
        target = getattr(config, section) if section else config
        _set(target, key, value, f"command line --{dotted.replace('.', '-').replace('_', '-')}")
    _check(config, source, require_model)
    return config




def _apply_document(config: AgentConfig, document: dict, source: str) -> None:
    for name, table in document.items():
        if name == "agent":
            target = config
        elif name in _SECTIONS:
            target = getattr(config, name)
        else:
            raise ConfigError(f"{source}: unknown section [{name}]; expected [agent] or "
                              f"{', '.join(f'[{s}]' for s in _SECTIONS)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {name} must be a table [{name}], got a {type(table).__name__}")
        for key, value in table.items():
            _set(target, key, value, f"{source}: [{name}] {key}")


def _set(target: object, key: str, value: Any, where: str) -> None:
    known = {f.name: f for f in dataclasses.fields(target) if f.name not in _SECTIONS}
    if key not in known:
        raise ConfigError(f"{where}: unknown key; expected one of {', '.join(sorted(known))}")
    default = getattr(target, key)
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {_type_name(expected)}, got {value!r}")
    # A partial [binning.bins] table changes those bins only.
    setattr(target, key, {**default, **value} if expected is dict else value)


def _check(config: AgentConfig, source: str, require_model: bool) -> None:
    problems = []
    if require_model and not config.model:
        problems.append("agent.model: a model name is required (--model or [agent] model)")
    if not config.stage:
        problems.append("agent.stage: must name a stage")
    problems += _bind_problems(config.bind, config.bind_all_interfaces)
    for name in ("max_message_bytes", "transport_max_message_bytes", "max_batch", "queue_length", "drain_quiet_ms"):
        if getattr(config, name) < 1:
            problems.append(f"agent.{name}: expected a positive number, got {getattr(config, name)}")
    if config.transport_max_message_bytes < config.max_message_bytes:
        problems.append(f"agent.transport_max_message_bytes ({config.transport_max_message_bytes}) must be at least "
                        f"max_message_bytes ({config.max_message_bytes}), or oversized requests get no error reply")
    for name in ("watch_interval_s", "shutdown_timeout_s"):
        if not getattr(config, name) > 0:
            problems.append(f"agent.{name}: expected a positive number of seconds, got {getattr(config, name)}")
    if config.yield_variant not in YIELD_VARIANTS:
        problems.append(f"agent.yield_variant: expected one of {YIELD_VARIANTS}, got {config.yield_variant!r}")
    if not 0 <= config.metrics.port <= 65535:
        problems.append(f"metrics.port: expected 0 (off) or a TCP port, got {config.metrics.port}")
    if config.logging.format not in LOG_FORMATS:
        problems.append(f"logging.format: expected one of {LOG_FORMATS}, got {config.logging.format!r}")
    if config.logging.level.upper() not in LOG_LEVELS:
        problems.append(f"logging.level: expected one of {LOG_LEVELS}, got {config.logging.level!r}")
    pat = config.pat
    if not 2 <= pat.min_parts <= pat.window:
        problems.append(f"pat.min_parts: expected 2 <= min_parts <= window ({pat.window}), got {pat.min_parts}")
    if pat.refresh_parts < 1 or pat.max_sites < 1 or not pat.k_sigma > 0:
        problems.append("pat.refresh_parts, pat.max_sites and pat.k_sigma must be positive")
    if pat.reset_on not in RESET_ON:
        problems.append(f"pat.reset_on: expected one of {RESET_ON}, got {pat.reset_on!r}")
    problems += [f"binning.{p}" for p in check_policy(config.binning.order, config.binning.bins)]
    problems += config.drift.problems()
    if problems:
        raise ConfigError(f"configuration ({source}) is not usable:\n" + "\n".join(f"  - {p}" for p in problems))


def _bind_problems(bind: str, all_interfaces: bool) -> list[str]:
    scheme, sep, rest = bind.partition("://")
    if not sep or scheme not in ("tcp", "ipc"):
        return [f"agent.bind: expected tcp://host:port or ipc:///path, got {bind!r}"]
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not port.isdigit() or not 0 < int(port) < 65536:
            return [f"agent.bind: expected tcp://host:port with a port 1..65535, got {bind!r}"]
        if host in _ALL_INTERFACES and not all_interfaces:
            return [f"agent.bind: {bind} listens on every network interface and the protocol has no "
                    "authentication; set [agent] bind_all_interfaces = true if that is really wanted"]
    return []


def _type_name(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(kind, kind.__name__)
