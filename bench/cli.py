"""`edge-bench`: the local benchmark runner. Proves the latency budget on this machine before scoring goes live.

    edge-bench [--quick] [--json PATH] [--markdown PATH] [--plots DIR] [--only SECTION ...]
    edge-bench --readme-table results.json

Sections: e2e (latency from a client process to real agents, tcp and ipc, 100/1,000/5,000 parts/s, drift on
and off), cadence (a tester's cadence: steady 1 to 1,000 parts/s and touchdown bursts, against the bare pyzmq
round trip, with the agent's per-stage breakdown), throughput (score_batch on one and two cores), agent
(start-up time, memory), curve (the score round trip with and without CURVE), inproc (scikit-learn vs skl2onnx
vs compact vs int8 on the same rows), scaling (latency vs trees, tests, depth), stdf (read speed), training (fit
time), drift (the drift kernel's cost per part), explain (the cost of explaining a flagged part, and of the
agent's judging step). Every figure is in the JSON under the keys documented in bench/KEYS.md. ``--quick`` runs
every section small (under a minute on 2 cores).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import sys
import time
from pathlib import Path

from bench import machine, report
from edge_agent.errors import run_command
from edge_agent.package.files import output_path

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("e2e", "cadence", "throughput", "agent", "curve", "inproc", "scaling", "stdf", "training", "drift",
            "explain", "lifecycle")
AGENT_SECTIONS = ("e2e", "cadence", "throughput", "agent", "curve")
QUICK_YIELD_KINDS = ("random_forest", "logistic")   # logistic has an int8 variant; the MLP takes long to fit
# Every section trains or reads data with the trainer's libraries, and the plots need matplotlib: a role that is
# not installed is named before the first section runs, not after minutes of measuring.
NEEDED_MODULES = ("sklearn", "skl2onnx", "onnx", "pandas", "pyarrow", "numba", "matplotlib")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("edge-bench", lambda: bench_command(args))


def bench_command(args: argparse.Namespace) -> int:
    if args.readme_table:
        print(report.readme_table(load_results(args.readme_table)))
        return 0
    check_installed(NEEDED_MODULES)
    for path, option, folder in ((args.json, "--json", False), (args.markdown, "--markdown", False),
                                 (args.plots, "--plots", True)):
        output_path(path, option, folder=folder)   # before minutes of measuring, not after
    figures, latencies, curves = run(args.quick, args.only or list(SECTIONS))
    write_outputs(figures, latencies, curves, Path(args.json), Path(args.markdown), Path(args.plots))
    print(report.readme_table(figures))
    print(f"\nwrote {args.json}, {args.markdown} and plots in {args.plots} ({figures['run.seconds']} s)")
    return 0


def check_installed(modules: tuple[str, ...]) -> None:
    """ModuleNotFoundError for the first of ``modules`` that is not installed (run_command names its extra)."""
    for name in modules:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every section, small: under a minute on 2 cores")
    parser.add_argument("--json", default=str(RESULTS / "latest.json"), help="figures (default: %(default)s)")
    parser.add_argument("--markdown", default=str(RESULTS / "latest.md"), help="summary (default: %(default)s)")
    parser.add_argument("--plots", default=str(RESULTS), help="folder for the PNG plots (default: %(default)s)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION",
                        help=f"run only these sections: {', '.join(SECTIONS)}")
    parser.add_argument("--readme-table", metavar="RESULTS_JSON",
                        help="print the README performance table of a results file and exit")
    return parser


def run(quick: bool, sections: list[str]) -> tuple[dict, dict, dict]:
    """Run ``sections``; (figures, e2e latency samples by run key, scaling curves)."""
    started = time.perf_counter()
    figures: dict = {"run.quick": quick, "run.sections": list(sections),
                     "run.started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    described = machine.describe()
    described["load_before"] = machine.load_average()
    latencies, curves = {}, {}
    clock = _SectionClock(figures)
    if any(s in sections for s in AGENT_SECTIONS):
        from bench import agent_footprint, curve_cost, latency_suite, throughput
        from bench.site import AgentSite
        with AgentSite(quick, latency_suite.stream_parts(quick)) as site:
            figures.update({f"package.{k}": v for k, v in site.package.items()})
            clock.lap("agent_site")
            if "agent" in sections:
                figures.update(agent_footprint.run(site, quick))
                clock.lap("agent")
            if "e2e" in sections:
                e2e, latencies = latency_suite.run(site, quick)
                figures.update(e2e)
                clock.lap("e2e")
            if "cadence" in sections:
                from bench import cadence
                figures.update(cadence.run(site, quick))
                clock.lap("cadence")
            if "throughput" in sections:
                figures.update(throughput.run(site, quick))
                clock.lap("throughput")
            if "curve" in sections:
                figures.update(curve_cost.run(site, quick))
                clock.lap("curve")
        clock.lap("agent_site")
    if "inproc" in sections:
        from bench import export_compare
        inproc = export_compare.run(quick=quick, **({"yield_kinds": QUICK_YIELD_KINDS} if quick else {}))
        # Its load averages bracket this section only: keep them beside its figures; the rest is in "machine".
        figures.update({k.replace("machine.", "inproc."): v for k, v in inproc.items()
                        if not k.startswith("machine.") or k.startswith("machine.load_")})
        clock.lap("inproc")
    if "scaling" in sections:
        from bench import scaling
        scaled, curves = scaling.run(quick)
        figures.update(scaled)
        clock.lap("scaling")
    if "stdf" in sections:
        from bench import data_path
        figures.update(data_path.run(quick))
        clock.lap("stdf")
    if "training" in sections:
        from bench import training_time
        figures.update(training_time.run(quick))
        clock.lap("training")
    if "drift" in sections:
        from bench import drift_cost
        figures.update(_flat(drift_cost.run(quick=quick), "drift"))
        clock.lap("drift")
    if "explain" in sections:
        from bench import explain_cost
        figures.update(_flat(explain_cost.run(quick=quick), "explain"))
        clock.lap("explain")
    if "lifecycle" in sections:
        from bench import lifecycle_cost
        figures.update(_flat(lifecycle_cost.run(quick=quick), "lifecycle"))
        clock.lap("lifecycle")
    described["load_after"] = machine.load_average()
    figures["machine"] = described
    figures["run.seconds"] = round(time.perf_counter() - started, 1)
    return figures, latencies, curves


class _SectionClock:
    """Adds each section's wall time to the figures as ``run.section_s.<section>`` (repeated laps add up)."""

    def __init__(self, figures: dict):
        self.figures, self.last = figures, time.perf_counter()

    def lap(self, section: str) -> None:
        now = time.perf_counter()
        key = f"run.section_s.{section}"
        self.figures[key] = round(self.figures.get(key, 0.0) + now - self.last, 1)
        self.last = now


