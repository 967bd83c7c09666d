"""`edge-collector`: receive drift windows from the fleet, store them, alert; write the fleet report.

    edge-collector run --bind tcp://127.0.0.1:5560 --db stats.sqlite [--config collector.toml]
                       [--metrics-port 9465] [--metrics-host 127.0.0.1]
                       [--key collector.key_secret --agent-keys DIR]     # CURVE: required beyond loopback
    edge-collector report --db stats.sqlite --out report.html [--since-hours H] [--config collector.toml]
    edge-collector keys create collector --kind curve [--dir keys]

Exit status: 0 ok, 2 unusable configuration, database or address.
"""
from __future__ import annotations

import argparse
import signal
import sys

from ..errors import EdgeError, run_command
from ..keys import CURVE_PUBLIC, add_keys_command
from ..wire.links import listen_problems

EXIT_OK = 0   # 2: unusable configuration, database or address (edge_agent.errors.run_command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("edge-collector", lambda: args.handler(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-collector", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="receive stats windows from agents (until SIGTERM/SIGINT)")
    run.add_argument("--bind", default="tcp://127.0.0.1:5560", help="ZeroMQ address agents connect to")
    run.add_argument("--db", required=True, help="SQLite database (created if absent)")
    run.add_argument("--config", help="TOML file with an [alerts] table (thresholds, hook)")
    run.add_argument("--metrics-port", type=int, default=9465, help="Prometheus /metrics port, 0 = off")
    run.add_argument("--metrics-host", default="127.0.0.1")
    run.add_argument("--log-format", choices=("plain", "json"), default="plain")
    run.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO")
    run.add_argument("--key", help="the collector's CURVE secret certificate (*.key_secret): agents connect over "
                                   "CURVE; required to listen beyond loopback")
    run.add_argument("--agent-keys", help=f"the agents allowed in: a folder of public certificates, each named for "
                                          f"the agent id its key is bound to (<agent id>{CURVE_PUBLIC})")
    run.set_defaults(handler=cmd_run)
    report = commands.add_parser("report", help="write the fleet drift report (one self-contained HTML file)")
    report.add_argument("--db", required=True, help="the collector's SQLite database")
    report.add_argument("--out", required=True, help="HTML file to write")
    report.add_argument("--since-hours", type=float, default=None, help="only windows that ended this recently")
    report.add_argument("--config", help="TOML file with an [alerts] table (the thresholds the report applies)")
    report.set_defaults(handler=cmd_report)
    add_keys_command(commands, "keys")
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from ..logs import setup_logging
    from .alerts import AlertHook, AlertRules, load_alert_config
    from .server import CollectorServer
    from .store import Store

    keys = _keys(args)
    setup_logging(args.log_format, args.log_level)
    config = load_alert_config(args.config)
    store = Store(args.db)
    rules = AlertRules(config, store.last_alert_times())
    hook = AlertHook(config.hook, config.hook_timeout_s) if config.hook else None
    server = CollectorServer(args.bind, store, rules, hook=hook, metrics_host=args.metrics_host,
                             metrics_port=args.metrics_port, keys=keys)
    signal.signal(signal.SIGTERM, server.request_stop)
    signal.signal(signal.SIGINT, server.request_stop)
    try:
        server.serve()
    finally:
        store.close()
    return EXIT_OK


def _keys(args: argparse.Namespace):
    """The CURVE keys (None: plain, loopback only), checked with the bind address before anything opens."""
    from ..keys import load_allow_list, load_curve_pair
    from .server import CollectorKeys
    problems = listen_problems("--bind", args.bind, curve=bool(args.key))
    if bool(args.key) != bool(args.agent_keys):
        problems.append("--key and --agent-keys: CURVE needs both, the collector's secret certificate and the agents' "
                        "public ones")
    if problems:
        raise EdgeError("edge-collector run options are not usable:\n" + "\n".join(f"  - {p}" for p in problems))
    return CollectorKeys(load_curve_pair(args.key), load_allow_list(args.agent_keys)) if args.key else None


def cmd_report(args: argparse.Namespace) -> int:
    from ..package.files import output_path
    from .report import write_report
    out = output_path(args.out, "--out", make_folders=False)
    summary = write_report(args.db, out, since_hours=args.since_hours, config_path=args.config)
    print(summary)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
