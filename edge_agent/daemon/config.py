"""Agent configuration: defaults, a TOML file, then command-line overrides (in that order of precedence), checked
against the constraints each section declares (``edge_agent.checked``) before the agent loads a model.

Example ``agent.toml`` (every key optional; these are the defaults)::

    [agent]
    registry = "models"              # registry root folder
    model = ""                       # model name (required here or on the command line)
    stage = "production"             # stage to follow; the agent reloads when it points to a new version
    version = ""                     # pin one version instead of following the stage
    bind = "tcp://127.0.0.1:5555"    # tcp://host:port or ipc:///path; any other host than loopback needs score_keys
    yield_variant = "float32"        # or "int8" where the package ships one
    max_message_bytes = 0            # larger requests get message_too_large; 0: the model's largest valid request
    transport_max_message_bytes = 0  # larger still: ZeroMQ drops the connection; 0: max_message_bytes + 64 KiB
    max_batch = 500                  # parts per score_batch
    queue_length = 1000              # upper bound of ZeroMQ's high-water marks (sized in bytes: edge_agent/daemon/limits.py)
    turn_parts = 16                  # parts of a score_batch per turn while other clients wait (else all at once)
    max_request_age_ms = 1000        # a request waiting in the agent longer is answered deadline_exceeded; 0: never
    max_queued_bytes = 67108864      # requests of all clients waiting in the agent (each client's first always gets in)
    watch_interval_s = 2.0           # how often the followed stage is checked
    shutdown_timeout_s = 5.0         # SIGTERM: answer what arrived, for at most this long
    drain_quiet_ms = 100             # SIGTERM: stop after the socket was quiet this long
    stage_sample_every = 100         # time every Nth request's stages, kept if a score (health: stages); 0: never
    keep_warm_ms = 5                 # idle this long, the last score request is rehearsed (warm caches), and
                                     # once just before the next touchdown is due; 0: never
    slow_reply_ms = 5.0              # a reply later than this is kept with its causes (health: slow_replies); 0: off

    [metrics]
    port = 9464                      # Prometheus /metrics; 0 turns it off
    host = "127.0.0.1"

    [logging]
    format = "plain"                 # or "json" (one JSON object per line)
    level = "INFO"

    [pat]
    dynamic = true
    window = 100                     # parts per (head, site) rolling window
    min_parts = 30                   # warm-up: after a restart a site has no dynamic limits for this many parts
    k_sigma = 6.0                    # each test's rule (shape, resolution floor, widening) is the manifest's
    refresh_parts = 25               # every test's dynamic limits are at most this many parts old
    reset_on = "wafer"               # what restarts a site's window: "lot", "sublot" (lot or sublot), "wafer"
                                     # (lot, sublot or wafer changed) or "never"
    max_sites = 512

    [binning]
    order = ["static_pat", "dynamic_pat", "ml_outlier", "predicted_fail"]
    min_readings_share = 0.5         # a part with readings for fewer of the model's tests: insufficient_readings
    [binning.bins]
    pass = 1
    static_pat = 21
    dynamic_pat = 22
    ml_outlier = 23
    predicted_fail = 24
    insufficient_readings = 25

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

    [fleet]                          # packages from the registry service instead of a registry folder
    service = ""                     # its endpoint (tcp://host:port); set: [agent] registry/stage/version are not used
    service_key = ""                 # its public certificate: requests go over CURVE with [security] key
    cache_dir = "edge-agent-cache"   # the packages fetched, a registry layout (a daemon: /var/lib/edge-agent/cache)
    cache_versions = 3               # per model: the champion, the previous one (instant rollback), a challenger
    poll_interval_s = 10.0           # how often the assignment is asked for
    request_timeout_s = 5.0          # no reply in this long: the service is unreachable (offline: serve on)
    chunk_bytes = 262144             # bytes per chunk request

    [audit]                          # every decision, shipped to the collector with the drift windows
    enabled = true                   # needs [drift] enabled (the collector and the agent id are the drift link's)
    spool_dir = ""                   # default: [drift] spool_dir + "-audit"; acknowledged batches move to its log/
    batch_parts = 1000               # a batch closes after this many decisions ...
    batch_seconds = 10.0             # ... or this long (when the agent is idle)
    queue_batches = 100              # batches waiting for the audit shipper thread
    spool_max_messages = 10000       # beyond either bound the oldest batches are dropped, counted and alerted
    spool_max_bytes = 268435456
    log_max_bytes = 268435456        # the local log of acknowledged batches; the oldest segments rotate out

    [shadow]                         # a challenger the fleet assigns is scored beside the champion
    queue_parts = 4096               # parts waiting for the shadow thread; beyond it parts are skipped (counted)
    batch_parts = 64                 # parts per challenger onnxruntime call

    [security]                       # keys and who may do what: docs/security.md
    key = ""                         # this agent's CURVE secret certificate (*.key_secret)
    collector_key = ""               # the collector's public certificate: drift windows go over CURVE
    control_bind = ""                # the control socket (CURVE) for reload and rollback; "": no one may send them
    control_keys = ""                # public certificates (file or folder) allowed on the control socket
    score_keys = ""                  # public certificates allowed on the score socket; set: it is a CURVE socket
    trusted_keys = ""                # the trainer's public signing key(s) (file or folder); required to serve ...
    allow_unsigned = false           # ... unless this DEVELOPMENT MODE, which serves unsigned packages
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checked import NON_EMPTY, Checked, Instance, Interval, OneOf, Rule, load
from ..errors import EdgeError
from ..wire.links import is_local, listen_problems
from .binning import CONDITIONS, BinPolicy, check_policy
from .pat import GROUPS

LOG_FORMATS = ("plain", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
RESET_ON = tuple(GROUPS)   # ("lot", "sublot", "wafer", "never")
YIELD_VARIANTS = ("float32", "int8")
ENDPOINT_SCHEMES = ("tcp", "ipc")

POSITIVE_INT = [Interval(int, 1, None)]
NON_NEGATIVE_INT = [Interval(int, 0, None)]
POSITIVE = [Interval(float, 0, None, closed="neither")]
NON_NEGATIVE = [Interval(float, 0, None)]
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
    reset_on: str = "wafer"
    max_sites: int = 512


@dataclass
class BinningConfig(_AgentSection):
    SCOPE = "binning"
    CONSTRAINTS = {"order": [Instance(list)], "bins": [Instance(dict)],
                   "min_readings_share": [Interval(float, 0, 1, closed="right")]}
    RULES = (Rule(("order", "bins"), lambda binning: check_policy(binning.order, binning.bins)),)

    order: list[str] = field(default_factory=lambda: list(CONDITIONS))
    bins: dict[str, int] = field(default_factory=lambda: dict(BinPolicy().bins))
    min_readings_share: float = 0.5

    def policy(self) -> BinPolicy:
        return BinPolicy(tuple(self.order), dict(self.bins), self.min_readings_share)


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


@dataclass
class FollowerConfig(_AgentSection):
    """``[fleet]``: where the agent's follower (edge_agent/fleet/follower.py) fetches packages when the registry
    service serves them."""

    SCOPE = "fleet"
    CONSTRAINTS = {"service": TEXT, "service_key": TEXT, "cache_dir": [NON_EMPTY], "cache_versions": [Interval(int, 2,
                   None)], "poll_interval_s": POSITIVE, "request_timeout_s": POSITIVE,
                   "chunk_bytes": [Interval(int, 1024, 4 << 20)]}
    RULES = (Rule(("service",), lambda fleet: _endpoint_problems("service", fleet.service) if fleet.service else []),)

    service: str = ""
    service_key: str = ""
    cache_dir: str = "edge-agent-cache"
    cache_versions: int = 3
    poll_interval_s: float = 10.0
    request_timeout_s: float = 5.0
    chunk_bytes: int = 256 << 10


@dataclass
class AuditConfig(_AgentSection):
    """``[audit]``: every decision recorded and shipped (edge_agent/daemon/audit.py)."""

    SCOPE = "audit"
    CONSTRAINTS = {"enabled": FLAG, "spool_dir": TEXT, "batch_parts": POSITIVE_INT, "batch_seconds": POSITIVE,
                   "queue_batches": POSITIVE_INT, "spool_max_messages": POSITIVE_INT, "spool_max_bytes": POSITIVE_INT,
                   "log_max_bytes": POSITIVE_INT}

    enabled: bool = True
    spool_dir: str = ""
    batch_parts: int = 1000
    batch_seconds: float = 10.0
    queue_batches: int = 100
    spool_max_messages: int = 10_000
    spool_max_bytes: int = 256 << 20
    log_max_bytes: int = 256 << 20


@dataclass
class ShadowConfig(_AgentSection):
    """``[shadow]``: the challenger's queue (edge_agent/daemon/shadow.py)."""

    SCOPE = "shadow"
    CONSTRAINTS = {"queue_parts": POSITIVE_INT, "batch_parts": POSITIVE_INT}

    queue_parts: int = 4096
    batch_parts: int = 64


