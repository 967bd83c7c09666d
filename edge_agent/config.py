"""Agent configuration: defaults, a TOML file, then command-line overrides (in that order of precedence), checked
against the constraints each section declares (``edge_agent.settings``) before the agent loads a model.

Example ``agent.toml`` (every key optional; these are the defaults)::

    [agent]
    registry = "models"              # registry root folder
    model = ""                       # model name (required here or on the command line)
    stage = "production"             # stage to follow; the agent reloads when it points to a new version
    version = ""                     # pin one version instead of following the stage
    bind = "tcp://127.0.0.1:5555"    # tcp://host:port or ipc:///path
    bind_all_interfaces = false      # must be true to bind tcp://*:port or 0.0.0.0 (no authentication!)
    yield_variant = "float32"        # or "int8" where the package ships one
    max_message_bytes = 0            # larger requests get message_too_large; 0: the model's largest valid request
    transport_max_message_bytes = 0  # larger still: ZeroMQ drops the connection; 0: max_message_bytes + 64 KiB
    max_batch = 500                  # parts per score_batch
    queue_length = 1000              # upper bound of ZeroMQ's high-water marks (sized in bytes: edge_agent/limits.py)
    turn_parts = 16                  # parts of a score_batch per turn while other clients wait (else all at once)
    max_request_age_ms = 1000        # a request waiting in the agent longer is answered deadline_exceeded; 0: never
    max_queued_bytes = 67108864      # requests of all clients waiting in the agent (each client's first always gets in)
    watch_interval_s = 2.0           # how often the followed stage is checked
    shutdown_timeout_s = 5.0         # SIGTERM: answer what arrived, for at most this long
    drain_quiet_ms = 100             # SIGTERM: stop after the socket was quiet this long
    stage_sample_every = 100         # time every Nth request's stages, kept if a score (health: stages); 0: never
    keep_warm_ms = 5                 # idle this long, the last score request is rehearsed (warm caches); 0: never

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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .binning import CONDITIONS, BinPolicy, check_policy
from .errors import EdgeError
from .settings import NON_EMPTY, Checked, Instance, Interval, OneOf, Rule, load

LOG_FORMATS = ("plain", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
RESET_ON = ("lot", "wafer", "never")
YIELD_VARIANTS = ("float32", "int8")
ENDPOINT_SCHEMES = ("tcp", "ipc")
_ALL_INTERFACES = ("*", "0.0.0.0", "[::]", "::")

POSITIVE_INT = [Interval(int, 1, None)]
NON_NEGATIVE_INT = [Interval(int, 0, None)]
POSITIVE = [Interval(float, 0, None, closed="neither")]
FLAG = [Instance(bool)]
TEXT = [Instance(str)]


class ConfigError(EdgeError):
    """A configuration value that cannot be used; names the file (if any) and the key."""


class _AgentSection(Checked):
    ERROR = ConfigError


@dataclass
class MetricsConfig(_AgentSection):
    SCOPE = "metrics"
    CONSTRAINTS = {"port": [Interval(int, 0, 65535)], "host": [NON_EMPTY]}   # port 0 turns /metrics off

    port: int = 9464
    host: str = "127.0.0.1"


@dataclass
class LoggingConfig(_AgentSection):
    SCOPE = "logging"
    CONSTRAINTS = {"format": [OneOf(*LOG_FORMATS)], "level": [OneOf(*LOG_LEVELS, ignore_case=True)]}

    format: str = "plain"
    level: str = "INFO"


def _min_parts_within_window(pat: PatConfig) -> list[str]:
    return [] if pat.min_parts <= pat.window else [f"min_parts: expected at most window ({pat.window}), "
                                                   f"got {pat.min_parts}"]


@dataclass
class PatConfig(_AgentSection):
    SCOPE = "pat"
    CONSTRAINTS = {"dynamic": FLAG, "window": [Interval(int, 2, None)], "min_parts": [Interval(int, 2, None)],
                   "k_sigma": POSITIVE, "refresh_parts": POSITIVE_INT, "reset_on": [OneOf(*RESET_ON)],
                   "max_sites": POSITIVE_INT}
    RULES = (Rule(("min_parts", "window"), _min_parts_within_window),)

    dynamic: bool = True
    window: int = 100
    min_parts: int = 30
    k_sigma: float = 6.0
    refresh_parts: int = 25
    reset_on: str = "lot"
    max_sites: int = 512


@dataclass
class BinningConfig(_AgentSection):
    SCOPE = "binning"
    CONSTRAINTS = {"order": [Instance(list)], "bins": [Instance(dict)]}
    RULES = (Rule(("order", "bins"), lambda binning: check_policy(binning.order, binning.bins)),)

    order: list[str] = field(default_factory=lambda: list(CONDITIONS))
    bins: dict[str, int] = field(default_factory=lambda: dict(BinPolicy().bins))

    def policy(self) -> BinPolicy:
        return BinPolicy(tuple(self.order), dict(self.bins))


def _endpoint_problems(name: str, endpoint: str) -> list[str]:
    scheme, sep, _ = endpoint.partition("://")
    if not sep or scheme not in ENDPOINT_SCHEMES:
        return [f"{name}: expected tcp://host:port or ipc:///path, got {endpoint!r}"]
    return []


def check_endpoint(name: str, endpoint: str) -> str:
    """``endpoint`` when a ZeroMQ socket can connect to it; ConfigError naming ``name`` (a command-line option)."""
    problems = _endpoint_problems(name, endpoint)
    if problems:
        raise ConfigError(problems[0])
    return endpoint


def _shipping_problems(drift: DriftConfig) -> list[str]:
    """Where windows go and wait matters only when they are shipped."""
    if not drift.enabled:
        return []
    spool = [] if drift.spool_dir else ["spool_dir: expected a folder for the windows not yet acknowledged, got ''"]
    return _endpoint_problems("collector", drift.collector) + spool


@dataclass
class DriftConfig(_AgentSection):
    """``[drift]`` in agent.toml. Every field is a plain str/int/float/bool so the agent's loader can set it."""

    SCOPE = "drift"
    CONSTRAINTS = {"enabled": FLAG, "agent_id": TEXT, "tester": TEXT, "collector": TEXT,
                   "window_parts": POSITIVE_INT, "window_seconds": POSITIVE, "max_sites": POSITIVE_INT,
                   "spool_dir": TEXT, "spool_max_messages": POSITIVE_INT, "spool_max_bytes": POSITIVE_INT,
                   "ack_timeout_s": POSITIVE, "queue_length": POSITIVE_INT, "change_delta": POSITIVE,
                   "change_threshold": POSITIVE, "change_min_parts": POSITIVE_INT}
    RULES = (Rule(("enabled", "collector", "spool_dir"), _shipping_problems),)

    enabled: bool = True
    agent_id: str = ""                         # default: the host name
    tester: str = ""                           # default: the agent id
    collector: str = "tcp://127.0.0.1:5560"    # the collector's ROUTER
    window_parts: int = 5000                   # a window closes after this many parts ...
    window_seconds: float = 300.0              # ... or this long, whichever comes first
    max_sites: int = 512                       # (head, site) pairs tracked; the least recently tested makes room
    spool_dir: str = "edge-agent-spool"        # windows wait here until acknowledged (a daemon: /var/lib/...)
    spool_max_messages: int = 10_000
    spool_max_bytes: int = 256 << 20
    ack_timeout_s: float = 5.0
    queue_length: int = 1000                   # windows waiting for the shipper thread
    change_delta: float = 0.25                 # Page-Hinkley on the outlier score, in reference sigmas
    change_threshold: float = 25.0
    change_min_parts: int = 30


