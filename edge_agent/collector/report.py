"""The fleet drift report: one self-contained HTML page (plots embedded as PNG data URIs).

It leads with the open incidents (``incidents.py``: scope, diagnosis, tests, what to do) and the retrain
recommendation they make per model; then the agents, PSI heat maps per model (against each site's own
baseline, which is what incidents judge, and against the training reference, which is what the model was
trained on), PSI over time, histograms, outlier rates and the operational alerts.

PSI here is computed from the stored bin counts, summed over time, not averaged from per-window PSI: a sum of
counts is a bigger sample, so the figure is less noisy. "Recent" means each tester/site's latest windows up to
``RECENT_PARTS`` parts. Heat maps colour PSI in bands (``PSI_BANDS``) and print the value in every cell, so that
0.2 (lot-to-lot), 1 and 5 (a broken site) never share a colour.
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
from matplotlib.colors import BoundaryNorm, ListedColormap  # noqa: E402

from ..wire.codec import decode_trusted  # noqa: E402
from ..wire.distances import psi  # noqa: E402
from .alerts import EVIDENCE_KINDS, AlertConfig, load_alert_config  # noqa: E402
from .store import Store  # noqa: E402

RECENT_PARTS = 1000        # parts per tester/site behind a "recent" figure
TIME_BUCKETS = 24          # columns of the PSI-over-time heat map at most
HEATMAP_ROWS = 20          # tester/site x test pairs in the PSI-over-time heat map
OVERVIEW_TESTS = 25        # tests in the tests x tester/site heat tables
WORST_SHOWN = 6            # histograms
ALERTS_SHOWN = 50
CLOSED_SHOWN = 50
TESTS_SHOWN = 5            # tests named per incident
# PSI bands: lower edge, colour, meaning. Light to dark; the text turns white from 1 up.
PSI_BANDS = ((0.0, "#f4f4f4", "< 0.1 stable"), (0.1, "#d9f0d3", "0.1-0.2 watch"), (0.2, "#fee08b", "0.2-0.5 act"),
             (0.5, "#fdae61", "0.5-1"), (1.0, "#f46d43", "1-2"), (2.0, "#d73027", "2-5"), (5.0, "#67001f", ">= 5"))
BAND_EDGES = np.array([edge for edge, _, _ in PSI_BANDS])


@dataclass
class _Series:
    """One tester/site running one model: its windows in time order, and its baseline (None: none stored)."""

    model: str
    agent_id: str
    tester: str
    head: int
    site: int
    ends: list[float] = field(default_factory=list)
    parts: list[int] = field(default_factory=list)
    outliers: list[int] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)    # [T, max_bins] each
    baseline: np.ndarray | None = None                         # [T, max_bins] proportions
    judged: np.ndarray | None = None        # [T] PSI of the latest judged block against the baseline (NaN: not judged)

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
    pat_screens: list[dict]      # the package's PAT screen checks (empty: a package or agent before them)

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
        known, series = _load(store, since)
        models = {c: m for c, m in known.items() if any(s.model == c for s in series)}
        agents = store.agents()
        evidence = ", ".join("?" * len(EVIDENCE_KINDS))
        alerts = store.db.execute(f"SELECT * FROM alerts WHERE created_at >= ? AND kind NOT IN ({evidence}) "
                                  f"ORDER BY created_at DESC LIMIT ?",
                                  (since, *EVIDENCE_KINDS, ALERTS_SHOWN)).fetchall()
        evidence_alerts = store.db.execute(f"SELECT count(*) FROM alerts WHERE created_at >= ? AND kind IN "
                                           f"({evidence})", (since, *EVIDENCE_KINDS)).fetchone()[0]
        agent_models = store.db.execute(
            "SELECT w.agent_id, m.name, m.version, count(*) AS windows, max(w.end) AS last FROM windows w "
            "JOIN models m ON m.checksum = w.model_checksum WHERE w.end >= ? GROUP BY w.agent_id, m.checksum "
            "ORDER BY w.agent_id, last", (since,)).fetchall()
        open_incidents = _incidents(store, "status = 'open'", ())
        closed = _incidents(store, "status = 'closed' AND closed_at >= ?", (since,), CLOSED_SHOWN)
        closed_total = store.db.execute("SELECT count(*) FROM incidents WHERE status = 'closed' AND closed_at >= ?",
                                        (since,)).fetchone()[0]
    finally:
        store.close()
    page = _Page(f"Fleet drift report: {Path(db).name}")
    page.text(f"Generated {_iso(time.time())} from {db}"
              + (f", the last {since_hours:g} h" if since_hours else "") + f": {len(open_incidents)} open "
              f"incident(s); {closed_total} incident(s) closed"
              + (f" (the latest {len(closed)} shown)" if closed_total > len(closed) else "")
              + f"; {len(models)} model(s); {len(agents)} agent(s); {len(series)} tester/site(s) with "
              f"{sum(len(s.ends) for s in series)} site-windows; {len(alerts)} operational alert(s) shown.")
    page.heading(f"Open incidents ({len(open_incidents)})")
    page.table(["#", "diagnosis", "where", "model", "tests: PSI against baseline (noise level)", "since", "parts",
                "what it says"], [_incident_row(i, tests) for i, tests in open_incidents])
    page.heading(f"Retrain recommendation per model ({len(models)})")
    page.table(["model", "recommendation", "why"], [_recommendation(m, open_incidents) for m in models.values()])
    page.heading("PAT screens per model, as trained (good and failing parts flagged on later training parts)")
    page.table(["model", "screen", "good flagged", "failing flagged", "verdict"],
               [row for model in models.values() for row in _screen_rows(model)])
    page.heading(f"Closed incidents ({closed_total})")
    page.table(["#", "diagnosis", "where", "model", "tests: PSI against baseline (noise level)", "from", "closed",
                "why closed"], [_closed_row(i, tests) for i, tests in closed])
    page.heading(f"Agents and their model versions ({len(agents)})")
    page.table(["agent", "tester", "current model", "models in range (windows)", "last seen", "last seq",
                "windows", "spool losses", "status"],
               _agent_rows(agents, agent_models, known, config))
    for model in models.values():
        model_series = [s for s in series if s.model == model.checksum]
        page.heading(f"Model {model.label}: PSI of tests by tester/site against each site's own baseline")
        page.raw(_heat_table(model, model_series, config, baseline=True))
        page.heading(f"Model {model.label}: recent PSI of tests by tester/site against the training reference")
        page.raw(_heat_table(model, model_series, config, baseline=False))
        page.heading(f"Model {model.label}: PSI over time against the training reference")
        page.image(_time_heatmap(model, model_series, config), f"PSI over time, {model.label}")
        page.heading(f"Model {model.label}: the most moved tests, histograms")
        page.image(_worst_histograms(model, model_series, config), f"most moved tests, {model.label}")
    page.heading("Outlier rate per tester over time")
    page.image(_outlier_rates(series, models), "outlier rate per tester over time")
    page.heading(f"Latest operational alerts ({len(alerts)}, at most {ALERTS_SHOWN})")
    page.text(f"Drift evidence ({', '.join(EVIDENCE_KINDS)}: {evidence_alerts} in range) is in the alerts table of "
              f"the database; the incidents above are what it amounts to.")
    page.table(["time", "kind", "tester", "message"],
               [(_iso(a["created_at"]), a["kind"], a["tester"] or "", a["message"]) for a in alerts])
    Path(out).write_text(page.render(), encoding="utf-8")
    return (f"wrote {out}: {len(open_incidents)} open incident(s), {len(models)} model(s), {len(series)} tester/site "
            f"series, {page.images} plot(s), {len(alerts)} alert(s)")


# ---- loading -------------------------------------------------------------------------------------------------

def _load(store: Store, since: float) -> tuple[dict[str, _Model], list[_Series]]:
    """Every model (by checksum), and the tester/site series with windows in range."""
    models = {}
    for row in store.db.execute("SELECT * FROM models"):
        reference = decode_trusted(row["reference"])
        models[row["checksum"]] = _Model(row["checksum"], row["name"], row["version"], decode_trusted(row["columns"]),
                                         row["expected_outlier_rate"], _padded(reference["proportions"]),
                                         reference["edges"], reference.get("pat_screens", []))
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
        s.ends.append(row["end"])
        s.parts.append(row["parts"])
        s.outliers.append(row["outliers"])
        s.counts.append(_padded(decode_trusted(row["counts"]), model.reference.shape))
    for (agent_id, checksum, head, site), (counts, _, _, _) in store.baselines().items():
        s = series.get((checksum, agent_id, head, site))
        if s is not None and counts.sum() > 0:
            s.baseline = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    for (agent_id, checksum, head, site), (values, _) in store.judged_psi().items():
        s = series.get((checksum, agent_id, head, site))
        if s is not None:
            s.judged = np.array([np.nan if v is None else v for v in values])
    return models, sorted(series.values(), key=lambda s: (s.tester, s.head, s.site))


def _screen_rows(model: _Model) -> list[tuple]:
    """A screen that does not separate good from failing parts says so: the agents report its breaks, never bin."""
    return [(model.label, screen["kind"], _flagged_share(screen["good_flagged"], screen["good_parts"]),
             _flagged_share(screen["fail_flagged"], screen["fail_parts"]),
             "DOES NOT SEPARATE: reported, not binned" if screen["verdict"] == "does not separate"
             else screen["verdict"]) for screen in model.pat_screens]


def _flagged_share(flagged: int, parts: int) -> str:
    return f"{flagged / parts:.1%} ({flagged} of {parts})" if parts else "no parts"


def _padded(rows: list[list[float]], shape: tuple[int, int] | None = None) -> np.ndarray:
    out = np.zeros(shape or (len(rows), max((len(r) for r in rows), default=1)))
    for t, r in enumerate(rows):
        out[t, :len(r)] = r
    return out


def _incidents(store: Store, where: str, parameters: tuple, limit: int = -1) -> list[tuple]:
    rows = store.db.execute(f"SELECT * FROM incidents WHERE {where} ORDER BY opened_at DESC LIMIT ?",
                            (*parameters, limit)).fetchall()
    return [(row, store.db.execute("SELECT * FROM incident_tests WHERE incident_id = ? ORDER BY psi_peak DESC",
                                    (row["id"],)).fetchall()) for row in rows]


# ---- incidents and the recommendation -------------------------------------------------------------------------

def _where(incident) -> str:
    if incident["scope"] == "site":
        return f"{incident['tester']} h{incident['head']}/s{incident['site']}"
    if incident["scope"] == "tester":
        return f"{incident['tester']} (most of its sites)"
    testers = sorted(tester for _, tester, _ in decode_trusted(incident["members"]))
    return f"{len(testers)} testers: {', '.join(testers)}"


def _tests(tests) -> str:
    shown = [f"{t['test']} {_psi_text(t['psi_peak'])} ({_psi_text(t['noise'])})" for t in tests[:TESTS_SHOWN]]
    return "; ".join(shown) + (f"; and {len(tests) - TESTS_SHOWN} more" if len(tests) > TESTS_SHOWN else "")


def _incident_row(incident, tests) -> tuple:
    return (incident["id"], incident["diagnosis"], _where(incident), incident["model"], _tests(tests),
            _iso(incident["start"]), incident["parts"], incident["summary"])


def _closed_row(incident, tests) -> tuple:
    return (incident["id"], incident["diagnosis"], _where(incident), incident["model"], _tests(tests),
            _iso(incident["start"]), _iso(incident["closed_at"]), incident["closed_because"] or "")


def _recommendation(model: _Model, open_incidents: list[tuple]) -> tuple[str, str, str]:
    """Retrain only when an open fleet incident found the model's outputs moved with the process."""
    mine = [row for row, _ in open_incidents if row["model_checksum"] == model.checksum]
    retrain = [row for row in mine if row["retrain"]]
    if retrain:
        return model.label, "retrain", " ".join(row["recommendation"] for row in retrain)
    if mine:
        return model.label, "no retrain", " ".join(f"#{row['id']}: {row['recommendation']}" for row in mine)
    return model.label, "no retrain needed", "no open incident: every tester/site is at its own baseline"


