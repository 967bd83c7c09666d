"""What an incident says: the evidence per test behind it, its diagnosis, the one sentence with the numbers to
check it, and whether it recommends a retrain (a fleet incident whose model outputs moved with the process).

``incidents.py`` decides which incident a movement belongs to and keeps it; this module reads a judged block
(``baselines.Verdict``) or an incident and writes the incident's evidence, text and retrain verdict.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..wire.distances import psi
from .baselines import ModelBins, SiteCounts, Verdict, binomial_z, noise_and_threshold

if TYPE_CHECKING:   # annotations only: incidents.py imports this module
    from .incidents import Incident, IncidentConfig

SITE, TESTER, FLEET = "site", "tester", "fleet"
SCOPES = (SITE, TESTER, FLEET)
DIAGNOSES = {SITE: "site fault", TESTER: "tester or handler fault", FLEET: "process or material moved"}
CHECKS = {SITE: "check contacts, probe card and site calibration there",
          TESTER: "check the tester and handler there (calibration, temperature, contactor, instruments)"}
RATE_Z = 4.0                   # an outlier-rate rise this many standard errors above the baseline rate is real
TESTS_NAMED = 5                # tests an incident's sentence names (the rest are counted)


@dataclass
class Evidence:
    """One test of an incident: its latest and largest PSI against the baseline, the noise level at the latest
    sample sizes, and the comparisons beside it (NaN where they do not apply)."""

    psi: float
    psi_peak: float
    noise: float
    n: int
    n_baseline: int
    psi_siblings: float        # site: median of the sibling sites against their own baselines
    psi_fleet: float           # tester: this tester's block against the other testers' blocks of the same period
    psi_reference: float       # against the training reference
    first_seen: float
    last_seen: float

    def update(self, new: Evidence) -> None:
        self.psi_peak = max(self.psi_peak, new.psi)
        self.psi, self.noise, self.n, self.n_baseline = new.psi, new.noise, new.n, new.n_baseline
        self.psi_siblings, self.psi_fleet, self.psi_reference = new.psi_siblings, new.psi_fleet, new.psi_reference
        self.last_seen = new.last_seen


def site_evidence(verdict: Verdict, row: int, t: int) -> Evidence:
    """One test of one site that moved: against the site's own baseline, its siblings and the reference."""
    block = verdict.block
    return Evidence(float(verdict.psi[row, t]), float(verdict.psi[row, t]), float(verdict.noise[row, t]),
                    int(verdict.n[row, t]), int(verdict.n_baseline[row, t]), float(verdict.psi_siblings[row, t]),
                    float("nan"), float(verdict.psi_reference[row, t]), block.start, block.end)


def tester_evidence(model: ModelBins, verdict: Verdict, tests: set[int],
                    others: list[SiteCounts] = ()) -> dict[str, Evidence]:
    """Per test: the median site PSI against their own baselines, and this tester's pooled block against the
    training reference and against ``others`` (the other testers' pooled blocks of the same period)."""
    block = verdict.block
    pooled = block.pooled().counts
    reference = psi(pooled, model.reference)
    fleet = np.full(len(model.columns), np.nan)
    if others:
        rest = sum(other.counts for other in others)
        with np.errstate(invalid="ignore", divide="ignore"):
            fleet = psi(pooled, rest / np.maximum(rest.sum(axis=1, keepdims=True), 1.0))
    return {model.columns[t]: Evidence(float(verdict.tester_psi[t]), float(verdict.tester_psi[t]),
                                       float(verdict.tester_noise[t]), int(np.nansum(verdict.n[:, t])),
                                       int(np.nansum(verdict.n_baseline[:, t])), float("nan"), float(fleet[t]),
                                       float(reference[t]), block.start, block.end)
            for t in sorted(tests)}


