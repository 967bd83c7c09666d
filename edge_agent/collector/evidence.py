"""Promotion gates from fleet evidence: what the collector knows of a canary or shadow version, judged against stated
thresholds (``edge-train registry gate NAME VERSION``; ``promote`` to production refuses a failing gate unless
forced with a reason).

Two kinds of evidence, each judged when present:

- shadow: the challenger's agreement counts shipped with the drift windows (``shadow_sites``): bin agreement with
  the champion on the same parts, the outlier scores' correlation, and the differences of outlier rate, predicted-
  fail rate and disagreement with PAT (ML outlier call against a PAT break) between challenger and champion;
- canary: the decisions the version made on the testers it was deployed to (``decisions``, from the audit) against
  the control testers over the same hours (other versions of the model on the agents that never ran it): outlier
  rate, predicted-fail rate and PAT disagreement, each as a difference.

Both count the incidents the collector opened on the version. Too few parts is a failure: no evidence, no promotion.
"""
from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass


@dataclass(frozen=True)
class Thresholds:
    min_parts: int = 500                   # parts scored by the version (shadow or canary)
    min_agreement: float = 0.98            # shadow: share of parts binned alike by challenger and champion
    min_score_correlation: float = 0.95    # shadow: Pearson correlation of the two outlier scores
    max_outlier_rate_diff: float = 0.01    # |version - champion (shadow) or control (canary)|
    max_fail_rate_diff: float = 0.02
    max_pat_disagreement_diff: float = 0.02
    max_incidents: int = 0


@dataclass
class Check:
    name: str
    value: float | None
    limit: float
    passed: bool
    at_least: bool = False    # the value must reach the limit (else: stay within it)

    def line(self) -> str:
        value = "n/a" if self.value is None else f"{self.value:.4g}"
        op = ">=" if self.at_least else "<="
        return f"  {'PASS' if self.passed else 'FAIL'}  {self.name:<58} {value:>10}  (needs {op} {self.limit:g})"


def judge(db: sqlite3.Connection, name: str, version: str, thresholds: Thresholds = Thresholds()
          ) -> tuple[bool, list[str]]:
    """(passed, report lines) for ``name``/``version`` from the collector's database."""
    lines, checks = [f"gate for {name}/{version} (collector evidence)"], []
    shadow = _shadow(db, name, version)
    canary = _canary(db, name, version)
    if shadow["parts"]:
        lines.append(f"shadow: {shadow['parts']} parts scored beside the champion on {shadow['agents']} agent(s), "
                     f"{shadow['skipped']} skipped (queue full)")
        checks += [_at_least("parts scored in shadow", shadow["parts"], thresholds.min_parts),
                   _at_least("agreement (same bin)", shadow["agreement"], thresholds.min_agreement),
                   _at_least("score correlation", shadow["correlation"], thresholds.min_score_correlation),
                   *_differences("shadow", shadow, thresholds)]
    if canary["parts"]:
        lines.append(f"canary: {canary['parts']} parts decided on {canary['agents']} agent(s); control: "
                     f"{canary['control_parts']} parts of other versions on {canary['control_agents']} agent(s) "
                     "over the same hours")
        checks += [_at_least("parts decided as canary", canary["parts"], thresholds.min_parts),
                   _at_least("parts decided by control testers", canary["control_parts"], thresholds.min_parts),
                   *_differences("canary", canary, thresholds)]
    if not checks:
        lines.append("no evidence: the version was neither scored in shadow nor decided parts as a canary")
        checks.append(_at_least("parts scored in shadow or as canary", 0, thresholds.min_parts))
    incidents = db.execute("SELECT count(*) FROM incidents WHERE model_checksum IN (SELECT checksum FROM models "
                           "WHERE name = ? AND version = ?)", (name, version)).fetchone()[0]
    checks.append(Check("incidents opened on the version", incidents, thresholds.max_incidents,
                        incidents <= thresholds.max_incidents))
    passed = all(check.passed for check in checks)
    lines += [check.line() for check in checks]
    lines.append(f"gate {'PASSED' if passed else 'FAILED'}: {sum(not c.passed for c in checks)} of {len(checks)} "
                 "checks failed")
    return passed, lines