# ---- heat maps -------------------------------------------------------------------------------------------------

def _recent_psi(model: _Model, s: _Series, config: AlertConfig) -> np.ndarray:
    """PSI per test over the series' recent counts against the training reference (NaN below ``psi_min_parts``)."""
    counts, _, _ = s.recent()
    return np.where(counts.sum(axis=1) >= config.psi_min_parts, psi(counts, model.reference), np.nan)


def _against(model: _Model, s: _Series, config: AlertConfig, baseline: bool) -> np.ndarray:
    """What a heat table shows: the latest judged block against the site's baseline, or recent PSI against the
    training reference."""
    if not baseline:
        return _recent_psi(model, s, config)
    return s.judged if s.judged is not None else np.full(len(model.columns), np.nan)


def _band(value: float) -> int:
    return int(np.searchsorted(BAND_EDGES, value, side="right") - 1)


def _psi_text(value) -> str:
    return "-" if value is None or np.isnan(value) else f"{value:.2g}"


def _heat_table(model: _Model, series: list[_Series], config: AlertConfig, *, baseline: bool) -> str:
    """Tests (the most moved first) x tester/site as an HTML table: banded colour and the value in every cell."""
    matrix = np.array([_against(model, s, config, baseline) for s in series]).T                 # [T, series]
    if not series or np.isnan(matrix).all():
        missing = "a baseline (sites learn one from their first blocks)" if baseline else \
            f"{config.psi_min_parts} readings"
        return f"<p>No tester/site has {html.escape(missing)} yet.</p>"
    order = np.argsort(-np.nan_to_num(np.nanmax(matrix, axis=1, initial=0.0), nan=-1.0))[:OVERVIEW_TESTS]
    head = "".join(f"<th>{html.escape(s.label)}</th>" for s in series)
    body = []
    for t in order:
        cells = "".join(_heat_cell(v) for v in matrix[t])
        body.append(f"<tr><th>{html.escape(model.columns[t])}</th>{cells}</tr>")
    what = ("PSI of each tester/site's latest judged block against its own baseline (as the incidents judged it; "
            "'-': not judged, no baseline yet)" if baseline else
            f"PSI of each tester/site's latest {RECENT_PARTS} parts against the training reference ('-': fewer than "
            f"{config.psi_min_parts} readings)")
    return (f'<div class="wide"><table class="heat"><thead><tr><th>test</th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div><p class="note">{what}; the {len(order)} most moved of '
            f"{len(model.columns)} tests.</p>{_legend()}")


