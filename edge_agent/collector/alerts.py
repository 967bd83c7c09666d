"""Alert rules on stored windows, their thresholds (the ``[alerts]`` table of a TOML file) and the hook.

Kinds: ``psi`` (a test's PSI above the threshold at one tester/site, with its sample size), ``site_psi`` (one
site of a tester against the pooled other sites of the same tester in the same window: a tester problem that a
new lot, which moves every site together, does not raise), ``outlier_rate``
(above the model's expected rate by a margin) - both judged on counts summed over windows until there are
enough parts (see ``AlertRules``) - ``change`` (the agent's Page-Hinkley detector fired on the
outlier score), ``silent`` (no message from an agent for too long), ``spool_loss`` (the agent dropped
windows from its spool, or lost them before spooling), ``sequence_gap`` (windows missing that no
loss report explains), ``agent_id_mismatch`` (a window claiming another agent's id than its CURVE key's) and
``refused_window`` (a message refused for good: it can never be stored, and the agent moves it to its dead-letter
folder). Every alert goes to the ``alerts`` table (same transaction as its window). The operational ones
(``silent``, ``spool_loss``, ``sequence_gap``, ``agent_id_mismatch``, ``refused_window``) also go to the log and,
if configured, to a hook command that gets the alert as JSON on stdin; the drift evidence (``psi``, ``site_psi``,
``outlier_rate``, ``change``: a new lot or a site's calibration offset raises them by the dozen on a normal day) is
logged at INFO and pages nobody. Drift pages as incidents (``incidents.py``: scope, diagnosis, one record per
problem), which go to the same hook.

Example ``collector.toml`` (every key optional; these are the defaults)::

    [alerts]
    psi_threshold = 0.2          # "act" in the usual PSI reading (< 0.1 stable, 0.1-0.2 watch)
    psi_min_parts = 200          # PSI is judged on at least this many readings of a test at a site (see below)
    site_psi_threshold = 0.6     # a site against its sibling sites (3 or more sites); 0 turns it off
    outlier_margin = 0.02        # alert when outlier rate > expected + margin ...
    outlier_min_parts = 500      # ... over at least this many parts of one site
    change_detector = true       # alert when the agent's change detector fired
    silent_after_s = 900.0       # no message for this long (agents send at least one per window)
    repeat_after_s = 3600.0      # the same alert (kind, agent, site, test) at most once per this long
    hook = ""                    # e.g. "/usr/local/bin/page-oncall --team test-eng" (also gets incidents)
    hook_timeout_s = 10.0

    [incidents]                  # see incidents.py

Why these sample sizes: with no drift, n readings over B equally likely bins give PSI close to
chi2(B - 1) / n. At n = 200 and 10 bins, PSI > 0.2 needs chi2(9) > 40, probability about 8e-6 per test and
site; at n = 100 it is chi2(9) > 20, about 2 %, which over hundreds of tests is an alert every window.
For 1 % expected outliers, a rate above 1 % + 2 % over 500 parts (16 outliers or more against 5 expected)
has a binomial tail of about 6e-5.

Why ``site_psi`` has its own, higher threshold: sites of one tester differ permanently by their calibration,
commonly by up to half a robust sigma on some tests (PSI about 0.25 against the siblings, more with sampling
noise), and that is no drift. A normal test moved by 0.8 sigma against its siblings gives PSI about 0.6,
by 1 sigma 0.93, by 1.5 sigma 2.0.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shlex
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..checked import Checked, Instance, Interval, Satisfies, load
from ..errors import EdgeError
from ..wire.distances import psi
from ..wire.stats import StatsWindow
from .incidents import IncidentConfig
from .store import Added

log = logging.getLogger("edge_agent.collector.alerts")

KINDS = ("psi", "site_psi", "outlier_rate", "change", "silent", "spool_loss", "sequence_gap", "agent_id_mismatch",
         "refused_window", "audit_loss")
EVIDENCE_KINDS = ("psi", "site_psi", "outlier_rate", "change")    # stored and counted, not paged: incidents are


class AlertConfigError(EdgeError):
    """An alert configuration that cannot be used (names the file and key)."""


def _splits(command: str) -> bool:
    """Whether the hook command splits into arguments the way ``AlertHook`` runs it."""
    try:
        shlex.split(command)
    except ValueError:
        return False
    return True


@dataclass
class AlertConfig(Checked):
    SCOPE = "alerts"
    ERROR = AlertConfigError
    CONSTRAINTS = {"psi_threshold": [Interval(float, 0, None, closed="neither")],
                   "psi_min_parts": [Interval(int, 1, None)],
                   "site_psi_threshold": [Interval(float, 0, None)],          # 0 turns it off
                   "outlier_margin": [Interval(float, 0, 1)],
                   "outlier_min_parts": [Interval(int, 1, None)],
                   "change_detector": [Instance(bool)],
                   "silent_after_s": [Interval(float, 0, None, closed="neither")],
                   "repeat_after_s": [Interval(float, 0, None)],              # 0: every alert, however often
                   "hook": [Satisfies(str, _splits, "a command line with balanced quotes")],
                   "hook_timeout_s": [Interval(float, 0, None, closed="neither")]}

    psi_threshold: float = 0.2
    psi_min_parts: int = 200
    site_psi_threshold: float = 0.6
    outlier_margin: float = 0.02
    outlier_min_parts: int = 500
    change_detector: bool = True
    silent_after_s: float = 900.0
    repeat_after_s: float = 3600.0
    hook: str = ""
    hook_timeout_s: float = 10.0
    incidents: IncidentConfig = field(default_factory=IncidentConfig)


def _seqs(first: int, last: int) -> str:
    return f"window seq {last}" if first == last else f"windows seq {first}-{last}"


def load_alert_config(path: str | Path | None) -> AlertConfig:
    """Defaults, then the ``[alerts]`` table of ``path``, checked."""
    return load(AlertConfig(), path)


@dataclass
class WindowAlerts:
    alerts: list[dict]
    psi: dict[str, float]        # test -> worst PSI over this agent's sites judged with this window (if any)


@dataclass
class _SiteTally:
    """One (agent, model, head, site): counts summed over windows until there are enough parts to judge."""

    counts: np.ndarray           # [T, max_bins] bin counts since the last PSI verdict
    psi_parts: int = 0
    psi_first_seq: int = 0
    parts: int = 0               # parts and outliers since the last outlier-rate verdict
    outliers: int = 0
    rate_first_seq: int = 0


class AlertRules:
    """Turns stored windows and agent silence into alert rows (dicts with the ``alerts`` table's columns).

    PSI and outlier rate are judged on each site's counts summed over consecutive windows until they hold
    ``psi_min_parts`` (``outlier_min_parts``) parts, then the sums restart: a small window (a slow tester, many
    sites) is judged on enough parts, never on noise. The sums live in memory (a collector restart starts them
    again).
    """

    def __init__(self, config: AlertConfig, last_raised: dict[tuple, float] | None = None):
        self.config = config
        self._last = dict(last_raised or {})
        self._tallies: dict[tuple, _SiteTally] = {}
        self._references: dict[str, np.ndarray] = {}

    def for_window(self, window: StatsWindow, added: Added, now: float) -> WindowAlerts:
        m = window.message
        alerts: list[dict] = []
        worst: dict[str, float] = {}
        base = {"agent_id": m["agent_id"], "tester": m["tester"], "model": window.model_label,
                "window_id": added.window_id, "created_at": now}
        where = f"tester {m['tester']} (agent {m['agent_id']})"
        reference = self._reference(m)
        for site in m["sites"]:
            tally = self._tally(m, site, reference.shape, added)
            place = {**base, "head": site["head"], "site": site["site"]}
            at = f"{where} head {site['head']} site {site['site']}"
            self._judge_psi(m, site, tally, reference, place, at, alerts, worst)
            self._judge_outlier_rate(m, site, tally, place, at, alerts)
            change = site["change"]
            if self.config.change_detector and change["fired"]:
                self._raise(alerts, {**place, "kind": "change", "test": None, "value": change["fires"],
                                     "threshold": None, "sample_size": site["parts"],
                                     "message": f"change detector (Page-Hinkley) fired {change['fires']} time(s) on "
                                                f"the outlier score at {at} (window seq {m['seq']}, "
                                                f"{site['parts']} parts)"})
        self._judge_sites_against_siblings(m, reference.shape, base, where, alerts)
        alerts += self._losses(window, added, base, where)
        return WindowAlerts(alerts, worst)

    def forget_sums(self) -> None:
        """Drop the partial sums (after a failed write: the windows in them come again)."""
        self._tallies.clear()

    def _judge_psi(self, m: dict, site: dict, tally: _SiteTally, reference: np.ndarray, place: dict, at: str,
                   alerts: list[dict], worst: dict[str, float]) -> None:
        c = self.config
        if not tally.psi_parts:
            tally.psi_first_seq = m["seq"]
        for t, counts in enumerate(site["counts"]):
            tally.counts[t, :len(counts)] += counts
        tally.psi_parts += site["parts"]
        if tally.psi_parts < c.psi_min_parts:
            return
        n = tally.counts.sum(axis=1)
        values = np.where(n >= c.psi_min_parts, psi(tally.counts, reference), np.nan)
        span = _seqs(tally.psi_first_seq, m["seq"])
        for t in np.flatnonzero(~np.isnan(values)):
            column, value = m["columns"][t], float(values[t])
            worst[column] = max(worst.get(column, 0.0), value)
            if value > c.psi_threshold:
                self._raise(alerts, {**place, "kind": "psi", "test": column, "value": value,
                                     "threshold": c.psi_threshold, "sample_size": int(n[t]),
                                     "message": f"PSI {value:.3f} > {c.psi_threshold} on test {column} at {at} "
                                                f"(n = {int(n[t])} readings over {len(site['counts'][t])} bins, "
                                                f"{span}, model {place['model']})"})
        tally.counts[:] = 0
        tally.psi_parts = 0

    def _judge_sites_against_siblings(self, m: dict, shape: tuple, base: dict, where: str,
                                      alerts: list[dict]) -> None:
        """PSI of each site's histogram against the other sites' pooled one, per test, in this window.

        The training reference is not involved: a new lot or a process shift moves every site of a tester
        together and stays quiet here, a drifting site stands out. With two sites either could be the one that
        moved, so a test is judged where at least three sites hold ``psi_min_parts`` readings of it.
        """
        c = self.config
        if not c.site_psi_threshold or len(m["sites"]) < 3:
            return
        counts = np.zeros((len(m["sites"]), *shape))
        for s, site in enumerate(m["sites"]):
            for t, test_counts in enumerate(site["counts"]):
                counts[s, t, :len(test_counts)] = test_counts
        n = counts.sum(axis=2)                                  # [sites, tests]
        judged = (n >= c.psi_min_parts).sum(axis=0) >= 3        # [tests]
        total = counts.sum(axis=0)
        values = np.empty(n.shape)
        for s in range(len(m["sites"])):
            rest = total - counts[s]
            values[s] = psi(counts[s], rest / np.maximum(rest.sum(axis=1, keepdims=True), 1))
        values[(n < c.psi_min_parts) | ~judged | np.isnan(values)] = -np.inf
        # One site per test: the most deviant. When one site drifts, its siblings' "rest" includes it and
        # they can look moved too; the drifting site is the one that stands out most.
        for t in np.flatnonzero(values.max(axis=0) > c.site_psi_threshold):
            s = int(np.argmax(values[:, t]))
            site, column, value = m["sites"][s], m["columns"][t], float(values[s, t])
            self._raise(alerts, {**base, "head": site["head"], "site": site["site"], "kind": "site_psi",
                                 "test": column, "value": value, "threshold": c.site_psi_threshold,
                                 "sample_size": int(n[s, t]),
                                 "message": f"PSI {value:.3f} > {c.site_psi_threshold} on test {column} at "
                                            f"{where} head {site['head']} site {site['site']} against its "
                                            f"{len(m['sites']) - 1} sibling sites (n = {int(n[s, t])} vs "
                                            f"{int(total[t].sum() - n[s, t])} readings, window seq {m['seq']}, "
                                            f"model {base['model']})"})

    def _judge_outlier_rate(self, m: dict, site: dict, tally: _SiteTally, place: dict, at: str,
                            alerts: list[dict]) -> None:
        c = self.config
        if not tally.parts:
            tally.rate_first_seq = m["seq"]
        tally.parts += site["parts"]
        tally.outliers += site["outliers"]
        if tally.parts < c.outlier_min_parts:
            return
        expected, rate = m["expected_outlier_rate"], tally.outliers / tally.parts
        if rate > expected + c.outlier_margin:
            self._raise(alerts, {**place, "kind": "outlier_rate", "test": None, "value": rate,
                                 "threshold": expected + c.outlier_margin, "sample_size": tally.parts,
                                 "message": f"outlier rate {rate:.2%} at {at}, expected {expected:.2%} + "
                                            f"{c.outlier_margin:.2%} (n = {tally.parts} parts, "
                                            f"{_seqs(tally.rate_first_seq, m['seq'])}, model {place['model']})"})
        tally.parts = tally.outliers = 0

    def _reference(self, m: dict) -> np.ndarray:
        checksum = m["model"]["checksum"]
        if checksum not in self._references:
            proportions = m["reference"]["proportions"]
            padded = np.zeros((len(proportions), max((len(p) for p in proportions), default=1)))
            for t, p in enumerate(proportions):
                padded[t, :len(p)] = p
            self._references[checksum] = padded
        return self._references[checksum]

    def _tally(self, m: dict, site: dict, shape: tuple, added: Added) -> _SiteTally:
        agent, checksum = m["agent_id"], m["model"]["checksum"]
        if added.previous is not None and added.previous["model_checksum"] != checksum:
            # The agent serves another model now: the sums of the old one will never be judged.
            self._tallies = {k: v for k, v in self._tallies.items() if k[0] != agent or k[1] == checksum}
        key = (agent, checksum, site["head"], site["site"])
        if key not in self._tallies:
            self._tallies[key] = _SiteTally(np.zeros(shape, dtype=np.int64))
        return self._tallies[key]

    def for_silence(self, agents: list, now: float) -> list[dict]:
        """Agents silent for longer than ``silent_after_s`` and not yet alerted for this silence."""
        alerts = []
        for agent in agents:
            quiet = now - agent["last_seen"]
            if agent["silent_since"] is None and quiet > self.config.silent_after_s:
                alerts.append({"kind": "silent", "agent_id": agent["agent_id"], "tester": agent["tester"],
                               "head": None, "site": None, "test": None, "model": None, "value": quiet,
                               "threshold": self.config.silent_after_s, "sample_size": None, "window_id": None,
                               "created_at": now,
                               "message": f"agent {agent['agent_id']} (tester {agent['tester']}) silent for "
                                          f"{quiet:.0f} s (limit {self.config.silent_after_s:.0f} s); last window "
                                          f"seq {agent['last_seq']}"})
        return alerts

    def _losses(self, window: StatsWindow, added: Added, base: dict, where: str) -> list[dict]:
        m, previous = window.message, added.previous
        spool = m["spool"]
        same_stream = previous is not None and previous["stream"] == spool["stream"]
        before = (previous["dropped_total"], previous["unspooled_lost"]) if same_stream else (0, 0)
        alerts = []
        dropped = spool["dropped_total"] - before[0]
        unspooled = spool["unspooled_lost"] - before[1]
        if dropped > 0 or unspooled > 0:
            ranges = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spool["dropped_seq_ranges"][-5:])
            alerts.append({**base, "kind": "spool_loss", "head": None, "site": None, "test": None,
                           "value": dropped + unspooled, "threshold": 0, "sample_size": None,
                           "message": f"{where} lost {dropped + unspooled} window(s): {dropped} dropped from a full "
                                      f"spool (seq {ranges or '-'}; {spool['dropped_total']} in total), "
                                      f"{unspooled} never spooled"})
        if same_stream and m["seq"] > previous["last_seq"] + 1:
            missing, first = _unexplained(previous["last_seq"] + 1, m["seq"] - 1, spool["dropped_seq_ranges"])
            if missing:
                alerts.append({**base, "kind": "sequence_gap", "head": None, "site": None, "test": None,
                               "value": missing, "threshold": 0, "sample_size": None,
                               "message": f"{where}: {missing} window(s) missing before seq {m['seq']} "
                                          f"(first {first}) that no loss report explains"})
        return alerts

    def for_refusal(self, message, code: str, reason: str, now: float) -> list[dict]:
        """A message refused for good (``code``): one alert per sender and repeat interval. ``message``: what was
        received, decoded if it could be; its agent, tester and seq are named when they are usable."""
        fields = message if isinstance(message, dict) else {}
        agent, tester, seq = (_usable(fields.get("agent_id"), str), _usable(fields.get("tester"), str),
                              _usable(fields.get("seq"), int))
        alerts: list[dict] = []
        self._raise(alerts, {"kind": "refused_window", "agent_id": agent, "tester": tester, "head": None,
                             "site": None, "test": None, "model": None, "value": seq, "threshold": None,
                             "sample_size": None, "window_id": None, "created_at": now,
                             "message": f"window seq {seq} of agent {agent} (tester {tester}) refused for good "
                                        f"({code}: {reason[:500]}); the agent keeps it in its dead-letter folder "
                                        f"and goes on with the next window"})
        return alerts

    def for_agent_id_mismatch(self, sender: str, window: StatsWindow, now: float) -> list[dict]:
        """A window whose agent_id is not the id its sender's CURVE key is bound to (a forgery, or a misconfigured
        agent): one alert per sender per ``repeat_after_s``."""
        m, alerts = window.message, []
        self._raise(alerts, {"kind": "agent_id_mismatch", "agent_id": sender, "tester": None, "head": None,
                             "site": None, "test": None, "model": window.model_label, "value": 1, "threshold": None,
                             "sample_size": None, "window_id": None, "created_at": now,
                             "message": f"agent {sender!r} (known by its CURVE key) sent window seq {m['seq']} "
                                        f"claiming to be agent {m['agent_id']!r} (tester {m['tester']!r}); refused, "
                                        "nothing stored"})
        return alerts

    def for_audit_loss(self, batch: dict, before: int, now_lost: int, received_at: float) -> list[dict]:
        """Audit batches an agent lost (its audit spool filled up, or its queue did) since its previous batch: every
        increase is an alert, never suppressed (a lost audit record is a gap in the answer to "which model decided
        this part")."""
        if now_lost <= before:
            return []
        spool = batch["spool"]
        return [{"kind": "audit_loss", "agent_id": batch["agent_id"], "tester": batch["tester"], "head": None,
                 "site": None, "test": None, "model": None, "value": now_lost - before, "threshold": 0,
                 "sample_size": None, "window_id": None, "created_at": received_at,
                 "message": f"agent {batch['agent_id']!r} (tester {batch['tester']!r}) lost {now_lost - before} audit "
                            f"batch(es) of decisions: {spool['dropped_total']} dropped from its full audit spool and "
                            f"{spool['unspooled_lost']} never spooled, in total"}]

    def _raise(self, alerts: list[dict], alert: dict) -> None:
        key = (alert["kind"], alert["agent_id"], alert["head"], alert["site"], alert["test"])
        last = self._last.get(key)
        if last is not None and alert["created_at"] - last < self.config.repeat_after_s:
            return
        self._last[key] = alert["created_at"]
        alerts.append(alert)


def _unexplained(first: int, last: int, ranges: list[list[int]]) -> tuple[int, int | None]:
    """How many of the seqs first..last no [a, b] range covers, and the first of them (interval arithmetic: a gap of
    millions of seqs costs nothing)."""
    missing, first_missing, cursor = 0, None, first
    for a, b in sorted(ranges):
        if cursor > last:
            break
        if a > cursor:
            missing += min(a - 1, last) - cursor + 1
            first_missing = cursor if first_missing is None else first_missing
        cursor = max(cursor, b + 1)
    if cursor <= last:
        missing += last - cursor + 1
        first_missing = cursor if first_missing is None else first_missing
    return missing, first_missing


def _usable(value, kind: type):
    """A field of a refused message worth naming in its alert: of the right type and short."""
    if type(value) is not kind or (kind is str and len(value) > 255) or (kind is int and not 0 <= value < 2 ** 63):
        return None
    return value


class AlertHook:
    """Runs the configured command once per alert on its own thread (a slow hook never delays acks)."""

    def __init__(self, command: str, timeout_s: float):
        self.argv = shlex.split(command)
        self.timeout_s = timeout_s
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="edge-collector-alert-hook", daemon=True)
        self._thread.start()

    def notify(self, alert: dict) -> None:
        self._queue.put(alert)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while (alert := self._queue.get()) is not None:
            env = {**os.environ, "EDGE_ALERT_KIND": alert["kind"], "EDGE_ALERT_MESSAGE": alert["message"],
                   "EDGE_ALERT_TESTER": alert["tester"] or "", "EDGE_ALERT_TEST": alert["test"] or ""}
            try:
                result = subprocess.run(self.argv, input=json.dumps(alert).encode(), env=env, timeout=self.timeout_s,
                                        capture_output=True)
            except (OSError, subprocess.TimeoutExpired) as error:
                log.error("alert hook %s failed: %s", self.argv[0], error)
                continue
            if result.returncode != 0:
                log.error("alert hook %s exited with status %d: %s", self.argv[0], result.returncode,
                          result.stderr.decode(errors="replace").strip()[:500])
