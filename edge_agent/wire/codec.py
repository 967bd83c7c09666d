"""msgpack as every message of the product is written: binary as bin, strings as UTF-8 str.

``encode`` serves both wire protocols, the drift spool and the collector's stored arrays; ``decode_trusted``
reads back what this product wrote itself (spool files, stored blobs). Messages from the network are decoded
by their protocol module, which validates them, and name a bad value with ``short_repr``.
"""
from __future__ import annotations

import reprlib
from typing import Any

import msgpack


def encode(message) -> bytes:
    """msgpack, binary as bin (every message of the product, and the collector's stored arrays)."""
    return msgpack.packb(message, use_bin_type=True)


def decode_trusted(payload: bytes):
    """A message this agent or collector encoded itself (no protocol validation)."""
    return msgpack.unpackb(payload, raw=False)


def short_repr(value: Any, limit: int = 60) -> str:
    """A repr cut to ``limit`` characters and 3 levels of nesting, for error messages: they must not echo a client's
    megabytes back, and a value nested a thousand levels deep must not exhaust the recursion limit."""
    text = _BOUNDED.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _bounded_repr() -> reprlib.Repr:
    bounded = reprlib.Repr()
    bounded.maxlevel, bounded.maxstring, bounded.maxother, bounded.maxlong = 3, 80, 80, 80
    return bounded


_BOUNDED = _bounded_repr()