def describe(incident: Incident, model: ModelBins, baselines: dict[tuple, SiteCounts],
             config: IncidentConfig) -> None:
    """The incident's summary and recommendation (and for a fleet incident its retrain verdict), from its evidence."""
    tests = sorted(incident.tests.items(), key=lambda item: -item[1].psi_peak)
    named = ", ".join(name for name, _ in tests[:TESTS_NAMED]) + (
        f" and {len(tests) - TESTS_NAMED} more" if len(tests) > TESTS_NAMED else "")
    peaks = [e.psi_peak for _, e in tests]
    spread = f"PSI {min(peaks):.2f}" + (f" to {max(peaks):.2f}" if len(peaks) > 1 else "")
    noise = max(e.noise for _, e in tests)
    what = f"{len(tests)} test(s) ({named})"
    if incident.scope == SITE:
        siblings = np.nanmax([e.psi_siblings for _, e in tests])
        incident.summary = (f"site fault at {incident.tester} head {incident.head} site {incident.site} "
                            f"({model.label}): {what} moved against the site's own baseline ({spread}, noise "
                            f"level {noise:.3f}, n = {tests[0][1].n} vs {tests[0][1].n_baseline} readings) "
                            f"while its sibling sites held (their median PSI at most {siblings:.2f}); "
                            f"{CHECKS[SITE]}.")
        incident.recommendation = (f"No retrain: one site of {incident.tester} is off (head {incident.head} site "
                                   f"{incident.site}); retraining would teach the model the fault.")
    elif incident.scope == TESTER:
        others = incident.others
        fleet = [e.psi_fleet for _, e in tests if not np.isnan(e.psi_fleet)]
        against = (f"while {others} other tester(s) of this model held in the same period (this tester "
                   f"against them: PSI up to {max(fleet):.2f})" if others and fleet else
                   "with no other tester of this model reporting in the same period (a tester fault cannot "
                   "be told from a process change without one)")
        incident.summary = (f"tester or handler fault at {incident.tester} ({model.label}): {what} moved on most "
                            f"of its sites against their own baselines (median {spread}, noise level "
                            f"{noise:.3f}) {against}; {CHECKS[TESTER]}.")
        incident.recommendation = (f"No retrain: {incident.tester} moved alone; retraining would teach the model "
                                   f"the fault.")
    else:
        judge_outputs(incident, model, baselines, config)
        incident.summary = (f"process or material moved ({model.label}): {what} moved together on "
                            f"{len(incident.members)} testers ({', '.join(incident.testers())}) against each "
                            f"tester's own baseline ({spread}, noise level {noise:.3f}). "
                            + incident.recommendation)

def judge_outputs(incident: Incident, model: ModelBins, baselines: dict[tuple, SiteCounts],
                  config: IncidentConfig) -> None:
    """Did the model's outputs move with the process? Score histogram and outlier rate of the moved blocks
    against the same testers' baselines."""
    moved = incident.moved_outputs
    if moved is None:                   # reloaded after a restart: the verdict stored stays until new blocks
        return
    bases = [b for (agent_id, checksum, _, _), b in baselines.items()
             if checksum == incident.checksum and agent_id in incident.members]
    base_scores = sum(b.score_counts for b in bases)
    base_parts, base_outliers = sum(b.parts for b in bases), sum(b.outliers for b in bases)
    n, n_base = moved.score_counts.sum(), base_scores.sum()
    incident.score_psi = float(psi(moved.score_counts, base_scores / max(n_base, 1.0)))
    incident.score_noise, significant = noise_and_threshold(model.score_bins, n, n_base, config.false_alarm)
    incident.outlier_rate = moved.outliers / max(moved.parts, 1.0)
    incident.baseline_outlier_rate = base_outliers / max(base_parts, 1.0)
    rose = (incident.outlier_rate > incident.baseline_outlier_rate + config.outlier_margin
            and binomial_z(incident.outlier_rate, moved.parts, incident.baseline_outlier_rate, base_parts) > RATE_Z)
    incident.retrain = incident.score_psi > max(config.score_psi, significant) or rose
    outputs = (f"score histogram PSI {incident.score_psi:.2f} against the same testers' baselines (noise level "
               f"{incident.score_noise:.3f}), outlier rate {incident.outlier_rate:.2%} against "
               f"{incident.baseline_outlier_rate:.2%} before (model expects {model.expected_outlier_rate:.2%}; "
               f"{int(moved.parts)} parts)")
    incident.recommendation = (f"Retrain {model.label}: the process moved on {len(incident.members)} testers and "
                               f"the model's outputs moved with it: {outputs}." if incident.retrain else
                               f"No retrain: the process moved on {len(incident.members)} testers but the "
                               f"model's outputs did not: {outputs}.")

def event(incident: Incident, what: str, now: float) -> dict:
    """The alert event of an incident opened, updated or closed."""
    tests = sorted(incident.tests, key=lambda name: -incident.tests[name].psi_peak)
    return {"kind": f"incident_{what}", "incident_id": incident.id, "scope": incident.scope,
            "diagnosis": incident.diagnosis, "model": incident.model, "agent_id": incident.agent_id,
            "tester": incident.tester or ", ".join(incident.testers()), "head": incident.head,
            "site": incident.site, "test": tests[0] if tests else None, "tests": tests,
            "retrain": incident.retrain, "recommendation": incident.recommendation, "created_at": now,
            "message": f"incident #{incident.id} {what}: {incident.summary}"}
