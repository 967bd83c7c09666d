"""Turning the figures into the Markdown summary, the README performance table and PNG plots."""
from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.machine import summary_line

REQUIRED_KEYS = ("e2e.tcp.rate_1000.p50_us", "e2e.tcp.rate_1000.p99_us", "e2e.tcp.rate_1000.max_us",
                 "inproc.sklearn.p50_us", "inproc.skl2onnx.p50_us", "inproc.compact.p50_us",
                 "inproc.ratio_sklearn_over_compact", "inproc.ratio_skl2onnx_over_compact",
                 "throughput.batched_parts_per_s", "agent.rss_mb", "agent.startup_s", "machine")


@dataclass(frozen=True)
class Target:
    label: str
    key: str
    comparison: str      # "<", "<=" or ">="
    value: float
    unit: str
    floor_key: str | None = None   # the bare echo's own figure for the same target, printed beside it

    def met(self, measured: float) -> bool:
        return {"<": operator.lt, "<=": operator.le, ">=": operator.ge}[self.comparison](measured, self.value)


TARGETS = (
    Target("end-to-end p99 at 1,000 parts/s (tcp loopback, drift on)", "e2e.tcp.rate_1000.p99_us", "<", 1000.0, "us"),
    Target("compact graph vs skl2onnx default graph, single row (median)", "inproc.ratio_skl2onnx_over_compact",
           ">=", 50.0, "x"),
    Target("compact graph vs scikit-learn, single row (median)", "inproc.ratio_sklearn_over_compact", ">=", 300.0,
           "x"),
    Target("batched throughput, agent on one core", "throughput.batched_parts_per_s", ">=", 20_000.0, "parts/s"),
    Target("agent RSS after load", "agent.rss_mb", "<", 200.0, "MB"),
    Target("agent RSS after scoring (see agent.rss_after_parts_count)", "agent.rss_after_parts_mb", "<", 200.0,
           "MB"),
    # Cadence (bench/cadence.py): ratios measured in one run, the worst profile each target names.
    Target("e2e p50 over the bare pyzmq round trip, 1,000 parts/s and bursts (worst)",
           "cadence.worst.ratio_e2e_over_floor_p50", "<=", 1.5, "x"),
    Target("agent's own p50 over its models in process, every cadence (worst)",
           "cadence.worst.ratio_agent_over_models_p50", "<=", 2.0, "x"),
    Target("agent's own p50 over its models in process at the same cadence, every cadence (worst)",
           "cadence.worst.ratio_agent_over_models_at_cadence_p50", "<=", 2.0, "x"),
    Target("e2e p99 over p50, 1,000 parts/s and bursts (worst)", "cadence.worst.ratio_e2e_p99_over_p50", "<=", 2.0,
           "x", floor_key="cadence.worst.ratio_floor_p99_over_p50"),
    Target("replies over 10 ms, 1,000 parts/s and bursts", "cadence.over_10ms", "<", 1, "replies",
           floor_key="cadence.floor_over_10ms"),
)
CADENCE_COLUMNS = (("parts", "parts"), ("e2e p50", "e2e.p50_us"), ("floor p50", "floor.p50_us"),
                   ("e2e / floor", "ratio_e2e_over_floor_p50"), ("agent p50", "agent.p50_us"),
                   ("agent / models", "ratio_agent_over_models_p50"),
                   ("models at cadence p50", "models_at_cadence.p50_us"),
                   ("agent / models at cadence", "ratio_agent_over_models_at_cadence_p50"), ("e2e p99", "e2e.p99_us"),
                   ("p99 / p50", "ratio_e2e_p99_over_p50"), ("p99.9", "e2e.p999_us"), ("max", "e2e.max_us"),
                   ("over 10 ms", "e2e.over_10ms"), ("floor p99 / p50", "ratio_floor_p99_over_p50"),
                   ("floor over 10 ms", "floor.over_10ms"), ("client late sends", "late_sends"))


def target_rows(figures: dict) -> list[dict]:
    """Each target with its measured figure, whether it is met (None when the figure is missing) and the bare
    echo's own figure where the target has one (else None)."""
    rows = []
    for target in TARGETS:
        measured = figures.get(target.key)
        rows.append({"label": target.label, "key": target.key, "target": f"{target.comparison} "
                     f"{_number(target.value)} {target.unit}", "measured": measured, "unit": target.unit,
                     "met": None if measured is None else target.met(float(measured)),
                     "floor": figures.get(target.floor_key) if target.floor_key else None})
    return rows


