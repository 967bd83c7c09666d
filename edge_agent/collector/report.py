"""The fleet drift report: one self-contained HTML page (plots embedded as PNG data URIs).

PSI here is computed from the stored bin counts, summed over time, not averaged from per-window PSI: a
sum of counts is a bigger sample, so the figure is less noisy. "Recent" means each tester/site's latest
windows up to ``RECENT_PARTS`` parts.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.dates

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..wire.codec import decode_trusted  # noqa: E402
from ..wire.distances import psi  # noqa: E402
from .alerts import AlertConfig, load_alert_config  # noqa: E402
from .store import Store  # noqa: E402

RECENT_PARTS = 1000        # parts per tester/site behind a "recent" figure
TIME_BUCKETS = 24          # columns of the PSI-over-time heat map at most
HEATMAP_ROWS = 20          # tester/site x test pairs in the PSI-over-time heat map
OVERVIEW_TESTS = 25        # tests in the tests x tester/site heat map
WORST_SHOWN = 6            # reference vs current histograms
ALERTS_SHOWN = 50
PSI_COLOR_MAX = 0.5        # the heat maps' colour scale saturates here (0.2 = act)


@dataclass
class _Series:
    """One tester/site running one model: its windows in time order."""

    model: str
    agent_id: str
    tester: str
    head: int
    site: int
    ends: list[float] = field(default_factory=list)
    parts: list[int] = field(default_factory=list)
    outliers: list[int] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)    # [T, max_bins] each

    @property
    def label(self) -> str:
        return f"{self.tester} h{self.head}/s{self.site}"

    def recent(self) -> tuple[np.ndarray, int, int]:
        """Summed counts, parts and outliers of the latest windows, up to RECENT_PARTS parts."""
        total, parts, outliers, i = np.zeros_like(self.counts[-1]), 0, 0, len(self.ends)
        while i > 0 and parts < RECENT_PARTS:
            i -= 1
            total += self.counts[i]
            parts += self.parts[i]
            outliers += self.outliers[i]
        return total, parts, outliers


@dataclass
class _Model:
    checksum: str
    name: str
    version: str
    columns: list[str]
    expected_outlier_rate: float
    reference: np.ndarray        # [T, max_bins] proportions, zero-padded
    edges: list[list[float]]

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"


def write_report(db: str | Path, out: str | Path, *, since_hours: float | None = None,
                 config: AlertConfig | None = None, config_path: str | None = None) -> str:
    """Write the report; returns a one-line summary."""
    config = config or load_alert_config(config_path)
    store = Store(db, read_only=True)
    try:
        since = time.time() - since_hours * 3600 if since_hours else 0.0
        models, series = _load(store, since)
        agents = store.agents()
        alerts = store.db.execute("SELECT * FROM alerts WHERE created_at >= ? ORDER BY created_at DESC LIMIT ?",
                                  (since, ALERTS_SHOWN)).fetchall()
        agent_models = store.db.execute(
            "SELECT w.agent_id, m.name, m.version, count(*) AS windows, max(w.end) AS last FROM windows w "
            "JOIN models m ON m.checksum = w.model_checksum WHERE w.end >= ? GROUP BY w.agent_id, m.checksum "
            "ORDER BY w.agent_id, last", (since,)).fetchall()
    finally:
        store.close()
    page = _Page(f"Fleet drift report: {Path(db).name}")
    page.text(f"Generated {_iso(time.time())} from {html.escape(str(db))}; "
              f"{sum(len(s.ends) for s in series)} site-windows of {len({s.agent_id for s in series})} agent(s)"
              + (f" over the last {since_hours:g} h." if since_hours else "."))
    page.heading("Retrain recommendation per model")
    recommendations = [(model, _recommend(model, [s for s in series if s.model == model.checksum], config))
                       for model in models.values()]
    page.table(["model", "recommendation", "reason"],
               [(m.label, verdict, reason) for m, (verdict, reason) in recommendations] or [("-", "no data", "")])
    page.heading("Agents and their model versions")
    page.table(["agent", "tester", "current model", "models in range (windows)", "last seen", "last seq",
                "windows", "spool losses", "status"],
               _agent_rows(agents, agent_models, models, config))
    for model in models.values():
        model_series = [s for s in series if s.model == model.checksum]
        page.heading(f"Model {model.label}: PSI of tests by tester/site")
        page.image(_overview_heatmap(model, model_series, config),
                   f"PSI heat map of tests by tester/site, {model.label}")
        page.heading(f"Model {model.label}: PSI over time")
        page.image(_time_heatmap(model, model_series, config), f"PSI over time, {model.label}")
        page.heading(f"Model {model.label}: worst-drifting tests, reference vs recent")
        page.image(_worst_histograms(model, model_series, config), f"worst-drifting tests, {model.label}")
    page.heading("Outlier rate per tester over time")
    page.image(_outlier_rates(series, models), "outlier rate per tester over time")
    page.heading(f"Latest alerts (at most {ALERTS_SHOWN})")
    page.table(["time", "kind", "tester", "message"],
               [(_iso(a["created_at"]), a["kind"], a["tester"] or "", a["message"]) for a in alerts])
    Path(out).write_text(page.render(), encoding="utf-8")
    return (f"wrote {out}: {len(models)} model(s), {len(series)} tester/site series, {page.images} plot(s), "
            f"{len(alerts)} alert(s)")


# ---- loading -------------------------------------------------------------------------------------------------

def _load(store: Store, since: float) -> tuple[dict[str, _Model], list[_Series]]:
    models = {}
    for row in store.db.execute("SELECT * FROM models"):
        reference = decode_trusted(row["reference"])
        proportions = reference["proportions"]
        padded = np.zeros((len(proportions), max((len(p) for p in proportions), default=1)))
        for t, p in enumerate(proportions):
            padded[t, :len(p)] = p
        models[row["checksum"]] = _Model(row["checksum"], row["name"], row["version"], decode_trusted(row["columns"]),
                                         row["expected_outlier_rate"], padded, reference["edges"])
    series: dict[tuple, _Series] = {}
    rows = store.db.execute(
        "SELECT w.model_checksum, w.agent_id, w.tester, w.end, s.head, s.site, s.parts, s.outliers, s.counts "
        "FROM windows w JOIN site_windows s ON s.window_id = w.id WHERE w.end >= ? ORDER BY w.end", (since,))
    for row in rows:
        model = models[row["model_checksum"]]
        key = (row["model_checksum"], row["agent_id"], row["head"], row["site"])
        if key not in series:
            series[key] = _Series(row["model_checksum"], row["agent_id"], row["tester"], row["head"], row["site"])
        s = series[key]
        counts = np.zeros(model.reference.shape, dtype=np.int64)
        for t, c in enumerate(decode_trusted(row["counts"])):
            counts[t, :len(c)] = c
        s.ends.append(row["end"])
        s.parts.append(row["parts"])
        s.outliers.append(row["outliers"])
        s.counts.append(counts)
    used = {s.model for s in series.values()}
    return ({c: m for c, m in models.items() if c in used},
            sorted(series.values(), key=lambda s: (s.tester, s.head, s.site)))


# ---- analysis ------------------------------------------------------------------------------------------------

def _recent_psi(model: _Model, s: _Series, config: AlertConfig) -> tuple[np.ndarray, np.ndarray]:
    """PSI per test over the series' recent counts (NaN below ``psi_min_parts`` readings), and the sample sizes."""
    counts, _, _ = s.recent()
    n = counts.sum(axis=1)
    values = psi(counts, model.reference)
    return np.where(n >= config.psi_min_parts, values, np.nan), n


