"""The agent's side of the registry service: ask what to run, fetch it in chunks into the local cache, verify it, hand
it to the serving loop; serve on from the cache whenever the service is unreachable.

The cache (``PackageCache``) is a registry folder of its own (``<cache_dir>/<name>/<version>/``), so a fetched
package is verified and loaded by exactly the code that loads one from a local registry (``Registry.verify`` with
this agent's trusted keys: signature and every file's sha256; ``scoring.load_package``: smoke score). A fetch writes
into ``<name>/.partial-<version>-<checksum>/`` and resumes there (after a lost connection or a restart) from the
bytes it has; each file is checked against the sha256 the assignment lists, and the folder appears under its version
only once complete, then verifies or is removed (a refusal, logged and shown in health). The cache keeps at most
``cache_versions`` versions per model: the champion, the one before it (instant rollback: nothing to fetch) and the
challenger, the oldest others removed.

Offline mode: the tester never waits on the network. Every request has a timeout (Lazy Pirate: a new socket after
each), the follower runs on its own thread, and an agent that starts while the service is unreachable serves the
champion it was last assigned from the cache (``assigned.json``).

    follower = Follower(config.fleet, model_name, agent_id, tester, trust, curve)
    champion, challenger = follower.initial()            # at start-up: from the service, else from the cache
    follower.start(request_version, offer_challenger)    # then: its thread follows the assignment
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path

import zmq

from ..daemon.config import FollowerConfig
from ..errors import EdgeError
from ..package.files import READ_ONLY_DIR, READ_ONLY_FILE, atomic_write, remove_tree, sha256_file
from ..package.manifest import MANIFEST_FILE, NAME_PATTERN, VERSION_PATTERN
from ..package.registry import PackageRef, Registry
from ..package.signing import Trust
from ..daemon.reload import yield_cpu_to_serving
from ..wire.codec import decode_trusted, encode
from ..wire.links import CurveClient, connect_curve
from ..wire.packages import ERROR, assignment_request, chunk_request

log = logging.getLogger("edge_agent.fleet.follower")

STATE_FILE = "assigned.json"
PARTIAL_PREFIX = ".partial-"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
MAX_PACKAGE_BYTES = 2 << 30   # an assignment claiming more is refused before anything is written
REFUSED_RETRY_S = 60.0    # a package refused after its fetch is fetched again after this long, not every poll


class Unreachable(Exception):
    """The registry service did not answer in time."""


class Refused(EdgeError):
    """A fetched package that does not verify (names every problem), or the service's error reply."""


class ServiceLink:
    """One request at a time to the service's ROUTER; no reply within the timeout: Unreachable, and a new socket."""

    def __init__(self, endpoint: str, timeout_s: float, curve: CurveClient | None):
        self.endpoint, self.timeout_s, self.curve = endpoint, timeout_s, curve
        self.context = zmq.Context.instance()
        self._socket = None

    def ask(self, request: dict) -> dict:
        if self._socket is None:
            self._socket = self.context.socket(zmq.DEALER)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.IMMEDIATE, 1)
            if self.curve is not None:
                connect_curve(self._socket, self.curve)
            self._socket.connect(self.endpoint)
        deadline = time.monotonic() + self.timeout_s
        try:
            # With IMMEDIATE, the socket is writable once the (CURVE) handshake is done: connecting counts too.
            if self._socket.poll(int(self.timeout_s * 1000), zmq.POLLOUT):
                self._socket.send(encode(request), zmq.NOBLOCK)
            if self._socket.poll(max(1, int((deadline - time.monotonic()) * 1000)), zmq.POLLIN):
                reply = decode_trusted(self._socket.recv())
                if isinstance(reply, dict) and reply.get("type") == ERROR:
                    raise Refused(f"registry service {self.endpoint}: {reply.get('code')}: {reply.get('message')}")
                if isinstance(reply, dict) and reply.get("type") == request["type"]:
                    return reply
        except zmq.Again:
            pass
        self.close()
        raise Unreachable(f"registry service {self.endpoint}: no reply within {self.timeout_s:g} s")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None


