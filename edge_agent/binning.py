"""The bin recommendation: which of the conditions that fired for a part decides its bin, and why.

Conditions, checked for every part:

- ``static_pat``: a reading outside the manifest's static PAT limits;
- ``dynamic_pat``: a reading outside its site's rolling-window PAT limits;
- ``ml_outlier``: the Isolation Forest score below the package's calibrated threshold;
- ``predicted_fail``: the yield model's pass probability below the package's threshold.

The policy's ``order`` lists the conditions that may decide, most important first; the first one that
fired gives the bin. A condition left out of ``order`` is still reported in the reply's ``flags`` but never
changes the bin: that is how a new model is watched beside PAT before it is allowed to bin parts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .pat import PatBreak

CONDITIONS = ("static_pat", "dynamic_pat", "ml_outlier", "predicted_fail")
PASS = "pass"
MAX_TESTS_NAMED = 3


def _default_bins() -> dict[str, int]:
    return {PASS: 1, "static_pat": 21, "dynamic_pat": 22, "ml_outlier": 23, "predicted_fail": 24}


@dataclass(frozen=True)
class BinPolicy:
    order: tuple[str, ...] = CONDITIONS
    bins: dict[str, int] = field(default_factory=_default_bins)

    def __post_init__(self) -> None:
        problems = check_policy(self.order, self.bins)
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class Decision:
    bin: int
    name: str         # "pass" or the deciding condition
    why: str
    flags: list[str]  # every condition that fired, in CONDITIONS order


def check_policy(order: tuple[str, ...] | list[str], bins: dict[str, int]) -> list[str]:
    problems = []
    unknown = [name for name in order if name not in CONDITIONS]
    if unknown:
        problems.append(f"order names unknown condition(s) {unknown}; expected any of {list(CONDITIONS)}")
    if len(set(order)) != len(order):
        problems.append(f"order lists a condition twice: {list(order)}")
    for name in (PASS, *order):
        number = bins.get(name)
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= 65535:
            problems.append(f"bins.{name}: expected a bin number 0..65535, got {number!r}")
    extra = set(bins) - {PASS, *CONDITIONS}
    if extra:
        problems.append(f"bins names unknown condition(s) {sorted(extra)}; expected any of {[PASS, *CONDITIONS]}")
    return problems


def decide(policy: BinPolicy, *, static: list[PatBreak], dynamic: list[PatBreak], score: float,
           score_threshold: float, pass_probability: float, pass_threshold: float) -> Decision:
    fired = {"static_pat": bool(static), "dynamic_pat": bool(dynamic), "ml_outlier": score < score_threshold,
             "predicted_fail": pass_probability < pass_threshold}
    flags = [name for name in CONDITIONS if fired[name]]
    for name in policy.order:
        if fired[name]:
            return Decision(policy.bins[name], name,
                            _why(name, static, dynamic, score, score_threshold, pass_probability, pass_threshold),
                            flags)
    why = "no deciding condition fired" if not flags else f"observed only (not in the bin order): {', '.join(flags)}"
    return Decision(policy.bins[PASS], PASS, why, flags)


def _why(name: str, static: list[PatBreak], dynamic: list[PatBreak], score: float, score_threshold: float,
         pass_probability: float, pass_threshold: float) -> str:
    if name == "static_pat":
        return f"static PAT: {_tests(static)}"
    if name == "dynamic_pat":
        return f"dynamic PAT (site window): {_tests(dynamic)}"
    if name == "ml_outlier":
        return f"outlier score {score:.4g} below threshold {score_threshold:.4g}"
    return f"pass probability {pass_probability:.3f} below {pass_threshold:.3g}"


def _tests(breaks: list[PatBreak]) -> str:
    named = ", ".join(f"{b.test}={b.value:.5g} outside [{_fmt(b.low, '-inf')}, {_fmt(b.high, '+inf')}]"
                      for b in breaks[:MAX_TESTS_NAMED])
    more = f" and {len(breaks) - MAX_TESTS_NAMED} more" if len(breaks) > MAX_TESTS_NAMED else ""
    return f"{len(breaks)} test(s) outside limits: {named}{more}"


def _fmt(limit: float | None, unbounded: str) -> str:
    return unbounded if limit is None else f"{limit:.5g}"
