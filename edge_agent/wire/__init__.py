"""The four wire protocols, each one module that both ends import, with its document beside it:

- ``score``: score requests, test program <-> agent (PROTOCOL.md);
- ``stats``: drift windows, agent -> collector (STATS_PROTOCOL.md);
- ``audit``: every decision an agent made, in batches over the stats link (STATS_PROTOCOL.md, section ``audit``);
- ``packages``: what to run and the package files in chunks, registry service -> agent (PACKAGES_PROTOCOL.md).

Beside them what the protocols share: ``codec`` (msgpack as every message is written), ``distances`` (a window's
distances to the reference, the same at both ends) and ``links`` (CURVE and the allow-list on every socket).
"""