def _heat_cell(value: float) -> str:
    if np.isnan(value):
        return '<td class="heat">-</td>'
    _, colour, _ = PSI_BANDS[_band(value)]
    ink = "#fff" if value >= 1.0 else "#000"
    return f'<td class="heat" data-psi="{value:.6g}" style="background:{colour};color:{ink}">{_psi_text(value)}</td>'


def _legend() -> str:
    swatches = "".join(f'<td data-psi="{edge:g}" style="background:{colour};color:{"#fff" if edge >= 1 else "#000"}">'
                       f"{html.escape(label)}</td>" for edge, colour, label in PSI_BANDS)
    return f'<table class="legend"><tr><th>PSI</th>{swatches}</tr></table>'


def _time_heatmap(model: _Model, series: list[_Series], config: AlertConfig) -> bytes:
    ends = np.concatenate([s.ends for s in series])
    edges = np.linspace(ends.min(), ends.max() + 1e-6, min(TIME_BUCKETS, len(np.unique(ends))) + 1)
    rows, labels = [], []
    for s in series:
        bucket = np.searchsorted(edges, s.ends, side="right") - 1
        summed = np.zeros((len(edges) - 1, *model.reference.shape), dtype=np.int64)
        for b, counts in zip(bucket, s.counts):
            summed[b] += counts.astype(np.int64)
        values = psi(summed, model.reference)                                      # [buckets, T]
        values = np.where(summed.sum(axis=2) >= config.psi_min_parts, values, np.nan)
        for t in range(len(model.columns)):
            rows.append(values[:, t])
            labels.append(f"{s.label} {model.columns[t]}")
    matrix = np.array(rows)
    order = np.argsort(-np.nan_to_num(np.nanmax(matrix, axis=1, initial=0.0), nan=-1.0))[:HEATMAP_ROWS]
    shown = matrix[order]
    figure, axes = plt.subplots(figsize=(max(10.0, 0.45 * shown.shape[1] + 4), max(3.0, 0.3 * len(order) + 1.5)))
    colours = ListedColormap([colour for _, colour, _ in PSI_BANDS])
    norm = BoundaryNorm([*BAND_EDGES, 1e12], colours.N)
    image = axes.imshow(np.ma.masked_invalid(shown), aspect="auto", cmap=colours, norm=norm,
                        extent=(0, len(edges) - 1, len(order), 0))
    for (row, column), value in np.ndenumerate(shown):
        if not np.isnan(value):
            axes.text(column + 0.5, row + 0.5, _psi_text(value), ha="center", va="center", fontsize=6,
                      color="white" if value >= 1.0 else "black")
    axes.set_yticks(np.arange(len(order)) + 0.5, [labels[i] for i in order], fontsize=8)
    ticks = np.linspace(0, len(edges) - 1, min(6, len(edges)))
    clock = "%H:%M:%S" if edges[-1] - edges[0] < 3600 else "%m-%d %H:%M"
    axes.set_xticks(ticks, [_clock(edges[0] + (edges[-1] - edges[0]) * x / (len(edges) - 1), clock) for x in ticks],
                    fontsize=8)
    axes.set_title(f"PSI per time bucket (counts summed per bucket); the {len(order)} most moved tester/site x test",
                   fontsize=9)
    bar = figure.colorbar(image, ax=axes, label="PSI (banded)", ticks=BAND_EDGES)
    bar.ax.set_yticklabels([f"{edge:g}" for edge in BAND_EDGES])
    return _png(figure)