def _key_problems(security: SecurityConfig) -> list[str]:
    uses = [what for what, given in (("collector_key", security.collector_key), ("control_bind", security.control_bind),
                                     ("score_keys", security.score_keys)) if given]
    if uses and not security.key:
        return [f"key: expected this agent's CURVE secret certificate (*.key_secret) for {', '.join(uses)}, got ''"]
    return []


def _control_problems(security: SecurityConfig) -> list[str]:
    if not security.control_bind:
        return []
    if not security.control_keys:
        return ["control_keys: expected the public certificates (file or folder) allowed to send reload and rollback "
                "on control_bind, got ''"]
    return listen_problems("control_bind", security.control_bind, curve=True)


@dataclass
class SecurityConfig(_AgentSection):
    """``[security]``: the agent's CURVE keys, who may reach which socket, and whose package signatures count."""

    SCOPE = "security"
    CONSTRAINTS = {"key": TEXT, "collector_key": TEXT, "control_bind": TEXT, "control_keys": TEXT, "score_keys": TEXT,
                   "trusted_keys": TEXT, "allow_unsigned": FLAG}
    RULES = (Rule(("key", "collector_key", "control_bind", "score_keys"), _key_problems),
             Rule(("control_bind", "control_keys"), _control_problems))

    key: str = ""
    collector_key: str = ""
    control_bind: str = ""
    control_keys: str = ""
    score_keys: str = ""
    trusted_keys: str = ""
    allow_unsigned: bool = False


