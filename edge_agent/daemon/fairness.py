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

Replies: ZeroMQ queues only a few replies per connection (its high-water mark counts messages, sized for the
largest reply: often one). A reply that does not fit is held here, in order, with the client's later replies behind
it: a touchdown's replies follow each other faster than ZeroMQ's I/O thread wakes to move them, and the client's
next parts are served meanwhile. Once a client has ``held_bytes`` of replies held (it reads slowly, or not at all)
it gets no turn until they have been sent: a client that stops reading stops being served, instead of filling
memory with replies. A client whose reply cannot be routed has gone: its waiting requests and held replies are
dropped, and so is what still arrives from it for GONE_FORGET_S (ZeroMQ delivers what a closed connection had
buffered, megabytes of a flood nobody waits for).
"""
from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict, deque

# A held reply is offered to ZeroMQ again at the loop's next pass, or when idle after HOLD_RETRY_S, ... Its queue
# holds one large reply (limits.py): a reply that finds it full is most often a touchdown's next reply while
# ZeroMQ's I/O thread still moves the one before out, gone in tens of microseconds.
HOLD_RETRY_S = 50e-6
HOLD_RETRY_MAX_S = 0.1      # ... doubling up to this (a client that never reads costs ten tries a second)
GONE_FORGET_S = 2.0         # requests still arriving from a client that has gone are dropped for this long


class _Held:
    __slots__ = ("replies", "bytes", "due", "interval")

    def __init__(self, now: float):
        self.replies: deque = deque()   # (reply, size), oldest first
        self.bytes = 0
        self.due = now                  # when to offer the oldest to ZeroMQ again
        self.interval = HOLD_RETRY_S


class _Client:
    __slots__ = ("waiting", "bytes", "tag")

    def __init__(self, tag: float):
        self.waiting: deque = deque()   # (item, size), oldest first; the first is the one being served
        self.bytes = 0
        self.tag = tag


class Inbox:
    """Per-client FIFO queues of requests, the order of service and the replies held back. Single-threaded (the
    serving loop)."""

    def __init__(self, client_bytes: int, total_bytes: int, held_bytes: int):
        self.client_bytes = client_bytes
        self.total_bytes = total_bytes
        self.held_bytes = held_bytes
        self.requests = 0
        self.bytes = 0
        self._clients: dict[bytes, _Client] = {}
        self._ready: list[tuple[float, int, int, bytes]] = []   # (tag, 0 if it just began waiting, order, client)
        self._order = itertools.count()
        self._virtual = 0.0                                 # the tag of the turn in service
        self._held: dict[bytes, _Held] = {}
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

    def queued(self):
        """Every waiting request, client by client, each client's oldest first (the one in its turn included)."""
        for state in self._clients.values():
            for item, _ in state.waiting:
                yield item

    def gone(self, client: bytes, keep: int, now: float) -> int:
        """The client has gone (its reply could not be routed): forget its held replies and its requests but the
        first ``keep`` (1: the one in its turn now) and mark it gone; returns how many were forgotten."""
        held = self._held.pop(client, None)
        dropped = 0 if held is None else len(held.replies)
        state = self._clients.get(client)
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
        """Some client is due a turn (its requests wait and it has less than ``held_bytes`` of replies held)."""
        return bool(self._ready)

    # ---- held replies --------------------------------------------------------------------------------------------

    def holds(self, client: bytes) -> bool:
        """The client has replies held: its next reply goes behind them."""
        return client in self._held

    def hold(self, client: bytes, reply, size: int) -> None:
        """Keep a reply ZeroMQ would not queue (or that must follow the client's held ones). A client with
        ``held_bytes`` held gets no turn until ``release`` brings it under."""
        held = self._held.get(client)
        if held is None:
            held = self._held[client] = _Held(time.perf_counter() + HOLD_RETRY_S)
        held.replies.append((reply, size))
        held.bytes += size

    def held_due(self, now: float) -> list[tuple[bytes, object]]:
        """Each client's oldest held reply, of those due another try at ``now`` (time.perf_counter())."""
        return [(client, held.replies[0][0]) for client, held in self._held.items() if held.due <= now]

    def retry_later(self, client: bytes, now: float) -> None:
        held = self._held[client]
        held.interval = min(held.interval * 2, HOLD_RETRY_MAX_S)
        held.due = now + held.interval

    def release(self, client: bytes):
        """The client's oldest held reply was sent: returns the next one (None when none is left); under
        ``held_bytes`` again, the client may have turns again."""
        held = self._held[client]
        blocked = held.bytes >= self.held_bytes
        _, size = held.replies.popleft()
        held.bytes -= size
        held.interval = HOLD_RETRY_S
        if not held.replies:
            del self._held[client]
        state = self._clients.get(client)
        if state is not None and blocked and held.bytes < self.held_bytes:
            self._schedule(client, state)
        return held.replies[0][0] if held.replies else None

    @property
    def held(self) -> int:
        """Replies held, all clients (checked on every pass of the serving loop: nothing to add up when none)."""
        return sum(len(held.replies) for held in self._held.values()) if self._held else 0

    def next_retry_in(self, now: float) -> float | None:
        """Seconds until the next held reply is due (None: none held)."""
        return min(held.due for held in self._held.values()) - now if self._held else None

    # ---- internals -----------------------------------------------------------------------------------------

    def _schedule(self, client: bytes, state: _Client, fresh: bool = False) -> None:
        held = self._held.get(client)
        if held is None or held.bytes < self.held_bytes:
            heapq.heappush(self._ready, (state.tag, 0 if fresh else 1, next(self._order), client))

    def _forget(self, state: _Client, size: int) -> None:
        state.bytes -= size
        self.bytes -= size
        self.requests -= 1