def readme_table(figures: dict) -> str:
    """The README performance table: target, measured, met, and the machine line under it."""
    lines = ["| | target | measured | met |", "|---|---|---|---|"]
    behind = figures.get("cadence.behind_schedule")
    for row in target_rows(figures):
        measured = "not measured" if row["measured"] is None else f"{_number(row['measured'])} {row['unit']}"
        if behind and row["key"].startswith("cadence.") and row["measured"] is not None:
            measured += " (client behind schedule: see cadence.behind_schedule)"
        elif row["key"].endswith("_p50") and f"{row['key']}_profile" in figures:
            measured += f" ({figures[row['key'] + '_profile']})"
        if row["floor"] is not None:
            measured += f"; the bare echo itself: {_number(row['floor'])} {row['unit']}"
        met = "n/a" if row["met"] is None else ("yes" if row["met"] else "no")
        lines.append(f"| {row['label']} | {row['target']} | {measured} | {met} |")
    lines += cadence_table(figures)
    lines += ["", f"Measured by `edge-bench{' --quick' if figures.get('run.quick') else ''}` on "
                  f"{summary_line(figures['machine'])}."]
    if "agent.rss_after_parts_count" in figures:
        lines.append(f"RSS after scoring: after {figures['agent.rss_after_parts_count']:,} parts.")
    return "\n".join(lines)


def cadence_table(figures: dict) -> list[str]:
    """The cadence profiles (bench/cadence.py), one row each, us from the scheduled send; [] when not run."""
    profiles = [k.split(".")[1] for k in figures if k.startswith("cadence.") and k.endswith(".e2e.over_10ms")]
    if not profiles:
        return []
    lines = ["", f"Cadence (tcp, drift on; us from the scheduled send; floor: bare pyzmq echo of the same payload; "
                 f"models in process p50 {_number(figures['cadence.models_inproc.p50_us'])} us back to back; at the "
                 f"cadence: the same calls on the profile's schedule):", "",
             "| profile | " + " | ".join(title for title, _ in CADENCE_COLUMNS) + " |",
             "|---|" + "---:|" * len(CADENCE_COLUMNS)]
    for profile in profiles:
        cells = [figures.get(f"cadence.{profile}.{key}") for _, key in CADENCE_COLUMNS]
        lines.append(f"| {profile} | " + " | ".join("" if c is None else _number(c) for c in cells) + " |")
    return lines


def slow_table(figures: dict) -> list[str]:
    """The agent's slow replies per cadence profile by their largest cause (edge_agent/daemon/slow.py); [] when not
    run."""
    profiles = [k.split(".")[1] for k in figures if k.startswith("cadence.") and k.endswith(".slow_replies")]
    if not profiles:
        return []
    threshold = figures[f"cadence.{profiles[0]}.slow_threshold_ms"]
    lines = ["", f"## Slow replies and their causes (the agent's own time over {_number(threshold)} ms)", "",
             "Each reply the agent sent later than the threshold after it arrived, by its largest cause; replies over "
             "10 ms end to end that the agent does not see as slow spent that time outside it (client, transport).",
             "", "| profile | e2e over 10 ms | agent slow replies | causes |", "|---|---:|---:|---|"]
    for profile in profiles:
        prefix = f"cadence.{profile}.slow."
        causes = ", ".join(f"{k[len(prefix):]} {figures[k]}" for k in figures if k.startswith(prefix))
        lines.append(f"| {profile} | {figures.get(f'cadence.{profile}.e2e.over_10ms', '')} | "
                     f"{figures[f'cadence.{profile}.slow_replies']} | {causes or 'none'} |")
    return lines


def stage_table(figures: dict) -> list[str]:
    """The agent's own time by stage (p50 / p99 us) per cadence profile; [] when not run."""
    profiles = [k.split(".")[1] for k in figures if k.startswith("cadence.") and k.endswith(".stage.samples")]
    if not profiles:
        return []
    from edge_agent.daemon.stages import STAGES
    lines = ["", "## Where the agent's own time goes (p50 / p99 us per stage, sampled requests)", "",
             "A part scored ahead had its graphs run in an earlier waiting request's call: its graphs stage counts 0, "
             "the call's time is in that request's.", "",
             "| profile | samples | scored ahead | " + " | ".join(STAGES) + " |",
             "|---|" + "---:|" * (len(STAGES) + 2)]
    for profile in profiles:
        key = f"cadence.{profile}.stage"
        ahead = figures.get(f"cadence.{profile}.scored_ahead_share")
        cells = [f"{figures.get(f'{key}.{stage}.p50_us', '')} / {figures.get(f'{key}.{stage}.p99_us', '')}"
                 for stage in STAGES]
        lines.append(f"| {profile} | {figures[f'{key}.samples']} | {'' if ahead is None else f'{ahead:.0%}'} | "
                     + " | ".join(cells) + " |")
    return lines