def failing_reason(lines: list[str]) -> str:
    """The failed checks in one line, as a promotion hold records it."""
    failed = [line.strip()[6:].split("(needs")[0].strip() for line in lines if line.strip().startswith("FAIL ")]
    return "fleet gate failed: " + "; ".join(" ".join(item.split()) for item in failed)


# ---- evidence ---------------------------------------------------------------------------------------------------

def _shadow(db: sqlite3.Connection, name: str, version: str) -> dict:
    row = db.execute(
        "SELECT count(DISTINCT agent_id), sum(parts), sum(agree), sum(n), sum(sx), sum(sy), sum(sxx), sum(syy), "
        "sum(sxy), sum(champion_outliers), sum(challenger_outliers), sum(champion_fails), sum(challenger_fails), "
        "sum(champion_pat_disagree), sum(challenger_pat_disagree), sum(skipped) FROM shadow_sites "
        "WHERE challenger_name = ? AND challenger_version = ?", (name, version)).fetchone()
    agents, parts, agree, n, sx, sy, sxx, syy, sxy, co, xo, cf, xf, cp, xp, skipped = (value or 0 for value in row)
    if not parts:
        return {"parts": 0}
    correlation = None
    if n > 1:
        var_x, var_y = n * sxx - sx * sx, n * syy - sy * sy
        if var_x > 0 and var_y > 0:
            correlation = (n * sxy - sx * sy) / math.sqrt(var_x * var_y)
    return {"parts": parts, "agents": agents, "skipped": skipped, "agreement": agree / parts,
            "correlation": correlation, "outlier_rate": (xo / parts, co / parts), "fail_rate": (xf / parts, cf / parts),
            "pat_disagreement": (xp / parts, cp / parts)}


_RATES = ("SELECT count(*), count(DISTINCT agent_id), avg(instr(flags, 'ml_outlier') > 0), "
          "avg(instr(flags, 'predicted_fail') > 0), avg((instr(flags, 'ml_outlier') > 0) != "
          "(instr(flags, 'static_pat') > 0 OR instr(flags, 'dynamic_pat') > 0)) FROM decisions "
          "WHERE model_name = ? AND outlier_score IS NOT NULL AND ")


def _canary(db: sqlite3.Connection, name: str, version: str) -> dict:
    span = db.execute("SELECT min(time), max(time) FROM decisions WHERE model_name = ? AND model_version = ?",
                      (name, version)).fetchone()
    if span[0] is None:
        return {"parts": 0}
    parts, agents, outliers, fails, pat = db.execute(_RATES + "model_version = ?", (name, version)).fetchone()
    control = db.execute(_RATES + "model_version != ? AND time BETWEEN ? AND ? AND agent_id NOT IN (SELECT agent_id "
                         "FROM decisions WHERE model_name = ? AND model_version = ?)",
                         (name, version, *span, name, version)).fetchone()
    c_parts, c_agents, c_outliers, c_fails, c_pat = control
    return {"parts": parts, "agents": agents, "control_parts": c_parts, "control_agents": c_agents,
            "outlier_rate": (outliers, c_outliers), "fail_rate": (fails, c_fails), "pat_disagreement": (pat, c_pat)}


def _differences(kind: str, evidence: dict, thresholds: Thresholds) -> list[Check]:
    against = "champion" if kind == "shadow" else "control"
    checks = []
    for key, label, limit in (("outlier_rate", "outlier rate", thresholds.max_outlier_rate_diff),
                              ("fail_rate", "predicted-fail rate", thresholds.max_fail_rate_diff),
                              ("pat_disagreement", "PAT disagreement", thresholds.max_pat_disagreement_diff)):
        mine, theirs = evidence[key]
        value = None if mine is None or theirs is None else abs(mine - theirs)
        checks.append(Check(f"{label} difference vs {against} ({_pct(mine)} vs {_pct(theirs)})", value, limit,
                            value is not None and value <= limit))
    return checks


def _at_least(name: str, value, limit) -> Check:
    return Check(name, value, limit, value is not None and value >= limit, at_least=True)


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.2%}"