def _recommend(model: _Model, series: list[_Series], config: AlertConfig) -> tuple[str, str]:
    """A verdict and its reason. Drift on most of the fleet means the population moved (retrain); drift on a
    few testers/sites while the rest matches the reference points at those testers (do not retrain on it)."""
    if not series:
        return "no data", "no windows in the report's range"
    drifting: dict[int, list[tuple[_Series, float]]] = {}      # test -> (tester/site, recent PSI) above threshold
    measured, worst = [], (-1.0, "", "", 0)
    for s in series:
        values, n = _recent_psi(model, s, config)
        if np.all(np.isnan(values)):
            continue
        measured.append(s)
        t = int(np.nanargmax(values))
        if values[t] > worst[0]:
            worst = (float(values[t]), model.columns[t], s.label, int(n[t]))
        for t in np.flatnonzero(values > config.psi_threshold):
            drifting.setdefault(int(t), []).append((s, float(values[t])))
    if not measured:
        return "not enough data", (f"no tester/site has {config.psi_min_parts} readings of a test yet "
                                   f"({len(series)} tester/site(s) reporting)")
    several_testers = len({s.tester for s in measured}) > 1
    fleet_wide = {t: where for t, where in drifting.items() if len(where) * 2 >= len(measured)
                  and (not several_testers or len({s.tester for s, _ in where}) > 1)}
    excess = [s for s in series if (r := s.recent())[1] >= config.outlier_min_parts
              and r[2] / r[1] > model.expected_outlier_rate + config.outlier_margin]
    if fleet_wide:
        widest = sorted(fleet_wide.items(), key=lambda item: -len(item[1]))[:3]
        named = "; ".join(f"{model.columns[t]} on {len(where)} of {len(measured)} tester/sites (max PSI "
                          f"{max(v for _, v in where):.2f})" for t, where in widest)
        return "retrain", (f"{len(fleet_wide)} test(s) drift (PSI > {config.psi_threshold}) on most of the fleet "
                           f"running it: {named}. The process or product moved away from the training data.")
    if len(excess) * 2 >= len(series):
        return "retrain or recalibrate", (f"outlier rate above {model.expected_outlier_rate:.2%} + "
                                          f"{config.outlier_margin:.2%} on {len(excess)} of {len(series)} "
                                          f"tester/sites: the score threshold no longer fits the population")
    if drifting:
        places = sorted({s.label for where in drifting.values() for s, _ in where})
        strongest = sorted(drifting, key=lambda t: -max(v for _, v in drifting[t]))[:3]
        return "do not retrain; investigate", (
            f"drift is confined to {', '.join(places[:5])}{' ...' if len(places) > 5 else ''} (tests "
            f"{', '.join(model.columns[t] for t in strongest)}); the rest of the fleet matches the reference. "
            f"Check the tester, probe card or setup there: retraining would teach the model a fault.")
    return "no retrain needed", (f"no test above PSI {config.psi_threshold} on {len(measured)} tester/site(s); "
                                 f"worst PSI {worst[0]:.3f} ({worst[1]} at {worst[2]}, n = {worst[3]})")


