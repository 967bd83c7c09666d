"""msgpack as every message of the product is written: binary as bin, strings as UTF-8 str.

``encode`` serves both wire protocols, the drift spool and the collector's stored arrays; ``decode_trusted``
reads back what this product wrote itself (spool files, stored blobs). Messages from the network are decoded
by their protocol module, which validates them.
"""
from __future__ import annotations

import msgpack


def encode(message) -> bytes:
    """msgpack, binary as bin (every message of the product, and the collector's stored arrays)."""
    return msgpack.packb(message, use_bin_type=True)


def decode_trusted(payload: bytes):
    """A message this agent or collector encoded itself (no protocol validation)."""
    return msgpack.unpackb(payload, raw=False)
