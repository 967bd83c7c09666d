"""Latency at a tester's cadence: steady 1 to 1,000 parts/s and touchdown bursts, against its bare pyzmq floor.

A tester does not send parts at a fixed high rate: a touchdown of 4 to 16 sites sends their parts at once, then
the handler moves for a fraction of a second to seconds. Each profile sends parts on its schedule (open loop,
``bench.open_loop``: latency from the scheduled send, no coordinated omission) to one agent as deployed (drift
on, tcp loopback) and, in the same run, the same payloads to a bare pyzmq echo in its own process
(``bench.echo``): the floor. For paused cadences the floor's sends sit half a period after the agent's, so both
see the same pauses and never overlap; at 1,000 parts/s the floor runs just before the agent.

The agent samples its own stages (``--stage-sample-every 1`` here; edge_agent/daemon/stages.py): each profile's
breakdown comes from the health reply (``stages_since``). The models' in-process time is measured in this
process on the same rows with the agent's own loading code: the yardstick of the agent's own time.

Keys ``cadence.<profile>.*``; see bench/KEYS.md.
"""
from __future__ import annotations

import gc
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import zmq

from bench.e2e_latency import MODEL, WARM_UP_PARTS, _percentiles, score_message
from bench.open_loop import LATE_S, behind_schedule, dealer, scheduled_figures, send_on_schedule
from bench.site import AgentSite
from edge_agent.client import AgentClient
from edge_agent.keys import load_trusted_keys
from edge_agent.package.registry import Registry
from edge_agent.package.signing import Trust
from edge_agent.daemon.scoring import load_package
from edge_agent.wire.score import SCORE_TOUCHDOWN, request_message

SPEC_US = 10_000.0          # the spec: a decision within 10 ms for every device
INTERLEAVE_MIN_PERIOD_S = 0.01   # below this the floor runs before the agent instead of between its parts
ECHO_START_TIMEOUT_S = 30.0
MODEL_TIMED_ROWS = 2_000
CADENCE_MODEL_S = {True: 2.0, False: 10.0}   # seconds of models-at-cadence timing per profile (quick, full)