# ---- plots ---------------------------------------------------------------------------------------------------

def _overview_heatmap(model: _Model, series: list[_Series], config: AlertConfig) -> bytes:
    matrix = np.array([_recent_psi(model, s, config)[0] for s in series]).T      # [T, series]
    order = np.argsort(-np.nan_to_num(np.nanmax(matrix, axis=1, initial=0.0), nan=-1.0))[:OVERVIEW_TESTS]
    figure, axes = plt.subplots(figsize=(max(6.0, 0.5 * len(series) + 3), max(3.0, 0.3 * len(order) + 1.5)))
    image = axes.imshow(np.ma.masked_invalid(matrix[order]), aspect="auto", cmap="viridis", vmin=0,
                        vmax=PSI_COLOR_MAX)
    axes.set_xticks(range(len(series)), [s.label for s in series], rotation=60, ha="right", fontsize=8)
    axes.set_yticks(range(len(order)), [model.columns[t] for t in order], fontsize=8)
    axes.set_title(f"recent PSI (latest {RECENT_PARTS} parts per tester/site; blank: < {config.psi_min_parts} "
                   f"readings)", fontsize=9)
    figure.colorbar(image, ax=axes, label="PSI (0.1 watch, 0.2 act)")
    return _png(figure)


def _time_heatmap(model: _Model, series: list[_Series], config: AlertConfig) -> bytes:
    ends = np.concatenate([s.ends for s in series])
    edges = np.linspace(ends.min(), ends.max() + 1e-6, min(TIME_BUCKETS, len(np.unique(ends))) + 1)
    rows, labels = [], []
    for s in series:
        bucket = np.searchsorted(edges, s.ends, side="right") - 1
        summed = np.zeros((len(edges) - 1, *model.reference.shape), dtype=np.int64)
        for b, counts in zip(bucket, s.counts):
            summed[b] += counts
        values = psi(summed, model.reference)                                      # [buckets, T]
        values = np.where(summed.sum(axis=2) >= config.psi_min_parts, values, np.nan)
        for t in range(len(model.columns)):
            rows.append(values[:, t])
            labels.append(f"{s.label} {model.columns[t]}")
    matrix = np.array(rows)
    order = np.argsort(-np.nan_to_num(np.nanmax(matrix, axis=1, initial=0.0), nan=-1.0))[:HEATMAP_ROWS]
    figure, axes = plt.subplots(figsize=(10, max(3.0, 0.3 * len(order) + 1.5)))
    image = axes.imshow(np.ma.masked_invalid(matrix[order]), aspect="auto", cmap="viridis", vmin=0,
                        vmax=PSI_COLOR_MAX, extent=(0, len(edges) - 1, len(order), 0))
    axes.set_yticks(np.arange(len(order)) + 0.5, [labels[i] for i in order], fontsize=8)
    ticks = np.linspace(0, len(edges) - 1, min(6, len(edges)))
    axes.set_xticks(ticks, [_hhmm(edges[0] + (edges[-1] - edges[0]) * x / (len(edges) - 1)) for x in ticks],
                    fontsize=8)
    axes.set_title(f"PSI per time bucket (counts summed per bucket); the {len(order)} worst tester/site x test",
                   fontsize=9)
    figure.colorbar(image, ax=axes, label="PSI")
    return _png(figure)


