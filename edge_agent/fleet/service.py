"""The registry service: a central process that tells each agent what to run and serves it the packages in chunks,
over ZeroMQ with CURVE (protocol: ``edge_agent/wire/packages.py`` and PACKAGES_PROTOCOL.md).

One ROUTER, one thread, one request answered at a time: an assignment reads the registry's stages and the model's
deployment (``package/deployment.py``) and lists the two packages with every file's size and sha256; a chunk is a
slice of one file of a published (immutable) package. The service verifies a package on its own disk before it
names it (once per manifest checksum), so a package that went bad on the central disk is refused here with its
problems instead of travelling to the fleet; the agent verifies again with its own trusted keys all the same.

With ``keys`` the ROUTER is a CURVE server: only allow-listed agent keys get in, and a request that claims another
agent's id than its key's is refused (``agent_id_mismatch``), as on the collector.

    service = RegistryService(Registry("models", trust), "tcp://0.0.0.0:5570", keys=CollectorKeys(...))
    service.serve()   # until request_stop() (SIGTERM)
"""
from __future__ import annotations

import errno
import logging
import os
from collections import Counter

import msgpack
import zmq

from ..errors import EdgeError, RegistryError
from ..package.deployment import assignment
from ..package.manifest import MANIFEST_FILE, SIGNATURE_FILE
from ..package.registry import PackageRef, Registry
from ..wire.codec import encode
from ..wire.links import Gatekeeper, peer_id, serve_curve
from ..wire.packages import (ASSIGNMENT, Code, InvalidRequest, assignment_reply, chunk_reply, error_reply,
                             package_listing, parse_request)

log = logging.getLogger("edge_agent.fleet.service")

POLL_MS = 200
MAX_MESSAGE_BYTES = 64 << 10   # requests are small; a chunk goes the other way
AGENTS_DOMAIN = "packages"     # the ZAP domain of the service's ROUTER


class RegistryService:
    def __init__(self, registry: Registry, bind: str, *, keys=None):
        """``keys``: a collector.server.CollectorKeys (the service's CURVE pair and the agents allowed in)."""
        self.registry, self.bind, self.keys = registry, bind, keys
        self.requests: Counter[str] = Counter()
        self.bytes_sent = 0
        self._listings: dict[PackageRef, tuple[str, dict | None, list[str]]] = {}   # ref -> (checksum, listing, why)
        self._stop = False

    def request_stop(self, *_signal_args) -> None:
        self._stop = True

    def serve(self) -> None:
        context = zmq.Context()
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        router.setsockopt(zmq.LINGER, 0)
        gatekeeper = None
        if self.keys is not None:
            gatekeeper = Gatekeeper(context)
            gatekeeper.admit(AGENTS_DOMAIN, self.keys.agents)
            serve_curve(router, self.keys.pair, AGENTS_DOMAIN)
        try:
            try:
                router.bind(self.bind)
            except zmq.ZMQError as error:
                raise EdgeError(f"cannot listen on {self.bind}: {error.strerror}") from None
            log.info("serving packages of %s on %s (%s)", self.registry.root, self.bind,
                     "plain: loopback only" if self.keys is None else f"CURVE, {len(self.keys.agents)} agent key(s)")
            while not self._stop:
                if router.poll(POLL_MS, zmq.POLLIN):
                    frames = router.recv_multipart(copy=False)
                    self._send(router, frames[0].bytes, self._answer(frames))
        finally:
            router.close()
            if gatekeeper is not None:
                gatekeeper.stop()
            context.term()
            log.info("stopped after %s; %d bytes of packages sent", dict(self.requests), self.bytes_sent)

    def _answer(self, frames: list[zmq.Frame]) -> dict:
        try:
            if len(frames) != 2:
                raise InvalidRequest(f"expected one payload frame from a DEALER, got {len(frames) - 1}")
            try:
                request = parse_request(msgpack.unpackb(frames[1].bytes, raw=False))
            except (ValueError, TypeError) as error:
                raise InvalidRequest(f"not a msgpack request: {error}") from None
        except InvalidRequest as error:
            self.requests["invalid"] += 1
            return error_reply(Code.INVALID_REQUEST, str(error))
        self.requests[request["type"]] += 1
        sender = None if self.keys is None else peer_id(frames[1])
        if sender is not None and request["agent_id"] != sender:
            log.warning("refused a request claiming agent id %r from the key of %r", request["agent_id"], sender)
            return error_reply(Code.AGENT_ID_MISMATCH, f"agent_id {request['agent_id']!r} is not the id of the key "
                                                       f"that sent the request ({sender!r})")
        try:
            return self._assignment(request) if request["type"] == ASSIGNMENT else self._chunk(request)
        except _Refused as refused:
            return error_reply(refused.code, refused.message)

    def _assignment(self, request: dict) -> dict:
        try:
            given = assignment(self.registry, request["model"], request["agent_id"], request["tester"])
        except RegistryError as error:
            raise _Refused(Code.UNKNOWN_MODEL, str(error)) from None
        champion = self._listing(given.champion)
        challenger = None if given.challenger is None else self._listing(given.challenger)
        return assignment_reply(given.group, champion, challenger)

    def _chunk(self, request: dict) -> dict:
        ref = PackageRef(request["model"], request["version"])
        listing = self._listing(ref)
        sizes = {entry["name"]: entry["size"] for entry in listing["files"]}
        if request["file"] not in sizes:
            raise _Refused(Code.UNKNOWN_FILE, f"package {ref} has no file {request['file']!r} (files: "
                                              f"{', '.join(sizes)})")
        with open(self.registry.package_dir(ref) / request["file"], "rb") as handle:
            handle.seek(request["offset"])
            data = handle.read(request["length"])
        self.bytes_sent += len(data)
        return chunk_reply(request, data, sizes[request["file"]])

    def _listing(self, ref: PackageRef) -> dict:
        """The package's listing, verified on this disk once per manifest checksum (a changed manifest is new)."""
        try:
            checksum = self.registry.checksum(ref)
        except RegistryError as error:
            raise _Refused(Code.UNKNOWN_FILE, str(error)) from None
        known = self._listings.get(ref)
        if known is None or known[0] != checksum:
            result = self.registry.verify(ref)
            listing = None
            if result.ok:
                folder = self.registry.package_dir(ref)
                files = {name: (os.path.getsize(folder / name), sha) for name, sha in result.manifest.files.items()}
                files[MANIFEST_FILE] = (os.path.getsize(folder / MANIFEST_FILE), None)
                if (folder / SIGNATURE_FILE).exists():
                    files[SIGNATURE_FILE] = (os.path.getsize(folder / SIGNATURE_FILE), None)
                listing = package_listing(ref.name, ref.version, result.checksum, files)
            else:
                log.error("not serving %s: it does not verify here:\n%s", ref,
                          "\n".join(f"  - {p}" for p in result.problems))
            known = self._listings[ref] = (checksum, listing, result.problems)
        if known[1] is None:
            raise _Refused(Code.NOT_SERVABLE, f"{ref} does not verify on the registry service: "
                                              + "; ".join(known[2][:3]))
        return known[1]

    @staticmethod
    def _send(router: zmq.Socket, identity: bytes, reply: dict) -> None:
        try:
            router.send_multipart([identity, encode(reply)], zmq.NOBLOCK)
        except zmq.Again:
            pass                  # the agent's queue is full: it asks again after its timeout
        except zmq.ZMQError as error:
            if error.errno != errno.EHOSTUNREACH:
                raise             # the agent reconnected (a timeout); it asks again


class _Refused(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message
