"""Sending on a schedule, whatever is still in flight: the client side of every open-loop latency measurement.

Request i is sent at ``start + due[i]`` on socket ``target[i]`` (DEALER sockets connected to an agent, or to the
bare pyzmq echo of ``bench.echo``); its latency counts from that scheduled time to its reply, so a stall shows in
every request it delays (no coordinated omission). Between sends this process sleeps in ``select`` on the
sockets' file descriptors (a reply wakes it at once and is timed on arrival; zmq.Poller's timeout is whole
milliseconds, too coarse at 1,000 parts/s) until ``SPIN_S`` before the next due time (at most ``SPIN_SHARE`` of
the time between sends), then spins: on a 2-core machine a client that spins all the time takes the core the
agent and ZeroMQ's I/O threads need. A send that leaves more than ``LATE_S`` after its due time means this
process fell behind its schedule (not scheduled in time, or busy with replies): the run says so (``late_sends``)
instead of passing that backlog off as the agent's latency.
"""
from __future__ import annotations

import select
import time
from collections import Counter, deque
from typing import Callable

import msgpack
import numpy as np
import zmq

from edge_agent.wire.score import REPLY_TYPES, SCORE, SCORE_BATCH, SCORE_TOUCHDOWN

SPIN_S = 400e-6        # sleep until this long before a due time, then spin (a sleep here wakes 0.2-0.4 ms late),
SPIN_SHARE = 0.1       # ... but spin at most this share of the time between sends (the agent needs the cores)
LATE_S = 1e-3          # a send later than this after its due time: the client fell behind its schedule
PACK_AHEAD_S = 1e-3    # requests due within this of the next one are packed before it is due
FIRST_ID = 1 << 40     # request ids of a measurement (fresh sockets: nothing else can take them)
# Replies that carry a decision: the agent's score, score_batch and score_touchdown results, and the echo's copy of
# the request.
ANSWERS = (REPLY_TYPES[SCORE], REPLY_TYPES[SCORE_BATCH], REPLY_TYPES[SCORE_TOUCHDOWN], SCORE, SCORE_BATCH,
           SCORE_TOUCHDOWN)


def dealer(endpoint: str) -> zmq.Socket:
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    return socket


def send_on_schedule(sockets: list[zmq.Socket], due: np.ndarray, target: np.ndarray,
                     message: Callable[[int, int], dict], drain_timeout_s: float = 2.0) -> dict:
    """Send ``message(i, request_id)`` at ``start + due[i]`` (seconds, ascending) on ``sockets[target[i]]``.

    Returns per-request arrays: ``due_at``, ``sent_at``, ``done_at`` (NaN: no answer), ``agent_us`` (the agent's
    own time from its reply, NaN for the echo), and ``no_decision`` (reason -> count: an error reply's code, or
    ``timeout`` for no reply ``drain_timeout_s`` after the last send)."""
    n = len(due)
    sent_at, done_at, agent_us = np.empty(n), np.full(n, np.nan), np.full(n, np.nan)
    refused = np.zeros(n, dtype=bool)
    no_decision: Counter[str] = Counter()
    descriptors = [socket.get(zmq.FD) for socket in sockets]

    def receive(timeout_s: float) -> None:
        """Take every reply waiting; when there is none, wait for one up to ``timeout_s``. ZeroMQ's descriptor
        signals a change of state, not a message: the socket's events say what is there (ZMQ_FD in zmq_getsockopt)."""
        ready = [socket for socket in sockets if socket.get(zmq.EVENTS) & zmq.POLLIN]
        if not ready and timeout_s > 0:
            select.select(descriptors, [], [], timeout_s)
            ready = [socket for socket in sockets if socket.get(zmq.EVENTS) & zmq.POLLIN]
        for socket in ready:
            while socket.get(zmq.EVENTS) & zmq.POLLIN:
                now = time.perf_counter()
                reply = msgpack.unpackb(socket.recv(), raw=False)
                i = reply.get("id", -1) - FIRST_ID
                if not 0 <= i < n:
                    continue
                if reply.get("type") in ANSWERS:
                    done_at[i] = now
                    agent_us[i] = reply.get("agent_us", np.nan)
                else:
                    refused[i] = True
                    no_decision[str(reply.get("code"))] += 1

    start = time.perf_counter() + 0.01
    due_at = start + np.asarray(due, dtype=float)
    packed: deque[bytes] = deque()   # requests i.. packed ahead, so a touchdown's parts leave back to back
    for i in range(n):
        while len(packed) < n - i and due_at[i + len(packed)] - due_at[i] <= PACK_AHEAD_S:
            packed.append(msgpack.packb(message(i + len(packed), FIRST_ID + i + len(packed)), use_bin_type=True))
        spin = min(SPIN_S, SPIN_SHARE * (due_at[i] - due_at[i - 1])) if i else SPIN_S
        while (remaining := due_at[i] - time.perf_counter()) > 0:
            receive(remaining - spin)
        sent_at[i] = time.perf_counter()
        sockets[target[i]].send(packed.popleft())
    deadline = time.perf_counter() + drain_timeout_s
    while (np.isnan(done_at) & ~refused).any() and time.perf_counter() < deadline:
        receive(0.01)
    lost = int((np.isnan(done_at) & ~refused).sum())
    if lost:
        no_decision["timeout"] += lost
    return {"due_at": due_at, "sent_at": sent_at, "done_at": done_at, "agent_us": agent_us,
            "no_decision": dict(no_decision)}


def behind_schedule(sent: dict, which: np.ndarray | None = None) -> int:
    """How many sends (of the ``which`` mask) left more than ``LATE_S`` after their due time."""
    late = sent["sent_at"] - sent["due_at"]
    return int(np.sum(late[which] > LATE_S if which is not None else late > LATE_S))


def scheduled_figures(sent: dict, which: np.ndarray | None = None) -> dict:
    """``send_on_schedule``'s arrays (of the ``which`` mask) as ``bench.e2e_latency.measure_open_loop`` returns them:
    latency from the due time and from the send of the answered requests, the agent's own time, the rate achieved."""
    which = np.ones(len(sent["due_at"]), dtype=bool) if which is None else which
    done, due_at, sent_at = sent["done_at"][which], sent["due_at"][which], sent["sent_at"][which]
    replied = ~np.isnan(done)
    agent_us = sent["agent_us"][which]
    elapsed = np.nanmax(done) - due_at[0] if replied.any() else float("nan")
    return {"from_due_us": (done[replied] - due_at[replied]) * 1e6,
            "round_trip_us": (done[replied] - sent_at[replied]) * 1e6,
            "agent_us": agent_us[~np.isnan(agent_us)], "no_decision": sent["no_decision"],
            "achieved_rate": int(replied.sum()) / elapsed}