def _worst_histograms(model: _Model, series: list[_Series], config: AlertConfig) -> bytes:
    candidates = []
    for s in series:
        values, n = _recent_psi(model, s, config)
        counts = s.recent()[0]
        candidates += [(float(values[t]), s, t, int(n[t]), counts[t]) for t in range(len(model.columns))
                       if not np.isnan(values[t])]
    worst = sorted(candidates, key=lambda c: -c[0])[:WORST_SHOWN]
    figure, grid = plt.subplots(2, 3, figsize=(12, 6), squeeze=False)
    for axes in grid.flat[len(worst):]:
        axes.axis("off")
    if not worst:
        grid[0, 0].text(0.5, 0.5, f"no test has {config.psi_min_parts} readings yet", ha="center")
    for axes, (value, s, t, n, counts) in zip(grid.flat, worst):
        bins = len(model.edges[t]) + 1
        x = np.arange(bins)
        axes.bar(x - 0.2, model.reference[t, :bins], width=0.4, label="reference")
        axes.bar(x + 0.2, counts[:bins] / max(n, 1), width=0.4, label="recent")
        axes.set_xticks(x, _bin_labels(model.edges[t]), rotation=60, fontsize=6)
        axes.set_title(f"{model.columns[t]} @ {s.label}\nPSI {value:.2f}, n = {n}", fontsize=8)
        axes.legend(fontsize=6)
    figure.tight_layout()
    return _png(figure)


def _outlier_rates(series: list[_Series], models: dict[str, _Model]) -> bytes:
    figure, axes = plt.subplots(figsize=(10, 4))
    testers = sorted({s.tester for s in series})
    for tester in testers:
        mine = [s for s in series if s.tester == tester]
        ends = np.concatenate([s.ends for s in mine])
        parts = np.concatenate([s.parts for s in mine])
        outliers = np.concatenate([s.outliers for s in mine])
        unique, index = np.unique(ends, return_inverse=True)
        rate = np.bincount(index, outliers) / np.maximum(np.bincount(index, parts), 1)
        axes.plot([dt.datetime.fromtimestamp(e) for e in unique], rate * 100, marker=".", label=tester)
    for model in models.values():
        axes.axhline(model.expected_outlier_rate * 100, linestyle="--", color="gray")
        axes.annotate(f"expected, {model.label}", (0.0, model.expected_outlier_rate * 100), fontsize=7,
                      xycoords=("axes fraction", "data"), va="bottom", color="gray")
    axes.set_ylabel("outlier rate per window (%)")
    if testers:
        axes.legend(fontsize=7, ncol=max(1, len(testers) // 10))
    locator = matplotlib.dates.AutoDateLocator()
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(matplotlib.dates.ConciseDateFormatter(locator))
    return _png(figure)


def _bin_labels(edges: list[float]) -> list[str]:
    if not edges:
        return ["all"]
    return ([f"<{edges[0]:.3g}"] + [f"{a:.3g}..{b:.3g}" for a, b in zip(edges, edges[1:])]
            + [f">={edges[-1]:.3g}"])


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


# ---- tables and the page ---------------------------------------------------------------------------------------

def _agent_rows(agents, agent_models, models: dict[str, _Model], config: AlertConfig) -> list[tuple]:
    seen: dict[str, list[str]] = {}
    for row in agent_models:
        seen.setdefault(row["agent_id"], []).append(f"{row['name']}/{row['version']} ({row['windows']})")
    now = time.time()
    rows = []
    for a in agents:
        model = models.get(a["model_checksum"])
        status = "silent" if a["silent_since"] is not None or now - a["last_seen"] > config.silent_after_s else "alive"
        rows.append((a["agent_id"], a["tester"], model.label if model else a["model_checksum"][:12],
                     ", ".join(seen.get(a["agent_id"], [])),
                     f"{_iso(a['last_seen'])} ({now - a['last_seen']:.0f} s ago)",
                     a["last_seq"], a["windows"], a["dropped_total"] + a["unspooled_lost"], status))
    return rows


class _Page:
    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []
        self.images = 0

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def table(self, header: list[str], rows: list[tuple]) -> None:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body or '<tr><td>none</td></tr>'}"
                          f"</tbody></table>")

    def image(self, png: bytes, alt: str) -> None:
        self.images += 1
        data = base64.b64encode(png).decode()
        self.parts.append(f'<figure><img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
                          f"<figcaption>{html.escape(alt)}</figcaption></figure>")

    def render(self) -> str:
        return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>"
                f"<h1>{html.escape(self.title)}</h1>{''.join(self.parts)}</body></html>")


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left;vertical-align:top}"
        "th{background:#f0f0f0}img.plot{max-width:100%}figure{margin:1em 0}figcaption{color:#666;font-size:12px}")


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds")


def _hhmm(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime("%m-%d %H:%M")