class PackageCache:
    """Fetched packages in a registry layout, bounded per model, with the last assignment beside them."""

    def __init__(self, root: str | Path, trust: Trust, max_versions: int):
        self.registry = Registry(root, trust)
        self.root = self.registry.root
        self.max_versions = max_versions
        self.root.mkdir(parents=True, exist_ok=True)

    def has(self, listing: dict) -> bool:
        folder = self.root / listing["name"] / listing["version"]
        try:
            return sha256_file(folder / MANIFEST_FILE) == listing["checksum"]
        except OSError:
            return False

    def fetch(self, link: ServiceLink, agent_id: str, listing: dict, chunk_bytes: int) -> tuple[PackageRef, int]:
        """Fetch (or finish fetching) a package into the cache and verify it; (ref, bytes fetched now). Refused
        (the folder removed) when it does not verify, Unreachable when the service stops answering (the partial
        folder stays, for the next attempt to resume)."""
        name, version = listing["name"], listing["version"]
        if not NAME_PATTERN.fullmatch(name) or not VERSION_PATTERN.fullmatch(version) \
                or not SHA256_HEX.fullmatch(listing["checksum"]):
            raise Refused(f"assignment names an invalid package {name!r}/{version!r} (checksum "
                          f"{listing['checksum']!r:.80})")
        for entry in listing["files"]:
            if not NAME_PATTERN.fullmatch(str(entry.get("name"))) or type(entry.get("size")) is not int \
                    or entry["size"] < 0:
                raise Refused(f"{name}/{version}: the assignment lists a file as {entry!r:.120}; expected a plain "
                              "name and a size in bytes")
        total = sum(entry["size"] for entry in listing["files"])
        if total > MAX_PACKAGE_BYTES:
            raise Refused(f"{name}/{version}: the assignment lists {total:,} bytes, more than a package may hold "
                          f"here ({MAX_PACKAGE_BYTES:,})")
        partial = self.root / name / f"{PARTIAL_PREFIX}{version}-{listing['checksum'][:16]}"
        partial.mkdir(parents=True, exist_ok=True)
        fetched = 0
        for entry in listing["files"]:
            fetched += self._fetch_file(link, agent_id, listing, entry, partial / entry["name"], chunk_bytes)
        return self._install(PackageRef(name, version), partial), fetched

    def _fetch_file(self, link: ServiceLink, agent_id: str, listing: dict, entry: dict, path: Path,
                    chunk_bytes: int) -> int:
        have = path.stat().st_size if path.exists() else 0
        if have > entry["size"]:
            path.unlink()
            have = 0
        fetched = 0
        with open(path, "ab") as out:
            while have < entry["size"]:
                reply = link.ask(chunk_request(agent_id, listing["name"], listing["version"], entry["name"], have,
                                               min(chunk_bytes, entry["size"] - have)))
                data = reply.get("data")
                if reply.get("offset") != have or not isinstance(data, bytes) or not data:
                    raise Refused(f"{entry['name']}: the service answered offset {reply.get('offset')!r} with "
                                  f"{type(data).__name__}, expected bytes from offset {have}")
                out.write(data)
                have += len(data)
                fetched += len(data)
            out.flush()
            os.fsync(out.fileno())
        expected = listing["checksum"] if entry["name"] == MANIFEST_FILE else entry["sha256"]
        if expected is not None and sha256_file(path) != expected:
            path.unlink()   # fetched again from the start next time
            raise Refused(f"{entry['name']}: sha256 of the fetched file is not the listed {expected}; discarded")
        return fetched

    def _install(self, ref: PackageRef, partial: Path) -> PackageRef:
        """The complete folder under its version, then verified with this agent's trust; removed if it fails."""
        target = self.registry.package_dir(ref)
        remove_tree(target)             # another package under the same number (a service reset): replaced
        for file in partial.iterdir():
            os.chmod(file, READ_ONLY_FILE)
        os.chmod(partial, READ_ONLY_DIR)
        os.rename(partial, target)
        result = self.registry.verify(ref)
        if not result.ok:
            remove_tree(target)
            raise Refused(f"{ref} fetched but refused:\n" + "\n".join(f"  - {p}" for p in result.problems))
        return ref

    def verified(self, name: str, version: str) -> bool:
        try:
            return self.registry.verify(PackageRef(name, version)).ok
        except EdgeError:
            return False

    def evict(self, name: str, keep: set[str]) -> list[str]:
        """Remove the oldest versions beyond ``max_versions`` that are not in ``keep``; the versions removed."""
        versions = [ref.version for ref in self.registry.versions(name)]
        removed = []
        for version in versions:
            if len(versions) - len(removed) <= self.max_versions:
                break
            if version not in keep:
                remove_tree(self.root / name / version)
                removed.append(version)
        return removed

    def load_state(self, name: str) -> dict:
        try:
            return json.loads((self.root / name / STATE_FILE).read_bytes())
        except (OSError, ValueError):
            return {}

    def save_state(self, name: str, state: dict) -> None:
        atomic_write(self.root / name / STATE_FILE, (json.dumps(state, indent=2) + "\n").encode())


