"""How many bytes the agent holds for its clients, derived from the served model and the configuration.

Memory held for clients, whatever they send (RSS = the agent after loading its model + the sum of these):

- per connection, in ZeroMQ: ``receive_hwm`` requests queued plus the one being read, each at most
  ``transport_max_message_bytes`` (ZMQ_MAXMSGSIZE: a larger one makes ZeroMQ drop the connection), and
  ``send_hwm`` replies plus the one being written, each at most ``largest_reply_bytes``;
- per connection, in the agent: its waiting requests, at most ``client_queue_bytes`` (its first one always gets
  in) and at most ``max_queued_bytes`` over all connections, the results of its batch in progress (at most
  ``largest_reply_bytes``) and its replies ZeroMQ could not take yet, under ``held_reply_bytes`` before its last
  turn (fairness.py);
- one request being decoded at a time (a batch larger than 64 KiB is decoded a slice at a time).

``per_connection_bytes`` adds the per-connection terms up. The sizes come from the model: the largest valid request
is a score_batch of ``max_batch`` parts with every identity field at its limit (wire.score.largest_request_bytes);
the largest reply one of ``max_batch`` parts, each breaking PAT on every test (a reply lists at most 16 breaks per
part). The high-water marks are sized from them (about ``RECEIVE_BUFFER_BYTES`` per direction and connection), so a
flooding connection holds a few megabytes however it floods. ZeroMQ cannot refuse or drop a connection from the
agent's side (libzmq issue 2877), so the number of connections is the one factor the agent does not bound: the
default loopback bind (and authentication, where configured) decides who may connect.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .binning import BinPolicy, decide
from .explain import DRIVERS, Driver
from .pat import PatBreak
from ..wire.codec import encode
from ..wire.score import (MAX_ID_CHARS, PROTOCOL_VERSION, REPLY_TYPES, SCORE_BATCH, ReadingsParser,
                         largest_request_bytes, part_result)

RECEIVE_BUFFER_BYTES = 1 << 20    # ZeroMQ's queue per connection and direction holds about this much ...
SEND_BUFFER_BYTES = 1 << 20       # ... and at least one message
# A CURVE server whose receive high-water mark is 1 never completes a client's handshake (libzmq: the ZAP exchange
# needs room in the session's pipe beside the first message), so requests queue at least two deep.
MIN_RECEIVE_HWM = 2
TRANSPORT_SLACK_BYTES = 64 << 10  # a request this much over max_message_bytes still gets its message_too_large reply
ERROR_RESULT_BYTES = 2048         # the largest error entry of a batch result (messages are cut to a few lines)
HELD_REPLY_BYTES = 64 << 10       # a client's replies held in the agent before it waits for them: a touchdown's worth


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int            # a larger request is answered message_too_large
    transport_max_message_bytes: int  # ZMQ_MAXMSGSIZE: a larger one drops its connection
    receive_hwm: int                  # ZeroMQ's queue per connection, in requests
    send_hwm: int                     # ... and in replies
    largest_reply_bytes: int
    client_queue_bytes: int           # requests of one client waiting in the agent (its first one always gets in)
    max_queued_bytes: int             # requests of all clients waiting in the agent
    held_reply_bytes: int = HELD_REPLY_BYTES   # replies of one client held in the agent before it gets no turn

    @property
    def per_connection_bytes(self) -> int:
        return ((self.receive_hwm + 1) * self.transport_max_message_bytes
                + (self.send_hwm + 1) * self.largest_reply_bytes
                + self.client_queue_bytes + self.largest_reply_bytes + self.held_reply_bytes)

    def describe(self) -> dict:
        return {**dataclasses.asdict(self), "per_connection_bytes": self.per_connection_bytes}


def derive(max_message_bytes: int, transport_max_message_bytes: int, max_batch: int, queue_length: int,
           max_queued_bytes: int, parser: ReadingsParser, policy: BinPolicy) -> Limits:
    """The limits for a model (its ``parser``) under the agent's configuration (0: derive that size)."""
    transport = transport_max_message_bytes
    largest = largest_request_bytes(parser, max_batch)
    message = max_message_bytes or (min(largest, transport) if transport else largest)
    transport = transport or message + TRANSPORT_SLACK_BYTES
    reply = largest_reply_bytes(parser.columns, max_batch, policy)
    return Limits(max_message_bytes=message, transport_max_message_bytes=transport,
                  receive_hwm=max(MIN_RECEIVE_HWM, _hwm(RECEIVE_BUFFER_BYTES, transport, queue_length)),
                  send_hwm=_hwm(SEND_BUFFER_BYTES, reply, queue_length), largest_reply_bytes=reply,
                  client_queue_bytes=message, max_queued_bytes=max_queued_bytes)


def largest_reply_bytes(columns: list[str], max_batch: int, policy: BinPolicy) -> int:
    """A score_batch_result of ``max_batch`` parts that each break every PAT limit, the longest test names first
    (they are the ones ``why`` and the drivers name), with an id of the longest kind."""
    ordered = sorted(columns, key=lambda column: -len(column.encode()))
    static = [PatBreak(column, "static", -3.4e38, -3.4e38, 3.4e38) for column in ordered]
    dynamic = [PatBreak(column, "dynamic", -3.4e38, -3.4e38, 3.4e38) for column in ordered]
    drivers = [Driver(column, -3.4e38, -1e300, -1e300, 1e300) for column in ordered[:DRIVERS]]
    decision = decide(policy, static=static, dynamic=dynamic, score=-1e300, score_threshold=0.0,
                      pass_probability=-1e300, pass_threshold=1.0, drivers=drivers)
    result = part_result(-1e300, True, -1e300, True, dataclasses.replace(decision, bin=65535), static + dynamic,
                         drivers, len(columns))
    envelope = {"v": PROTOCOL_VERSION, "type": REPLY_TYPES[SCORE_BATCH], "id": "\U0010ffff" * MAX_ID_CHARS,
                "model": {"name": "n" * 255, "version": "v" * 255, "checksum": "0" * 64}, "agent_us": 1e300,
                "results": []}
    return len(encode(envelope)) + 4 + max_batch * max(len(encode(result)), ERROR_RESULT_BYTES)


def _hwm(buffer_bytes: int, message_bytes: int, queue_length: int) -> int:
    return max(1, min(queue_length, buffer_bytes // message_bytes))