def _bind_problems(agent: AgentConfig) -> list[str]:
    """Without CURVE (score_keys) the score socket listens on loopback or ipc only."""
    return listen_problems("bind", agent.bind, curve=bool(agent.security.score_keys))


def _upstream_problems(agent: AgentConfig) -> list[str]:
    """Drift windows that leave this controller travel over CURVE."""
    drift = agent.drift
    if not drift.enabled or agent.security.collector_key or is_local(drift.collector):
        return []
    return [f"collector: {drift.collector} is not on this controller; set [security] collector_key (the collector's "
            "public certificate) and key, so that the drift windows travel over CURVE"]


def _service_problems(agent: AgentConfig) -> list[str]:
    """Packages that come from another machine travel over CURVE, with this agent's key."""
    fleet = agent.fleet
    if not fleet.service or is_local(fleet.service) or (fleet.service_key and agent.security.key):
        return []
    return [f"service: {fleet.service} is not on this controller; set service_key (the registry service's public "
            "certificate) and [security] key, so that packages travel over CURVE"]


def _room_for_error_replies(agent: AgentConfig) -> list[str]:
    """Both sizes given: the transport cap must leave room for message_too_large replies (0 derives a size)."""
    if not agent.transport_max_message_bytes or agent.transport_max_message_bytes >= agent.max_message_bytes:
        return []
    return [f"transport_max_message_bytes: expected at least max_message_bytes ({agent.max_message_bytes}) so that "
            f"oversized requests get an error reply, got {agent.transport_max_message_bytes}"]