def _bind_problems(agent: AgentConfig) -> list[str]:
    bind = agent.bind
    scheme, _, rest = bind.partition("://")
    if scheme != "tcp":
        return _endpoint_problems("bind", bind)
    host, colon, port = rest.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        return [f"bind: expected tcp://host:port with a port 1..65535, got {bind!r}"]
    if host in _ALL_INTERFACES and not agent.bind_all_interfaces:
        return [f"bind: {bind} listens on every network interface and the protocol has no authentication; "
                "set [agent] bind_all_interfaces = true if that is really wanted"]
    return []


def _room_for_error_replies(agent: AgentConfig) -> list[str]:
    """Both sizes given: the transport cap must leave room for message_too_large replies (0 derives a size)."""
    if not agent.transport_max_message_bytes or agent.transport_max_message_bytes >= agent.max_message_bytes:
        return []
    return [f"transport_max_message_bytes: expected at least max_message_bytes ({agent.max_message_bytes}) so that "
            f"oversized requests get an error reply, got {agent.transport_max_message_bytes}"]


# The daemon serves a model; commands that only talk to a running daemon need its bind address alone.
MODEL_REQUIRED = Rule(("model",), lambda agent: [] if agent.model else
                      ["model: a model name is required (--model or [agent] model)"])


@dataclass
class AgentConfig(_AgentSection):
    SCOPE = "agent"
    CONSTRAINTS = {"registry": [NON_EMPTY], "model": TEXT, "stage": [NON_EMPTY], "version": TEXT, "bind": TEXT,
                   "bind_all_interfaces": FLAG, "yield_variant": [OneOf(*YIELD_VARIANTS)],
                   "max_message_bytes": NON_NEGATIVE_INT, "transport_max_message_bytes": NON_NEGATIVE_INT,
                   "max_batch": POSITIVE_INT, "queue_length": POSITIVE_INT, "turn_parts": POSITIVE_INT,
                   "max_request_age_ms": NON_NEGATIVE_INT, "max_queued_bytes": POSITIVE_INT,
                   "watch_interval_s": POSITIVE, "shutdown_timeout_s": POSITIVE, "drain_quiet_ms": POSITIVE_INT,
                   "stage_sample_every": NON_NEGATIVE_INT, "keep_warm_ms": NON_NEGATIVE_INT}
    RULES = (Rule(("bind", "bind_all_interfaces"), _bind_problems),
             Rule(("max_message_bytes", "transport_max_message_bytes"), _room_for_error_replies))

    registry: str = "models"
    model: str = ""
    stage: str = "production"
    version: str = ""
    bind: str = "tcp://127.0.0.1:5555"
    bind_all_interfaces: bool = False
    yield_variant: str = "float32"
    max_message_bytes: int = 0                 # 0: the served model's largest valid request (edge_agent/limits.py)
    transport_max_message_bytes: int = 0       # 0: max_message_bytes + 64 KiB
    max_batch: int = 500
    queue_length: int = 1000                   # upper bound of ZeroMQ's high-water marks, which are sized in bytes
    turn_parts: int = 16                       # parts of a score_batch per turn while other clients wait
    max_request_age_ms: int = 1000             # 0: requests never expire in the agent's queue
    max_queued_bytes: int = 64 << 20
    watch_interval_s: float = 2.0
    shutdown_timeout_s: float = 5.0
    drain_quiet_ms: int = 100
    stage_sample_every: int = 100              # edge_agent/stages.py; 0: no per-stage timing
    keep_warm_ms: int = 5                      # server.py _rehearse; 0: the serving thread sleeps until a request
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    pat: PatConfig = field(default_factory=PatConfig)
    binning: BinningConfig = field(default_factory=BinningConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                require_model: bool = True) -> AgentConfig:
    """Defaults, then the TOML file at ``path``, then ``overrides`` ({"bind": ..., "metrics.port": ...}), checked.

    ``require_model=False`` for commands that only talk to a running agent (they need the bind address).
    """
    return load(AgentConfig(), path, overrides, also=(MODEL_REQUIRED,) if require_model else ())