def _flat(measured: dict, prefix: str) -> dict:
    """A section's figures as flat ``<prefix>.*`` keys, one level of nested figures joined with a dot (its own
    machine block is dropped)."""
    flat = {}
    for key, value in measured.items():
        if key == "machine":
            continue
        key = key if key.startswith(f"{prefix}.") else f"{prefix}.{key}"
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def write_outputs(figures: dict, latencies: dict, curves: dict, json_path: Path, markdown_path: Path,
                  plots_dir: Path) -> None:
    for path in (json_path, markdown_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(figures, indent=2) + "\n")
    markdown_path.write_text(report.summary(figures))
    report.plots(plots_dir, latencies, curves)


def load_results(path: str) -> dict:
    """A results JSON written by edge-bench; EdgeError naming the file when it is not one."""
    from edge_agent.errors import DataError
    try:
        figures = json.loads(Path(path).read_text())
    except OSError as error:
        raise DataError(f"cannot read the results: {error.strerror}", file=path) from None
    except json.JSONDecodeError as error:
        raise DataError("not JSON", file=path, offset=error.pos, expected="an edge-bench results file",
                        got=error.msg) from None
    if not isinstance(figures, dict) or not isinstance(figures.get("machine"), dict):
        raise DataError("not an edge-bench results file", file=path, expected="an object with a 'machine' entry",
                        got=type(figures).__name__ if not isinstance(figures, dict) else "no 'machine' object")
    return figures


if __name__ == "__main__":
    sys.exit(main())
