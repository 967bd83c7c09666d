"""`edge-agent`: run the scoring daemon, and ask a running one for its health, a reload or a rollback.

    edge-agent run --registry models --model NAME --trusted-keys DIR [--stage production]
                   [--bind tcp://127.0.0.1:5555] [--config agent.toml]
    edge-agent health   [--connect ENDPOINT | --config agent.toml] [--key MINE.key_secret --agent-key AGENT.key]
    edge-agent reload   --key MINE.key_secret [--version N] [--no-wait] [--connect CONTROL --agent-key AGENT.key
                        | --config agent.toml]
    edge-agent rollback --key MINE.key_secret [--connect CONTROL --agent-key AGENT.key | --config agent.toml]
    edge-agent keys create NAME --kind curve [--dir keys]     # this agent's (or an operator's) CURVE key pair

reload and rollback go to the agent's CURVE control socket ([security] control_bind) with a key it allows
([security] control_keys); health goes to the score socket unless --key is given.

Exit status: 0 ok, 1 the agent answered with an error (or a reload was refused), 2 bad configuration or a
package that cannot be served, 3 no reply from the agent (run: another process listens on the address).
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
import time

from .config import AgentConfig, check_endpoint, load_config
from ..errors import EdgeError, run_command
from ..keys import CURVE_PUBLIC, CURVE_SECRET, add_keys_command

DEFAULT_CONNECT = "tcp://127.0.0.1:5555"
EXIT_OK, EXIT_ERROR_REPLY, EXIT_NO_REPLY = 0, 1, 3   # 2: unusable input (edge_agent.errors.run_command)
RELOAD_POLL_S = 0.1
DRIFT_STOP_TIMEOUT_S = 2.0   # at shutdown the open window gets this long to be acknowledged, else it stays spooled

log = logging.getLogger("edge_agent.daemon.cli")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("edge-agent", lambda: args.handler(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="load a model package and serve score requests")
    run.add_argument("--config", help="TOML configuration file; command-line options override it")
    # Defaults are None: an option not given leaves the configuration file's value (or the built-in default).
    run.add_argument("--registry", help="registry root folder (default: models)")
    run.add_argument("--model", help="model name")
    run.add_argument("--stage", help="registry stage to follow (default: production)")
    run.add_argument("--version", help="serve this version and do not follow the stage")
    run.add_argument("--bind", help="tcp://127.0.0.1:PORT or ipc:///path (default: tcp://127.0.0.1:5555)")
    run.add_argument("--yield-variant", choices=("float32", "int8"), help="yield graph variant (default: float32)")
    run.add_argument("--metrics-port", type=int, help="Prometheus /metrics port, 0 = off (default: 9464)")
    run.add_argument("--metrics-host", help="Prometheus listen address (default: 127.0.0.1)")
    run.add_argument("--watch-interval-s", type=float, help="how often the followed stage is checked")
    run.add_argument("--stage-sample-every", type=int,
                     help="time the stages of every Nth request (kept if a score), 0 = never (default: 100)")
    run.add_argument("--keep-warm-ms", type=int,
                     help="idle this long, rehearse the last score request to keep caches warm; 0 = never (default: 5)")
    run.add_argument("--slow-reply-ms", type=float,
                     help="keep every reply later than this with its causes (health: slow_replies); 0 = off "
                          "(default: 5)")
    run.add_argument("--collector", help="fleet collector endpoint for drift windows (default: tcp://127.0.0.1:5560)")
    run.add_argument("--no-drift", dest="drift", action="store_false", default=None,
                     help="no drift statistics and nothing shipped upstream")
    run.add_argument("--agent-id", help="this agent's id in the fleet (default: the host name)")
    run.add_argument("--tester", help="the tester this agent serves (default: the agent id)")
    run.add_argument("--spool-dir", help="where unacknowledged drift windows wait (default: edge-agent-spool)")
    run.add_argument("--log-format", choices=("plain", "json"))
    run.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    run.add_argument("--trusted-keys", help="the trainer's public signing key(s): a *.ed25519.pub file or a folder")
    run.add_argument("--allow-unsigned", action="store_true", default=None,
                     help="DEVELOPMENT MODE: serve packages without a trusted signature (logged and in health)")
    run.add_argument("--key", help="this agent's CURVE secret certificate (*.key_secret)")
    run.add_argument("--collector-key", help="the collector's public certificate: drift windows go over CURVE")
    run.add_argument("--control-bind", help="the CURVE control socket for reload and rollback (default: none)")
    run.add_argument("--control-keys", help="public certificates (file or folder) allowed on the control socket")
    run.add_argument("--score-keys", help="public certificates allowed on the score socket, which is then CURVE")
    run.add_argument("--registry-service", help="the registry service's endpoint: packages come from it (the "
                                                "deployment assigns the version) instead of --registry")
    run.add_argument("--service-key", help="the registry service's public certificate: requests go over CURVE")
    run.add_argument("--cache-dir", help="where fetched packages are kept (default: edge-agent-cache)")
    run.add_argument("--no-audit", dest="audit", action="store_false", default=None,
                     help="do not record and ship every decision")
    run.set_defaults(handler=cmd_run)

    for name, handler, text in (("health", cmd_health, "status, counters and latency of a running agent"),
                                ("reload", cmd_reload, "make a running agent load its stage's (or a given) version"),
                                ("rollback", cmd_rollback, "make a running agent serve its previous model again")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--connect", help=f"the agent's endpoint (default: the bind address in --config, "
                                               f"else {DEFAULT_CONNECT})")
        command.add_argument("--config", help="the agent's configuration file, to find its endpoint")
        command.add_argument("--timeout-ms", type=float, default=2000.0, help="how long to wait for a reply")
        command.add_argument("--key", help="your CURVE secret certificate (*.key_secret), allowed by the agent"
                                           + ("" if name == "health" else " as a control key (required)"))
        command.add_argument("--agent-key", help=f"the agent's public certificate (*{CURVE_PUBLIC}; default: beside "
                                                 "[security] key in --config)")
        if name == "reload":
            command.add_argument("--version", help="load this version instead of the followed stage's")
            command.add_argument("--no-wait", action="store_true", help="do not wait for the load's outcome")
            command.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for the outcome")
        command.set_defaults(handler=handler)
    add_keys_command(commands, "keys")
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config, {
        "registry": args.registry, "model": args.model, "stage": args.stage, "version": args.version,
        "bind": args.bind, "yield_variant": args.yield_variant, "watch_interval_s": args.watch_interval_s,
        "stage_sample_every": args.stage_sample_every, "keep_warm_ms": args.keep_warm_ms,
        "slow_reply_ms": args.slow_reply_ms,
        "metrics.port": args.metrics_port, "metrics.host": args.metrics_host,
        "logging.format": args.log_format, "logging.level": args.log_level,
        "drift.enabled": args.drift, "drift.collector": args.collector, "drift.agent_id": args.agent_id,
        "drift.tester": args.tester, "drift.spool_dir": args.spool_dir,
        "security.trusted_keys": args.trusted_keys, "security.allow_unsigned": args.allow_unsigned,
        "security.key": args.key, "security.collector_key": args.collector_key,
        "security.control_bind": args.control_bind, "security.control_keys": args.control_keys,
        "security.score_keys": args.score_keys, "fleet.service": args.registry_service,
        "fleet.service_key": args.service_key, "fleet.cache_dir": args.cache_dir, "audit.enabled": args.audit})
    return run_agent(config)


def run_agent(config: AgentConfig) -> int:
    """Load the configured package and serve until SIGTERM/SIGINT; SIGHUP asks for a reload."""
    # Imported here: health/reload/rollback need neither onnxruntime nor the registry.
    from ..logs import setup_logging
    from ..package.registry import Registry
    from .scoring import load_package
    from .security import AgentSecurity
    from .server import Agent
    from .upstream import AgentDrift

    setup_logging(config.logging.format, config.logging.level)
    security = AgentSecurity.load(config.security)
    follower, challenger = None, None
    if config.fleet.service:
        follower = _follower(config, security)
        ref, challenger = follower.initial()
        registry = follower.registry
        config.version = ref.version   # the follower decides what is served, not a stage of the cache
    else:
        registry = Registry(config.registry, trust=security.trust)
        ref = (registry.resolve(config.model, version=config.version) if config.version
               else registry.resolve(config.model, stage=config.stage))
    start = time.perf_counter()
    model = load_package(registry, ref, config.yield_variant)
    log.info("loaded %s in %.2f s: checksum %s, %d features, smoke score of %d sample rows ok", ref,
             time.perf_counter() - start, model.checksum, len(model.columns), model.smoke["score"]["rows"])
    drift = AgentDrift(config.drift, curve=security.upstream) if config.drift.enabled else None
    lifecycle = _lifecycle(config, security, drift, follower)
    agent = Agent(config, registry, model, drift=drift, security=security, lifecycle=lifecycle)
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    signal.signal(signal.SIGHUP, agent.request_reload)
    if drift is not None:
        drift.start(model)
    if lifecycle is not None:
        lifecycle.start(agent.request_version, challenger)
    try:
        agent.serve()
    finally:
        if lifecycle is not None:
            lifecycle.stop(timeout_s=DRIFT_STOP_TIMEOUT_S)
        if drift is not None:
            drift.stop(timeout_s=DRIFT_STOP_TIMEOUT_S)
    return EXIT_OK


def _follower(config: AgentConfig, security):
    """The registry service's follower, with this agent's CURVE key when the service has one."""
    from ..fleet.follower import Follower
    from ..keys import load_curve_public
    from ..wire.links import CurveClient
    curve = (CurveClient(security.pair, load_curve_public(config.fleet.service_key))
             if config.fleet.service_key else None)
    agent_id = config.drift.agent_id or socket.gethostname()
    return Follower(config.fleet, config.model, agent_id, config.drift.tester or agent_id, security.trust, curve)


def _lifecycle(config: AgentConfig, security, drift, follower):
    """The audit (with the drift link: same collector, same agent id) and the shadow challenger (with a follower:
    the deployment names challengers); None when there is neither."""
    from .audit import AuditRecorder
    from .lifecycle import Lifecycle
    from .shadow import ShadowScorer
    audit = (AuditRecorder(config.audit, config.drift, drift.agent_id, drift.tester, curve=security.upstream)
             if drift is not None and config.audit.enabled else None)
    shadow = (ShadowScorer(config.binning.policy(), queue_parts=config.shadow.queue_parts,
                           batch_parts=config.shadow.batch_parts) if follower is not None else None)
    if drift is not None:
        drift.shadow = shadow
    if audit is None and follower is None:
        return None
    return Lifecycle(audit=audit, shadow=shadow, follower=follower, yield_variant=config.yield_variant)


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args, control=False) as client:
        reply = _admin(client.health, args.timeout_ms)
    return _print_reply(reply)


def cmd_rollback(args: argparse.Namespace) -> int:
    with _client(args, control=True) as client:
        reply = _admin(client.rollback, args.timeout_ms)
    return _print_reply(reply)


def cmd_reload(args: argparse.Namespace) -> int:
    with _client(args, control=True) as client:
        before = _admin(client.health, args.timeout_ms)
        if before is None:
            return _print_reply(None)
        reply = _admin(lambda timeout_ms: client.reload(args.version, timeout_ms), args.timeout_ms)
        if args.no_wait or reply is None or reply.get("type") == "error":
            return _print_reply(reply)
        number = (before.get("last_reload") or {}).get("number", 0)
        deadline = time.monotonic() + args.wait_s
        while time.monotonic() < deadline:
            time.sleep(RELOAD_POLL_S)
            health = _admin(client.health, args.timeout_ms)
            outcome = None if health is None else health.get("last_reload")
            if outcome and outcome.get("number", 0) > number:
                print(json.dumps({"last_reload": outcome, "model": health["model"]}, indent=2, default=str))
                return EXIT_OK if outcome.get("outcome") in ("loaded", "unchanged") else EXIT_ERROR_REPLY
        print(f"edge-agent: the reload was accepted but had no outcome within {args.wait_s:g} s; "
              f"see `edge-agent health`", file=sys.stderr)
        return EXIT_NO_REPLY


def _client(args: argparse.Namespace, *, control: bool):
    """A client of the score socket, or (``control``) of the control socket with the operator's CURVE key."""
    from ..client import AgentClient
    from ..keys import load_curve_pair, load_curve_public
    from ..wire.links import CurveClient
    config = load_config(args.config, require_model=False) if args.config else None
    if control and not args.key:
        raise EdgeError(f"{args.command} is a control message: it goes to the agent's CURVE control socket with your "
                        "key: --key YOURS.key_secret (one of the agent's control_keys), and --config agent.toml or "
                        "--connect CONTROL_ENDPOINT --agent-key AGENT.key")
    endpoint = check_endpoint("--connect", args.connect) if args.connect else None
    if endpoint is None and config is not None:
        endpoint = config.security.control_bind if control else config.bind
    if control and not endpoint:
        raise EdgeError(f"{args.command}: the agent's control socket is unknown: --connect CONTROL_ENDPOINT, or "
                        "--config with [security] control_bind")
    curve = None
    if args.key:
        agent_key = args.agent_key or (config.security.key.removesuffix(CURVE_SECRET) + CURVE_PUBLIC
                                       if config and config.security.key else None)
        if agent_key is None:
            raise EdgeError("--key: the agent's public certificate is needed too: --agent-key AGENT.key, or --config "
                            "with [security] key")
        curve = CurveClient(load_curve_pair(args.key), load_curve_public(agent_key))
    return AgentClient(endpoint or DEFAULT_CONNECT, curve=curve)


def _admin(call, timeout_ms: float) -> dict | None:
    from ..client import AgentUnavailable
    try:
        return call(timeout_ms=timeout_ms)
    except AgentUnavailable as error:
        print(f"edge-agent: {error}", file=sys.stderr)
        return None


def _print_reply(reply: dict | None) -> int:
    if reply is None:
        return EXIT_NO_REPLY
    print(json.dumps(reply, indent=2, default=str))
    return EXIT_ERROR_REPLY if reply.get("type") == "error" else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