def _worst_histograms(model: _Model, series: list[_Series], config: AlertConfig) -> bytes:
    """The most moved (series, test) pairs: as judged against the site's own baseline where it has been, else
    recent parts against the reference."""
    candidates = []
    for s in series:
        values = _against(model, s, config, s.judged is not None)
        counts = s.recent()[0]
        candidates += [(float(values[t]), s, t, counts[t]) for t in range(len(model.columns))
                       if not np.isnan(values[t])]
    worst = sorted(candidates, key=lambda c: -c[0])[:WORST_SHOWN]
    figure, grid = plt.subplots(2, 3, figsize=(12, 6.5), squeeze=False)
    for axes in grid.flat[len(worst):]:
        axes.axis("off")
    if not worst:
        grid[0, 0].text(0.5, 0.5, f"no test has {config.psi_min_parts} readings yet", ha="center")
    for axes, (value, s, t, counts) in zip(grid.flat, worst):
        bins = len(model.edges[t]) + 1
        x = np.arange(bins)
        bars = [("training reference", model.reference[t, :bins])]
        if s.judged is not None and s.baseline is not None:
            bars.append(("site baseline", s.baseline[t, :bins]))
        bars.append(("recent", counts[:bins] / max(counts[:bins].sum(), 1)))
        width = 0.8 / len(bars)
        for i, (name, heights) in enumerate(bars):
            axes.bar(x + (i - (len(bars) - 1) / 2) * width, heights, width=width, label=name)
        axes.set_xticks(x, bin_labels(model.edges[t]), rotation=60, fontsize=6)
        against = "latest judged block against its baseline" if s.judged is not None else "recent against reference"
        axes.set_title(f"{model.columns[t]} @ {s.label}\nPSI {value:.2f} ({against}); recent n = "
                       f"{int(counts[:bins].sum())}", fontsize=8)
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


