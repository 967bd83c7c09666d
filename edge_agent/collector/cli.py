"""`edge-collector`: receive drift windows from the fleet, store them, alert; write the fleet report.

    edge-collector run --bind tcp://127.0.0.1:5560 --db stats.sqlite [--config collector.toml]
                       [--metrics-port 9465] [--metrics-host 127.0.0.1]
    edge-collector report --db stats.sqlite --out report.html [--since-hours H] [--config collector.toml]

Exit status: 0 ok, 2 unusable configuration, database or address.
"""
from __future__ import annotations

import argparse
import signal
import sys

from ..errors import run_command

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
    run.set_defaults(handler=cmd_run)
    report = commands.add_parser("report", help="write the fleet drift report (one self-contained HTML file)")
    report.add_argument("--db", required=True, help="the collector's SQLite database")
    report.add_argument("--out", required=True, help="HTML file to write")
    report.add_argument("--since-hours", type=float, default=None, help="only windows that ended this recently")
    report.add_argument("--config", help="TOML file with an [alerts] table (the thresholds the report applies)")
    report.set_defaults(handler=cmd_report)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from ..logs import setup_logging
    from .alerts import AlertHook, AlertRules, load_alert_config
    from .server import CollectorServer
    from .store import Store

    setup_logging(args.log_format, args.log_level)
    config = load_alert_config(args.config)
    store = Store(args.db)
    rules = AlertRules(config, store.last_alert_times())
    hook = AlertHook(config.hook, config.hook_timeout_s) if config.hook else None
    server = CollectorServer(args.bind, store, rules, hook=hook, metrics_host=args.metrics_host,
                             metrics_port=args.metrics_port)
    signal.signal(signal.SIGTERM, server.request_stop)
    signal.signal(signal.SIGINT, server.request_stop)
    try:
        server.serve()
    finally:
        store.close()
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from ..package.files import output_path
    from .report import write_report
    out = output_path(args.out, "--out", make_folders=False)
    summary = write_report(args.db, out, since_hours=args.since_hours, config_path=args.config)
    print(summary)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