def summary(figures: dict) -> str:
    """The Markdown summary of a run: targets, then one table per section that ran."""
    out = [f"# edge-bench results{' (quick)' if figures.get('run.quick') else ''}", "",
           f"{summary_line(figures['machine'])}; run took {figures.get('run.seconds', '?')} s.", "",
           "## Targets", "", readme_table(figures)]
    e2e = sorted({k.rsplit(".", 1)[0] for k in figures if k.startswith("e2e.") and k.endswith(".p99_us")
                  and k.count(".") in (3, 4) and ".round_trip" not in k and ".agent." not in k
                  and ".late_start" not in k})
    if e2e:
        out += ["", "## End-to-end latency (us, from the scheduled send time)", "",
                "| run | parts | achieved parts/s | p50 | p90 | p99 | p99.9 | max | agent p50 |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key in e2e:
            cells = [figures.get(f"{key}.{f}", "") for f in ("parts", "achieved_rate", "p50_us", "p90_us", "p99_us",
                                                              "p999_us", "max_us", "agent.p50_us")]
            out.append(f"| {key} | " + " | ".join(str(c) for c in cells) + " |")
    out += stage_table(figures)
    out += slow_table(figures)
    if "throughput.batched_parts_per_s" in figures:
        out += ["", "## Batched throughput", "", "| cores | agent CPUs | client CPUs | parts/s |", "|---|---|---|---:|"]
        for name in ("one_core", "two_cores"):
            if f"throughput.{name}.parts_per_s" in figures:
                out.append(f"| {name} | {figures[f'throughput.{name}.agent_cpus']} | "
                           f"{figures[f'throughput.{name}.client_cpus']} | "
                           f"{figures[f'throughput.{name}.parts_per_s']:,} |")
    if "inproc.compact.p50_us" in figures:
        from bench.export_compare import markdown as inproc_markdown
        as_measured = {**figures, "machine.cpus": figures["machine"]["cores"],
                       "machine.load_1min_before": figures.get("inproc.load_1min_before"),
                       "machine.load_1min_after": figures.get("inproc.load_1min_after")}
        out += ["", "## In process, same rows", "", inproc_markdown(as_measured)]
    for section, title in (("scaling.", "Scaling (compact outlier graph, in process, single row)"),
                           ("agent.", "Agent footprint"), ("curve.", "CURVE on the score socket (closed loop, tcp)"),
                           ("stdf.", "STDF read"), ("training.", "Training time"), ("drift.", "Drift kernel"),
                           ("explain.", "Explanations and judging, in process")):
        keys = [k for k in figures if k.startswith(section)]
        if keys:
            out += ["", f"## {title}", "", "| key | value |", "|---|---|"]
            out += [f"| {k} | {figures[k]} |" for k in keys]
    return "\n".join(out) + "\n"


def plots(directory: Path, latencies: dict[str, np.ndarray], curves: dict[str, list[tuple[int, float, float]]]
          ) -> list[Path]:
    """PNG plots: e2e latency histogram and CDF per run, and the scaling curves; the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    if latencies:
        figure, (histogram, cdf) = plt.subplots(1, 2, figsize=(13, 5))
        for key, values in sorted(latencies.items()):
            label = key.removeprefix("e2e.")
            clipped = np.clip(values, 1, None)
            histogram.hist(clipped, bins=np.logspace(np.log10(clipped.min()), np.log10(clipped.max()) + 1e-9, 60),
                           histtype="step", label=label)
            ordered = np.sort(values)
            cdf.plot(ordered, 1 - np.arange(len(ordered)) / len(ordered), label=label)
        histogram.set(xscale="log", xlabel="latency from scheduled send (us)", ylabel="parts",
                      title="end-to-end latency")
        cdf.set(xscale="log", yscale="log", xlabel="latency from scheduled send (us)",
                ylabel="fraction of parts slower", title="tail (1 - CDF)")
        cdf.axvline(1000, color="grey", linestyle=":", label="1 ms")
        for axis in (histogram, cdf):
            axis.legend(fontsize=7)
        written.append(_save(figure, directory / "e2e_latency.png"))
    if curves:
        figure, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4.5), squeeze=False)
        for axis, (sweep, points) in zip(axes[0], curves.items()):
            values, p50, p99 = zip(*points)
            axis.plot(values, p50, "o-", label="p50")
            axis.plot(values, p99, "s--", label="p99")
            axis.set(xscale="log", xlabel=sweep.replace("_", " "), ylabel="single-row latency (us)",
                     title=f"latency vs {sweep.replace('_', ' ')}")
            axis.set_xticks(values, [str(v) for v in values], minor=False)
            axis.set_xticks([], minor=True)
            axis.legend()
        written.append(_save(figure, directory / "scaling.png"))
    return written


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(figure)
    return path


def _number(value: float) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.2f}" if abs(value) < 10 else f"{value:,.1f}"   # ratios: 1.52 is not 1.5
    return f"{int(value):,}"