def bin_labels(edges: list[float]) -> list[str]:
    """Bin labels with the fewest significant digits (3 at least) that keep every edge distinct.

    >>> bin_labels([1.2001, 1.2002, 1.2004])
    ['<1.2001', '1.2001..1.2002', '1.2002..1.2004', '>=1.2004']
    >>> bin_labels([0.5, 1.25])
    ['<0.5', '0.5..1.25', '>=1.25']
    """
    if not edges:
        return ["all"]
    digits = next((d for d in range(3, 16) if len({f"{e:.{d}g}" for e in edges}) == len(set(edges))), 16)
    text = [f"{e:.{digits}g}" for e in edges]
    return [f"<{text[0]}"] + [f"{a}..{b}" for a, b in zip(text, text[1:])] + [f">={text[-1]}"]


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
                     ", ".join(seen.get(a["agent_id"], [])) or "none in range",
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

    def raw(self, markup: str) -> None:
        self.parts.append(markup)

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
        "th{background:#f0f0f0}img.plot{max-width:100%}figure{margin:1em 0}figcaption{color:#666;font-size:12px}"
        "table.heat td,table.heat th{font-size:11px;padding:2px 4px;text-align:right;white-space:nowrap}"
        "table.legend td{font-size:11px;padding:2px 8px}p.note{color:#666;font-size:12px}div.wide{overflow-x:auto}")


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds")


def _clock(timestamp: float, layout: str) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime(layout)