# The daemon serves a model, signed by a trusted key; commands that only talk to a running daemon need its
# addresses alone.
SERVING_RULES = (Rule(("model",), lambda agent: [] if agent.model else
                      ["model: a model name is required (--model or [agent] model)"]),
                 Rule((), lambda agent: [] if agent.security.trusted_keys or agent.security.allow_unsigned else
                      ["trusted_keys: expected the trainer's public signing key(s), a file or a folder "
                       "(--trusted-keys or [security] trusted_keys); only development mode "
                       "(allow_unsigned = true) serves without"], scope=SecurityConfig.SCOPE))


@dataclass
class AgentConfig(_AgentSection):
    SCOPE = "agent"
    CONSTRAINTS = {"registry": [NON_EMPTY], "model": TEXT, "stage": [NON_EMPTY], "version": TEXT, "bind": TEXT,
                   "yield_variant": [OneOf(*YIELD_VARIANTS)],
                   "max_message_bytes": NON_NEGATIVE_INT, "transport_max_message_bytes": NON_NEGATIVE_INT,
                   "max_batch": POSITIVE_INT, "queue_length": POSITIVE_INT, "turn_parts": POSITIVE_INT,
                   "max_request_age_ms": NON_NEGATIVE_INT, "max_queued_bytes": POSITIVE_INT,
                   "watch_interval_s": POSITIVE, "shutdown_timeout_s": POSITIVE, "drain_quiet_ms": POSITIVE_INT,
                   "stage_sample_every": NON_NEGATIVE_INT, "keep_warm_ms": NON_NEGATIVE_INT,
                   "slow_reply_ms": NON_NEGATIVE}
    RULES = (Rule(("bind",), _bind_problems), Rule((), _upstream_problems, scope=DriftConfig.SCOPE),
             Rule((), _service_problems, scope=FollowerConfig.SCOPE),
             Rule(("max_message_bytes", "transport_max_message_bytes"), _room_for_error_replies))

    registry: str = "models"
    model: str = ""
    stage: str = "production"
    version: str = ""
    bind: str = "tcp://127.0.0.1:5555"
    yield_variant: str = "float32"
    max_message_bytes: int = 0                 # 0: the served model's largest valid request (edge_agent/daemon/limits.py)
    transport_max_message_bytes: int = 0       # 0: max_message_bytes + 64 KiB
    max_batch: int = 500
    queue_length: int = 1000                   # upper bound of ZeroMQ's high-water marks, which are sized in bytes
    turn_parts: int = 16                       # parts of a score_batch per turn while other clients wait
    max_request_age_ms: int = 1000             # 0: requests never expire in the agent's queue
    max_queued_bytes: int = 64 << 20
    watch_interval_s: float = 2.0
    shutdown_timeout_s: float = 5.0
    drain_quiet_ms: int = 100
    stage_sample_every: int = 100              # edge_agent/daemon/stages.py; 0: no per-stage timing
    keep_warm_ms: int = 5                      # score_path.py KeepWarm, touchdowns.py; 0: sleep until a request
    slow_reply_ms: float = 5.0                 # slow.py: replies later than this are kept with their causes; 0: none
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    pat: PatConfig = field(default_factory=PatConfig)
    binning: BinningConfig = field(default_factory=BinningConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    fleet: FollowerConfig = field(default_factory=FollowerConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    shadow: ShadowConfig = field(default_factory=ShadowConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                require_model: bool = True) -> AgentConfig:
    """Defaults, then the TOML file at ``path``, then ``overrides`` ({"bind": ..., "metrics.port": ...}), checked.

    ``require_model=False`` for commands that only talk to a running agent (they need its addresses, not a model
    or the keys that packages are checked with).
    """
    return load(AgentConfig(), path, overrides, also=SERVING_RULES if require_model else ())
