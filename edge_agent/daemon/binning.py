"""The bin recommendation: which of the conditions that fired for a part decides its bin, and why.

Conditions, checked for every part:

- ``static_pat``: a reading outside the manifest's static PAT limits;
- ``dynamic_pat``: a reading outside its site's rolling-window PAT limits;
- ``ml_outlier``: the Isolation Forest score below the package's calibrated threshold;
- ``predicted_fail``: the yield model's pass probability below the package's threshold.

The policy's ``order`` lists the conditions that may decide, most important first; the first one that
fired gives the bin. A condition left out of ``order`` is still reported in the reply's ``flags`` but never
changes the bin: that is how a new model is watched beside PAT before it is allowed to bin parts. The ``why``
gives the deciding condition's reason first, then the reasons of the other conditions that fired, then for an ML
outlier or a PAT break the tests furthest from typical in robust sigmas (``edge_agent.daemon.explain``).

Before any of them: a part with readings for fewer than ``min_readings_share`` of the model's tests gets the
``insufficient_readings`` bin. The models would score its missing readings as training medians, so its outlier
score and pass probability describe the medians, not the part (a sampled datalog, a part with functional results
only, a program that stopped at the first fail); such a part is never binned ``pass`` by them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .explain import Driver
from .pat import PatBreak

CONDITIONS = ("static_pat", "dynamic_pat", "ml_outlier", "predicted_fail")
PASS = "pass"
INSUFFICIENT = "insufficient_readings"
MAX_TESTS_NAMED = 3


def _default_bins() -> dict[str, int]:
    return {PASS: 1, "static_pat": 21, "dynamic_pat": 22, "ml_outlier": 23, "predicted_fail": 24, INSUFFICIENT: 25}


@dataclass(frozen=True)
class BinPolicy:
    order: tuple[str, ...] = CONDITIONS
    bins: dict[str, int] = field(default_factory=_default_bins)
    min_readings_share: float = 0.5     # of the model's tests; below it a part gets the insufficient_readings bin

    def __post_init__(self) -> None:
        problems = check_policy(self.order, self.bins)
        if problems:
            raise ValueError("; ".join(problems))

    def needed_readings(self, n_tests: int) -> int:
        """Readings a part needs for a decision by the models: ``min_readings_share`` of ``n_tests``, at least 1."""
        return max(1, math.ceil(self.min_readings_share * n_tests - 1e-9))


@dataclass(frozen=True)
class Decision:
    bin: int
    name: str         # "pass", the deciding condition or "insufficient_readings"
    why: str
    flags: list[str]  # every condition that fired, in CONDITIONS order (insufficient_readings first)


def check_policy(order: tuple[str, ...] | list[str], bins: dict[str, int]) -> list[str]:
    problems = []
    unknown = [name for name in order if name not in CONDITIONS]
    if unknown:
        problems.append(f"order names unknown condition(s) {unknown}; expected any of {list(CONDITIONS)}")
    if len(set(order)) != len(order):
        problems.append(f"order lists a condition twice: {list(order)}")
    for name in (PASS, INSUFFICIENT, *order):
        number = bins.get(name)
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= 65535:
            problems.append(f"bins.{name}: expected a bin number 0..65535, got {number!r}")
    extra = set(bins) - {PASS, INSUFFICIENT, *CONDITIONS}
    if extra:
        problems.append(f"bins names unknown condition(s) {sorted(extra)}; expected any of "
                        f"{[PASS, INSUFFICIENT, *CONDITIONS]}")
    return problems


def decide(policy: BinPolicy, *, static: list[PatBreak], dynamic: list[PatBreak], score: float,
           score_threshold: float, pass_probability: float, pass_threshold: float,
           drivers: list[Driver] = (), observed_only: frozenset[str] = frozenset()) -> Decision:
    """``drivers``: the tests furthest from typical (``edge_agent.daemon.explain``), named at the end of the why: what
    drove an ML outlier, and how far out a PAT break is (the outlier score saturates; robust sigmas do not).
    ``observed_only``: conditions the package's screen check found flag good parts as often as failing ones
    (``Manifest.pat.screens``): reported, never deciding."""
    fired = {"static_pat": bool(static), "dynamic_pat": bool(dynamic), "ml_outlier": score < score_threshold,
             "predicted_fail": pass_probability < pass_threshold}
    flags = [name for name in CONDITIONS if fired[name]]
    if not flags:
        return Decision(policy.bins[PASS], PASS, "no deciding condition fired", flags)
    reasons = {name: _why(name, static, dynamic, score, score_threshold, pass_probability, pass_threshold)
               for name in flags}
    named = f"; furthest from typical: {', '.join(d.describe() for d in drivers)}" if drivers else ""
    deciding = deciding_condition(policy, {name: on and name not in observed_only for name, on in fired.items()})
    for name in observed_only & set(flags):
        reasons[name] += " (observed only: this package's screen check found it flags good parts as often as " \
                         "failing ones)"
    if deciding is None:
        return Decision(policy.bins[PASS], PASS,
                        "observed only (not in the bin order): " + "; ".join(reasons.values()) + named, flags)
    also = [reason for name, reason in reasons.items() if name != deciding]
    return Decision(policy.bins[deciding], deciding, "; also ".join([reasons[deciding], *also]) + named, flags)


def deciding_condition(policy: BinPolicy, fired: dict[str, bool]) -> str | None:
    """The first condition of the policy's order that fired (None: none did, the part passes): what gives the bin."""
    return next((name for name in policy.order if fired[name]), None)


def decide_insufficient(policy: BinPolicy, *, present: int, tests: int, static: list[PatBreak]) -> Decision:
    """The decision for a part with readings for fewer than ``policy.needed_readings(tests)`` of the model's tests:
    its own bin; static PAT breaks of the readings it has are still flagged and named."""
    why = (f"insufficient readings: {present} of the model's {tests} tests have readings, a decision needs "
           f"{policy.needed_readings(tests)} ({policy.min_readings_share:.0%}); outlier score and pass probability "
           "not meaningful")
    flags = [INSUFFICIENT]
    if static:
        flags.append("static_pat")
        why += f"; also {_why('static_pat', static, [], 0.0, 0.0, 1.0, 0.0)}"
    return Decision(policy.bins[INSUFFICIENT], INSUFFICIENT, why, flags)


def _why(name: str, static: list[PatBreak], dynamic: list[PatBreak], score: float, score_threshold: float,
         pass_probability: float, pass_threshold: float) -> str:
    if name == "static_pat":
        return f"static PAT: {_tests(static)}"
    if name == "dynamic_pat":
        return f"dynamic PAT (site window): {_tests(dynamic)}"
    if name == "ml_outlier":
        return f"ML outlier: score {score:.4g} below threshold {score_threshold:.4g}"
    return f"pass probability {pass_probability:.3f} below {pass_threshold:.3g}"


def _tests(breaks: list[PatBreak]) -> str:
    named = ", ".join(f"{b.test}={b.value:.5g} outside [{_fmt(b.low, '-inf')}, {_fmt(b.high, '+inf')}]"
                      for b in breaks[:MAX_TESTS_NAMED])
    more = f" and {len(breaks) - MAX_TESTS_NAMED} more" if len(breaks) > MAX_TESTS_NAMED else ""
    return f"{len(breaks)} test(s) outside limits: {named}{more}"


def _fmt(limit: float | None, unbounded: str) -> str:
    return unbounded if limit is None else f"{limit:.5g}"