@dataclass(frozen=True)
class Profile:
    """``sites`` parts at once every ``every_s`` seconds (a steady rate: one part, every 1 / rate); with
    ``one_message`` each touchdown is one score_touchdown message (its latency every site's)."""
    name: str
    sites: int
    every_s: float
    full_parts: int
    quick_parts: int
    one_message: bool = False

    @property
    def burst(self) -> bool:
        return self.sites > 1

    def parts(self, quick: bool) -> int:
        return self.quick_parts if quick else self.full_parts

    def messages(self, parts: int) -> int:
        """Requests that send ``parts`` parts: one per touchdown with ``one_message``, else one per part."""
        return -(-parts // self.sites) if self.one_message else parts

    def due(self, parts: int) -> np.ndarray:
        """Scheduled send times (s from the start) of ``parts`` parts: whole touchdowns."""
        return np.repeat(np.arange(-(-parts // self.sites)) * self.every_s, self.sites)[:parts]


def _steady(rate: int, full: int, quick: int) -> Profile:
    return Profile(f"steady_{rate}", 1, 1.0 / rate, full, quick)


def _burst(sites: int, every_s: float, full: int, quick: int) -> Profile:
    return Profile(f"burst_{sites}_every_{round(every_s * 1000)}ms", sites, every_s, full, quick)


def _touchdown(sites: int, every_s: float, full: int, quick: int) -> Profile:
    return Profile(f"touchdown_{sites}_every_{round(every_s * 1000)}ms", sites, every_s, full, quick, True)


# Full run: about a minute per paused profile, 100,000 parts at 1,000 parts/s (the spec's count): ~11 min in all.
PROFILES = (_steady(1, 60, 3), _steady(10, 600, 20), _steady(100, 6_000, 200), _steady(1_000, 100_000, 2_000),
            _burst(4, 0.2, 1_200, 40), _burst(8, 0.5, 960, 32), _burst(16, 1.0, 960, 32), _burst(16, 2.0, 480, 32),
            _burst(4, 2.0, 120, 8), _touchdown(16, 1.0, 960, 32), _touchdown(16, 0.5, 960, 32))
QUICK = ("steady_1", "steady_10", "steady_100", "steady_1000", "burst_4_every_200ms", "burst_16_every_2000ms",
         "touchdown_16_every_1000ms")
FLOOR_PARTS_UNPAUSED = {True: 1_000, False: 20_000}   # floor parts when it cannot interleave (quick, full)


def plan(quick: bool) -> list[Profile]:
    return [p for p in PROFILES if not quick or p.name in QUICK]


def run(site: AgentSite, quick: bool) -> dict:
    model = load_bench_model(site)
    figures: dict = {**models_inproc(model, site.readings[:MODEL_TIMED_ROWS])}
    for profile in plan(quick):
        figures.update(models_at_cadence(model, site.readings, profile, quick))
    endpoint = site.endpoint("tcp")
    echo = start_echo(site.endpoint("tcp"))
    agent = site.start_agent(endpoint, "--stage-sample-every", "1", drift=True)
    try:
        with AgentClient(endpoint, timeout_ms=1_000.0) as client:
            for i in range(WARM_UP_PARTS):
                client.score(site.readings[i], site.identities[i])
            # This process trained the package: a full collection of its heap would stall the "test program" for
            # tens of ms. A real test program is small; only objects made from here on are collected.
            gc.collect()
            gc.freeze()
            for profile in plan(quick):
                before = client.health(timeout_ms=10_000)
                measured = measure(profile, profile.parts(quick), FLOOR_PARTS_UNPAUSED[quick], site, endpoint,
                                   echo[1])
                after = client.health(timeout_ms=10_000, stages_since=before["stages"]["taken"])
                key = f"cadence.{profile.name}"
                figures.update(profile_figures(key, measured, after["stages"], figures["cadence.models_inproc.p50_us"],
                                               figures[f"{key}.models_at_cadence.p50_us"],
                                               after["parts_scored_ahead"] - before["parts_scored_ahead"]))
                figures.update(slow_figures(key, before["slow_replies"], after["slow_replies"]))
    finally:
        figures["cadence.agent_exit_status"] = site.stop_agent(agent)
        stop_echo(echo[0])
    figures.update(worst(figures, quick))
    return figures


def measure(profile: Profile, parts: int, floor_parts: int, site: AgentSite, agent_endpoint: str,
            echo_endpoint: str) -> dict:
    """Send ``parts`` parts on the profile's schedule to the agent and the echo (``floor_parts`` of them when the
    floor runs first); per target, the arrays of ``send_on_schedule`` and the mask of its requests. The site's
    stream is sent round and round, each part as the site of its touchdown."""
    readings, identities = site.readings[WARM_UP_PARTS:], site.identities[WARM_UP_PARTS:]
    due = profile.due(parts)
    sites = np.tile(np.arange(1, profile.sites + 1), -(-parts // profile.sites))[:parts]

    def message(i: int, rid: int) -> dict:
        k = i % parts
        row = k % len(readings)
        return score_message(rid, readings[row], {**identities[row], "site": int(sites[k])})

    if profile.one_message:   # one message per touchdown: the sites' score requests' fields as its parts
        per_site, parts, floor_parts = message, profile.messages(parts), profile.messages(floor_parts)
        due = due[::profile.sites]

        def message(i: int, rid: int) -> dict:
            first = (i % parts) * profile.sites
            items = [per_site(first + s, rid) for s in range(profile.sites)]
            return request_message(SCORE_TOUCHDOWN, rid, parts=[{"part": item["part"], "readings": item["readings"]}
                                                                for item in items])

    sockets = [dealer(agent_endpoint), dealer(echo_endpoint)]
    try:
        if profile.every_s >= INTERLEAVE_MIN_PERIOD_S:
            all_due = np.concatenate([due, due + profile.every_s / 2])
            order = np.argsort(all_due, kind="stable")
            target = np.repeat([0, 1], parts)[order]
            sent = send_on_schedule(sockets, all_due[order], target, lambda i, rid: message(int(order[i]), rid))
            return {"agent": (sent, target == 0), "floor": (sent, target == 1)}
        floor_parts = min(parts, floor_parts)
        floor = send_on_schedule([sockets[1]], due[:floor_parts], np.zeros(floor_parts, dtype=int), message)
        agent = send_on_schedule([sockets[0]], due, np.zeros(parts, dtype=int), message)
        return {"agent": (agent, None), "floor": (floor, None)}
    finally:
        for socket in sockets:
            socket.close(linger=0)


def profile_figures(key: str, measured: dict, stages: dict, models_us: float, models_at_cadence_us: float,
                    scored_ahead: int) -> dict:
    """e2e, agent, floor and stage figures of one profile, with the ratios the targets are stated in;
    ``scored_ahead``: the agent's parts whose graphs ran in an earlier request's call (health parts_scored_ahead)."""
    agent_sent, agent_mask = measured["agent"]
    floor_sent, floor_mask = measured["floor"]
    agent, floor = scheduled_figures(agent_sent, agent_mask), scheduled_figures(floor_sent, floor_mask)
    e2e, own = agent["from_due_us"], agent["agent_us"]
    late = behind_schedule(agent_sent, agent_mask) + behind_schedule(floor_sent, floor_mask)
    figures = {f"{key}.parts": len(e2e), f"{key}.no_decision": agent["no_decision"],
               **tail(f"{key}.e2e", e2e), **tail(f"{key}.agent", own), **tail(f"{key}.floor", floor["from_due_us"]),
               f"{key}.late_sends": late, f"{key}.behind_schedule": late > 0}
    if len(e2e) and len(floor["from_due_us"]):
        p50, p99 = np.percentile(e2e, [50, 99])
        floor_p50, floor_p99 = np.percentile(floor["from_due_us"], [50, 99])
        figures[f"{key}.ratio_e2e_over_floor_p50"] = round(float(p50 / floor_p50), 2)
        figures[f"{key}.ratio_e2e_p99_over_p50"] = round(float(p99 / p50), 2)
        # The same tail ratio of the bare echo: what this machine allows any program answering over this transport.
        figures[f"{key}.ratio_floor_p99_over_p50"] = round(float(floor_p99 / floor_p50), 2)
    if len(own):
        figures[f"{key}.ratio_agent_over_models_p50"] = round(float(np.median(own) / models_us), 2)
        figures[f"{key}.ratio_agent_over_models_at_cadence_p50"] = round(float(np.median(own) / models_at_cadence_us),
                                                                         2)
    figures.update({f"{key}.stage.{name}.{figure}": value for name, summary in stages["by_stage"].items()
                    for figure, value in summary.items()})
    figures[f"{key}.stage.samples"] = stages["samples"]
    figures[f"{key}.scored_ahead_share"] = round(scored_ahead / len(e2e), 3) if len(e2e) else None
    return figures


def slow_figures(key: str, before: dict, after: dict) -> dict:
    """The agent's slow replies during a profile (over its slow_reply_ms, edge_agent/daemon/slow.py), by their
    largest cause: what the agent was doing when a reply was late."""
    causes = {cause: count - before["by_cause"].get(cause, 0) for cause, count in after["by_cause"].items()}
    return {f"{key}.slow_replies": after["total"] - before["total"], f"{key}.slow_threshold_ms": after["threshold_ms"],
            **{f"{key}.slow.{cause}": count for cause, count in sorted(causes.items()) if count}}


def tail(prefix: str, values: np.ndarray) -> dict:
    """p50, p99, p99.9, max and the count over the 10 ms spec, in us."""
    return {**_percentiles(prefix, values, (50, 99, 99.9)), f"{prefix}.over_10ms": int(np.sum(values > SPEC_US))}


def worst(figures: dict, quick: bool) -> dict:
    """The figures the targets are judged on: the worst ratio over the profiles each target names, the replies
    over 10 ms at 1,000 parts/s and in the bursts, and whether the client fell behind in any of them; beside the
    tail targets, the bare echo's own figures over the same profiles."""
    profiles = plan(quick)
    paced = [p.name for p in profiles if p.burst or p.name == "steady_1000"]   # the e2e and 10 ms targets
    out = {}
    for name, ratio, among in (("ratio_e2e_over_floor_p50", "ratio_e2e_over_floor_p50", paced),
                               ("ratio_agent_over_models_p50", "ratio_agent_over_models_p50",
                                [p.name for p in profiles]),
                               ("ratio_agent_over_models_at_cadence_p50", "ratio_agent_over_models_at_cadence_p50",
                                [p.name for p in profiles]),
                               ("ratio_e2e_p99_over_p50", "ratio_e2e_p99_over_p50", paced),
                               ("ratio_floor_p99_over_p50", "ratio_floor_p99_over_p50", paced)):
        values = [(figures[f"cadence.{p}.{ratio}"], p) for p in among if f"cadence.{p}.{ratio}" in figures]
        if values:
            out[f"cadence.worst.{name}"], out[f"cadence.worst.{name}_profile"] = max(values)
    out["cadence.over_10ms"] = sum(figures.get(f"cadence.{p}.e2e.over_10ms", 0) for p in paced)
    out["cadence.floor_over_10ms"] = sum(figures.get(f"cadence.{p}.floor.over_10ms", 0) for p in paced)
    out["cadence.behind_schedule"] = [p.name for p in profiles if figures.get(f"cadence.{p.name}.behind_schedule")]
    out["cadence.late_send_threshold_us"] = LATE_S * 1e6
    return out


def load_bench_model(site: AgentSite):
    """The benchmark package loaded by the agent's own code, trusting the benchmark's signer as its agents do."""
    registry = Registry(site.registry_root, trust=Trust(load_trusted_keys(site.keys.trusted), str(site.keys.trusted)))
    return load_package(registry, registry.resolve(MODEL, stage="production"))


def models_inproc(model, rows: np.ndarray) -> dict:
    """Both graphs on one row, in this process, back to back: the models' time with every cache warm."""
    took = _scored_us(model, rows, np.zeros(len(rows)))
    return {"cadence.models_inproc.p50_us": round(float(np.median(took)), 1),
            "cadence.models_inproc.p99_us": round(float(np.percentile(took, 99)), 1)}


def models_at_cadence(model, readings: np.ndarray, profile: Profile, quick: bool) -> dict:
    """Both graphs on one row, in this process, on the profile's schedule (sleeping between touchdowns, as the agent
    waits between requests), for at most ``CADENCE_MODEL_S`` seconds.

    Why: on this VM an idle core comes back slow. The same call measured 50 us back to back, 98 us after a 0.2 ms
    sleep, 179 us after 1 ms and 294 us after 10 ms, but 61-107 us after the same gaps spent spinning: the cost is the
    guest's idle (halt) and wake-up, not the models. The agent's time at a cadence is compared with this as well as
    with the warm figure, so the ratio says what the agent adds, not what the machine takes back."""
    budget = CADENCE_MODEL_S[quick]
    parts = min(profile.parts(quick), len(readings), max(profile.sites, int(budget / profile.every_s) * profile.sites))
    took = _scored_us(model, readings[:parts], profile.due(parts))
    key = f"cadence.{profile.name}.models_at_cadence"
    return {f"{key}.parts": parts, f"{key}.p50_us": round(float(np.median(took)), 1),
            f"{key}.p99_us": round(float(np.percentile(took, 99)), 1)}


def _scored_us(model, rows: np.ndarray, due: np.ndarray) -> np.ndarray:
    """Microseconds of ``model.score`` on each row, row i called ``due[i]`` seconds after the start (sleeping until
    then; all zeros: back to back)."""
    took = np.empty(len(rows))
    start = time.perf_counter()
    for i, row in enumerate(rows):
        wait = start + due[i] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        began = time.perf_counter()
        model.score(row[None, :])
        took[i] = time.perf_counter() - began
    return took * 1e6


def start_echo(endpoint: str) -> tuple[subprocess.Popen, str]:
    """``bench.echo`` on ``endpoint``; returns once it echoes."""
    process = subprocess.Popen([sys.executable, "-m", "bench.echo", endpoint])
    socket = dealer(endpoint)
    try:
        deadline = time.monotonic() + ECHO_START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            socket.send(b"ping")
            if socket.poll(200, zmq.POLLIN):
                socket.recv()
                return process, endpoint
        stop_echo(process)
        raise RuntimeError(f"the bare pyzmq echo on {endpoint} did not answer within {ECHO_START_TIMEOUT_S:.0f} s")
    finally:
        socket.close(linger=0)


def stop_echo(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
