"""How the programs' ZeroMQ links are secured: where a socket may listen without CURVE, CURVE on a socket, and the
ZAP handler that lets in only allow-listed client keys and names each peer by the id its key is bound to.

ZeroMQ's CURVE mechanism (CurveZMQ: a Curve25519 key exchange, then every message encrypted and authenticated)
does the cryptography; ZAP (RFC 27, pyzmq's ``zmq.auth``) decides which client keys may complete the handshake. A
client whose key is not allowed gets no connection, so no answer; one that is allowed cannot claim another's
identity, because the id comes from its key (``peer_id``), not from what it writes in a message.

The guard, for the agent's score socket and the collector::

    >>> listen_problems("bind", "tcp://127.0.0.1:5555", curve=False)
    []
    >>> listen_problems("bind", "tcp://0:5555", curve=False)   # doctest: +ELLIPSIS
    ["bind: tcp://0:5555 names a network interface or host ('0'), not a loopback address; ...]
    >>> listen_problems("bind", "tcp://0:5555", curve=True)
    []

stdlib and pyzmq only: the test program's client imports this module.
"""
from __future__ import annotations

import ipaddress
import logging
from collections import Counter
from dataclasses import dataclass, field

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

log = logging.getLogger("edge_agent.links")

SCHEMES = ("tcp", "ipc")
ALL_INTERFACES = "*"
MAX_LOGGED_REFUSALS = 100   # distinct refused keys logged per process; every refusal is counted


# ---- where a socket may listen ------------------------------------------------------------------------------------

def listen_problems(name: str, endpoint: str, *, curve: bool) -> list[str]:
    """Problems with listening on ``endpoint`` (``name``: the option or key that gave it).

    Without CURVE only ``ipc://`` and a loopback address literal (127.0.0.0/8, ``[::1]``) may listen: every other
    host part reaches (or may reach) the network. ``*`` and the unspecified addresses (0.0.0.0, ``[::]``) are every
    interface; ZeroMQ also takes an interface name (``eth0``) and shorthand such as ``0`` for an address, so anything
    that is not an IP address literal is refused too rather than guessed at.
    """
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in SCHEMES:
        return [f"{name}: expected tcp://host:port or ipc:///path, got {endpoint!r}"]
    if scheme == "ipc":
        return []
    host, colon, port = rest.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        return [f"{name}: expected tcp://host:port with a port 1..65535, got {endpoint!r}"]
    if curve or _is_loopback_literal(host):
        return []
    return [f"{name}: {endpoint} {_reach(host)}; without CURVE only a loopback address (tcp://127.0.0.1:PORT, "
            f"tcp://[::1]:PORT) or ipc:// may listen (set up CURVE keys: docs/security.md)"]


def is_local(endpoint: str) -> bool:
    """Whether connecting to ``endpoint`` stays on this machine: ipc, a loopback address, or localhost."""
    scheme, _, rest = endpoint.partition("://")
    if scheme == "ipc":
        return True
    host = rest.rpartition(":")[0]
    return scheme == "tcp" and (host == "localhost" or _is_loopback_literal(host))


def _is_loopback_literal(host: str) -> bool:
    try:
        return ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host).is_loopback
    except ValueError:
        return False


def _reach(host: str) -> str:
    if host == ALL_INTERFACES:
        return "listens on every network interface"
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return f"names a network interface or host ({host!r}), not a loopback address"
    if address.is_unspecified:
        return "listens on every network interface"
    return f"listens on the network address {address}"


# ---- CURVE on a socket ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CurvePair:
    """One side's CURVE key pair, z85-encoded as ZeroMQ takes them; ``source`` names the certificate file."""

    public: bytes
    secret: bytes = field(repr=False)
    source: str = ""


@dataclass(frozen=True)
class CurveClient:
    """What a client needs to reach a CURVE server: its own pair and the server's public key."""

    pair: CurvePair
    server_public: bytes


def serve_curve(socket: zmq.Socket, pair: CurvePair, domain: str) -> None:
    """Make ``socket`` (before bind) a CURVE server whose clients the ZAP handler judges under ``domain``."""
    socket.curve_secretkey = pair.secret
    socket.curve_publickey = pair.public
    socket.curve_server = True
    socket.zap_domain = domain.encode()


def connect_curve(socket: zmq.Socket, client: CurveClient) -> None:
    """Make ``socket`` (before connect) a CURVE client of the server whose public key ``client`` holds."""
    socket.curve_secretkey = client.pair.secret
    socket.curve_publickey = client.pair.public
    socket.curve_serverkey = client.server_public


def peer_id(frame: zmq.Frame) -> str | None:
    """The id a CURVE peer's key is bound to (the ZAP handler's User-Id), from a frame received with copy=False;
    None on a socket without authentication."""
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:
        return None


class Gatekeeper(ThreadAuthenticator):
    """The ZAP handler of one ZeroMQ context (one thread, idle between handshakes): per domain, the client keys
    allowed in and the id each one is bound to. A key that is not allowed never completes its handshake."""

    def __init__(self, context: zmq.Context):
        super().__init__(context, log=logging.getLogger("edge_agent.links.zap"))
        self._admitted: dict[str, dict[bytes, str]] = {}
        self.refused: Counter[str] = Counter()   # written by the ZAP thread only; read for health and metrics
        self._logged: set[bytes] = set()
        self.start()

    def admit(self, domain: str, allowed: dict[bytes, str]) -> None:
        """Let in the clients whose z85 public keys are in ``allowed`` (key -> id) on sockets of ``domain``."""
        self._admitted[domain] = dict(allowed)
        self.configure_curve_callback(domain, self)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP's question for one handshake: may the client with this (z85) key in?"""
        if key in self._admitted.get(domain, {}):
            return True
        self.refused[domain] += 1
        if key not in self._logged and len(self._logged) < MAX_LOGGED_REFUSALS:
            self._logged.add(key)
            log.warning("refused a CURVE client on the %s socket: key %s is not allowed", domain, key.decode())
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        key = z85.encode(client_public_key)
        return next((ids[key] for ids in self._admitted.values() if key in ids), key.decode())
