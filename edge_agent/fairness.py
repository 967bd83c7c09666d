"""Requests waiting in the agent, per client, and whose turn comes next: fair service whatever one client sends.

ZeroMQ's ROUTER hands over messages one connection after another; the agent takes them into one queue per client
(per connection) and serves one turn at a time: the whole of a small request, or one slice of a large score_batch.
The next turn goes to the waiting client that has been served least, by start-time fair queuing (Goyal, Vin and
Cheng, 1996) on the time spent serving it: each waiting client carries a tag, the serving time charged to it; a
client that starts waiting starts at the tag of the turn being served, ahead of the clients already at that tag.
So a client that sends one part at a time waits for at most the turn in progress, however many requests other
clients keep waiting, and clients that keep the agent busy share what is left equally. A client that stops
waiting is forgotten (it starts afresh).

Bounds: one client may have at most ``client_bytes`` of requests waiting and all clients together ``total_bytes``;
a client with nothing waiting always gets one request in (at most ZeroMQ's message size cap), so a flooding client
can never shut a quiet one out. A request beyond a bound is not taken: the caller refuses it at once.

Replies: ZeroMQ queues only a few replies per connection (its high-water mark is sized in bytes). A reply that does
not fit (the client reads slowly, or not at all) is held here, one per client, and that client gets no turn until
it has been sent: a client that stops reading stops being served, instead of filling memory with replies. A client
whose reply cannot be routed has gone: its waiting requests are dropped, and so is what still arrives from it for
GONE_FORGET_S (ZeroMQ delivers what a closed connection had buffered, megabytes of a flood nobody waits for).
"""
from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict, deque

# A held reply is offered to ZeroMQ again after HOLD_RETRY_S, ... Its queue holds one large reply (limits.py): a
# reply that finds it full is most often a touchdown's second reply while ZeroMQ's I/O thread still moves the first
# out, gone in tens of microseconds; the client waits for the retry, so the first one comes soon.
HOLD_RETRY_S = 50e-6
HOLD_RETRY_MAX_S = 0.1      # ... doubling up to this (a client that never reads costs ten tries a second)
GONE_FORGET_S = 2.0         # requests still arriving from a client that has gone are dropped for this long


class _Client:
    __slots__ = ("waiting", "bytes", "tag")

    def __init__(self, tag: float):
        self.waiting: deque = deque()   # (item, size), oldest first; the first is the one being served
        self.bytes = 0
        self.tag = tag


class Inbox:
    """Per-client FIFO queues of requests, the order of service and the replies held back. Single-threaded (the
    serving loop)."""

    def __init__(self, client_bytes: int, total_bytes: int):
        self.client_bytes = client_bytes
        self.total_bytes = total_bytes
        self.requests = 0
        self.bytes = 0
        self._clients: dict[bytes, _Client] = {}
        self._ready: list[tuple[float, int, int, bytes]] = []   # (tag, 0 if it just began waiting, order, client)
        self._order = itertools.count()
        self._virtual = 0.0                                 # the tag of the turn in service
        self._held: dict[bytes, list] = {}                  # client -> [reply, next try, retry interval]
        self._gone: OrderedDict[bytes, float] = OrderedDict()  # client -> when it was found gone, oldest first

    # ---- requests --------------------------------------------------------------------------------------------

    def take(self, client: bytes, item, size: int) -> bool:
        """Queue ``item`` (``size`` bytes) behind the client's earlier requests; False when it would pass a bound."""
        state = self._clients.get(client)
        if state is None:
            state = self._clients[client] = _Client(self._virtual)
            self._schedule(client, state, fresh=True)
        elif state.bytes + size > self.client_bytes or self.bytes + size > self.total_bytes:
            return False
        state.waiting.append((item, size))
        state.bytes += size
        self.bytes += size
        self.requests += 1
        return True

    def next(self) -> tuple[bytes, object] | None:
        """The least-served client due a turn and its oldest request (it stays queued until ``served`` says done)."""
        while self._ready:
            tag, _, _, client = heapq.heappop(self._ready)
            state = self._clients.get(client)
            if state is not None:          # else: found gone while it waited
                self._virtual = tag
                return client, state.waiting[0][0]
        return None

    def served(self, client: bytes, seconds: float, finished: bool) -> None:
        """Charge a turn of ``seconds`` to the client ``next`` returned; ``finished``: its request is answered."""
        state = self._clients[client]
        state.tag += seconds
        if finished:
            _, size = state.waiting.popleft()
            self._forget(state, size)
        if state.waiting:
            self._schedule(client, state)
        else:
            del self._clients[client]

    def gone(self, client: bytes, keep: int, now: float) -> int:
        """The client has gone (its reply could not be routed): forget its requests but the first ``keep`` (1: the one
        in its turn now) and mark it gone; returns how many were forgotten."""
        state = self._clients.get(client)
        dropped = 0
        while state is not None and len(state.waiting) > keep:
            _, size = state.waiting.pop()
            self._forget(state, size)
            dropped += 1
        if state is not None and not state.waiting:
            del self._clients[client]
        self._gone[client] = now
        self._gone.move_to_end(client)
        return dropped

    def is_gone(self, client: bytes, now: float) -> bool:
        """Whether the client was found gone within GONE_FORGET_S (a request from it was sent before it left)."""
        gone = self._gone
        while gone and next(iter(gone.values())) < now - GONE_FORGET_S:
            gone.popitem(last=False)
        return client in gone

    def clients(self) -> int:
        return len(self._clients)

    @property
    def due(self) -> bool:
        """Some client is due a turn (its requests wait and no reply of its is held)."""
        return bool(self._ready)

    # ---- held replies --------------------------------------------------------------------------------------------

    def hold(self, client: bytes, reply) -> bool:
        """Keep a reply ZeroMQ would not queue; the client gets no turn until ``release``. False when the client has
        one held already (the caller drops this one)."""
        if client in self._held:
            return False
        self._held[client] = [reply, time.perf_counter() + HOLD_RETRY_S, HOLD_RETRY_S]
        return True

    def held_due(self, now: float) -> list[tuple[bytes, object]]:
        """The held replies due another try at ``now`` (time.perf_counter())."""
        return [(client, entry[0]) for client, entry in self._held.items() if entry[1] <= now]

    def retry_later(self, client: bytes, now: float) -> None:
        entry = self._held[client]
        entry[2] = min(entry[2] * 2, HOLD_RETRY_MAX_S)
        entry[1] = now + entry[2]

    def release(self, client: bytes) -> None:
        """The held reply was sent (or its client is gone): the client may have turns again."""
        del self._held[client]
        state = self._clients.get(client)
        if state is not None:
            self._schedule(client, state)

    @property
    def held(self) -> int:
        return len(self._held)

    def next_retry_in(self, now: float) -> float | None:
        """Seconds until the next held reply is due (None: none held)."""
        return min(entry[1] for entry in self._held.values()) - now if self._held else None

    # ---- internals -----------------------------------------------------------------------------------------

    def _schedule(self, client: bytes, state: _Client, fresh: bool = False) -> None:
        if client not in self._held:
            heapq.heappush(self._ready, (state.tag, 0 if fresh else 1, next(self._order), client))

    def _forget(self, state: _Client, size: int) -> None:
        state.bytes -= size
        self.bytes -= size
        self.requests -= 1