class Follower:
    """Follows the service's assignment for one model on its own thread (see the module)."""

    def __init__(self, config: FollowerConfig, model: str, agent_id: str, tester: str, trust: Trust,
                 curve: CurveClient | None = None):
        self.config, self.model, self.agent_id, self.tester = config, model, agent_id, tester
        self.cache = PackageCache(config.cache_dir, trust, config.cache_versions)
        self.link = ServiceLink(config.service, config.request_timeout_s, curve)
        self.champion: str | None = None       # the version last handed to the serving loop
        self.previous: str | None = None
        self.challenger: str | None = None
        self.group: str | None = None
        self.state = "starting"                 # online | offline
        self.last_contact: float | None = None
        self.last_problem = ""
        self.fetched_bytes = 0
        self.fetches = 0
        self.refused: dict[str, float] = {}     # manifest checksum -> when it was refused
        self.cached: list[str] = []             # versions in the cache after the last round (health reads it)
        self._request_version = self._offer_challenger = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-agent-fleet", daemon=True)

    @property
    def registry(self) -> Registry:
        """The cache, as the registry the agent loads from."""
        return self.cache.registry

    def initial(self) -> tuple[PackageRef, PackageRef | None]:
        """(champion, challenger) to start with: the service's assignment, fetched; else the last assignment in the
        cache (offline start); EdgeError when neither gives a package that verifies."""
        try:
            self._sync()
        except (Unreachable, Refused) as error:
            log.warning("%s; starting from the cache %s", error, self.cache.root)
            self.last_problem = str(error)
        if self.champion is None:
            state = self.cache.load_state(self.model)
            candidates = [state.get("champion"), state.get("previous")] + [
                ref.version for ref in reversed(self.cache.registry.versions(self.model))]
            self.champion = next((v for v in candidates if v and self.cache.verified(self.model, v)), None)
            self.challenger = state.get("challenger") if state.get("challenger") and self.cache.verified(
                self.model, state["challenger"]) else None
            if self.champion is None:
                raise EdgeError(f"no package of {self.model} to serve: the registry service {self.config.service} "
                                f"gave none ({self.last_problem or 'no reply'}) and the cache {self.cache.root} "
                                "holds none that verifies")
        self.cached = [ref.version for ref in self.cache.registry.versions(self.model)]
        return (PackageRef(self.model, self.champion),
                None if self.challenger is None else PackageRef(self.model, self.challenger))

    def start(self, request_version, offer_challenger) -> None:
        """Follow on the thread: ``request_version(version)`` loads a champion (the serving loop swaps it),
        ``offer_challenger(version | None)`` loads or stops the challenger."""
        self._request_version, self._offer_challenger = request_version, offer_challenger
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.config.request_timeout_s + 2.0)

    def status(self) -> dict:
        return {"service": self.config.service, "state": self.state, "group": self.group,
                "champion": self.champion, "previous": self.previous, "challenger": self.challenger,
                "last_contact": self.last_contact, "last_problem": self.last_problem[:500],
                "fetches": self.fetches, "fetched_bytes": self.fetched_bytes, "cache": str(self.cache.root),
                "cached_versions": self.cached,
                "refused_packages": len(self.refused)}

    # ---- the thread -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        yield_cpu_to_serving()
        while not self._stop.wait(self.config.poll_interval_s):
            try:
                self._sync()
            except (Unreachable, Refused) as error:
                if self.state != "offline" or str(error) != self.last_problem:
                    log.warning("%s; serving %s/%s on", error, self.model, self.champion)
                self.last_problem = str(error)
            except Exception:   # a bug here must not stop the agent serving
                log.exception("following the registry service failed; serving on")

    def _sync(self) -> None:
        """One round: the assignment, the fetches it needs, the hand-overs, the cache bound."""
        try:
            reply = self.link.ask(assignment_request(self.agent_id, self.tester, self.model))
        except Unreachable:
            if self.state != "offline":
                log.warning("registry service %s unreachable: offline, serving %s/%s from the cache",
                            self.config.service, self.model, self.champion)
            self.state = "offline"
            raise
        self.state, self.last_contact, self.group = "online", time.time(), reply.get("group")
        champion = self._ensure(reply["champion"])
        challenger = None if reply.get("challenger") is None else self._ensure(reply["challenger"])
        if champion is not None and champion != self.champion:
            self.previous, self.champion = self.champion, champion
            if self._request_version is not None:
                log.info("assignment (group %s): champion %s/%s", self.group, self.model, champion)
                self._request_version(champion)
        if (challenger or None) != self.challenger and (challenger is not None or reply.get("challenger") is None):
            self.challenger = challenger
            if self._offer_challenger is not None:
                self._offer_challenger(challenger)
        self.cache.save_state(self.model, {"champion": self.champion, "previous": self.previous,
                                           "challenger": self.challenger, "group": self.group,
                                           "assigned_at": self.last_contact})
        keep = {v for v in (self.champion, self.previous, self.challenger) if v}
        for version in self.cache.evict(self.model, keep):
            log.info("cache: removed %s/%s (beyond %d versions)", self.model, version, self.cache.max_versions)
        self.cached = [ref.version for ref in self.cache.registry.versions(self.model)]

    def _ensure(self, listing: dict) -> str | None:
        """The listed package's version once it is in the cache and verified; None if it was refused."""
        if self.cache.has(listing):
            return listing["version"]
        refused_at = self.refused.get(listing["checksum"])
        if refused_at is not None and time.monotonic() - refused_at < REFUSED_RETRY_S:
            return None
        start = time.perf_counter()
        try:
            ref, fetched = self.cache.fetch(self.link, self.agent_id, listing, self.config.chunk_bytes)
        except Refused as refused:
            self.refused[listing["checksum"]] = time.monotonic()
            self.last_problem = str(refused)
            log.error("%s; serving %s/%s on", refused, self.model, self.champion)
            return None
        self.fetches += 1
        self.fetched_bytes += fetched
        log.info("fetched %s (%d bytes in %.2f s) and verified it", ref, fetched, time.perf_counter() - start)
        return ref.version
