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
    comparison: str      # "<" or ">="
    value: float
    unit: str

    def met(self, measured: float) -> bool:
        return {"<": operator.lt, ">=": operator.ge}[self.comparison](measured, self.value)


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
)


def target_rows(figures: dict) -> list[dict]:
    """Each target with its measured figure and whether it is met (None when the figure is missing)."""
    rows = []
    for target in TARGETS:
        measured = figures.get(target.key)
        rows.append({"label": target.label, "key": target.key, "target": f"{target.comparison} "
                     f"{_number(target.value)} {target.unit}", "measured": measured, "unit": target.unit,
                     "met": None if measured is None else target.met(float(measured))})
    return rows


def readme_table(figures: dict) -> str:
    """The README performance table: target, measured, met, and the machine line under it."""
    lines = ["| | target | measured | met |", "|---|---|---|---|"]
    for row in target_rows(figures):
        measured = "not measured" if row["measured"] is None else f"{_number(row['measured'])} {row['unit']}"
        met = "n/a" if row["met"] is None else ("yes" if row["met"] else "no")
        lines.append(f"| {row['label']} | {row['target']} | {measured} | {met} |")
    lines += ["", f"Measured by `edge-bench{' --quick' if figures.get('run.quick') else ''}` on "
                  f"{summary_line(figures['machine'])}."]
    if "agent.rss_after_parts_count" in figures:
        lines.append(f"RSS after scoring: after {figures['agent.rss_after_parts_count']:,} parts.")
    return "\n".join(lines)


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
        return f"{value:,.1f}"
    return f"{int(value):,}"
