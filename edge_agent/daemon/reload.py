"""Hot reload off the request path.

A watcher thread checks the registry stage the agent follows every ``interval_s`` seconds and takes
explicit reload requests. It loads and verifies a new package itself (``scoring.load_package``: checksums,
fidelity, smoke score), then hands the outcome to the serving loop through a queue and wakes the loop with
one byte on an inproc PAIR socket. The loop swaps models between two requests, so every request is
scored by exactly one model and none waits for a load.

The watcher acts when the stage points somewhere new, not whenever the serving model differs from the
stage: after a rollback request, or a refused package, the agent keeps what it serves until the stage
moves again or someone asks for a reload.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass

import zmq

from ..errors import RegistryError
from ..package.registry import PackageRef, Registry
from .scoring import LoadedModel, ModelRefused, load_package

log = logging.getLogger("edge_agent.daemon.reload")

LOADER_NICENESS = 10


@dataclass
class ReloadOutcome:
    ref: PackageRef | None
    trigger: str                       # "stage production now at version 3", "reload request", ...
    model: LoadedModel | None = None   # set when the package loaded and verified
    problems: list[str] | None = None  # set when it was refused
    seconds: float = 0.0

    def describe(self) -> dict:
        return {"ref": None if self.ref is None else str(self.ref), "trigger": self.trigger,
                "outcome": "loaded" if self.model is not None else "refused", "problems": self.problems or [],
                "seconds": round(self.seconds, 3), "checksum": None if self.model is None else self.model.checksum}


_CHECK_STAGE = object()


class ReloadWatcher(threading.Thread):
    def __init__(self, registry: Registry, name: str, stage: str, *, pinned: bool, serving_version: str,
                 interval_s: float, yield_variant: str, context: zmq.Context, wake_address: str):
        super().__init__(name="edge-agent-reload", daemon=True)
        self.registry, self.model_name, self.stage = registry, name, stage
        self.pinned = pinned
        self.stage_version = None if pinned else serving_version   # where the stage pointed when last looked
        self.interval_s = interval_s
        self.yield_variant = yield_variant
        self.context, self.wake_address = context, wake_address
        self.outcomes: queue.SimpleQueue[ReloadOutcome] = queue.SimpleQueue()
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._last_stage_problem = ""

    def request(self, version: str | None) -> None:
        """Load ``version``, or whatever the followed stage names now (even if it has not moved)."""
        self._requests.put(version)

    def stop(self) -> None:
        self._stopping.set()
        self._requests.put(_CHECK_STAGE)   # wake the thread so it sees the stop

    def run(self) -> None:
        yield_cpu_to_serving()
        wake = self.context.socket(zmq.PAIR)
        wake.connect(self.wake_address)
        try:
            while not self._stopping.is_set():
                try:
                    asked = self._requests.get(timeout=self.interval_s)
                except queue.Empty:
                    asked = _CHECK_STAGE
                if self._stopping.is_set():
                    break
                try:
                    outcome = self._stage_moved() if asked is _CHECK_STAGE else self._requested(asked)
                except Exception:   # e.g. a registry folder that became unreadable: keep watching
                    log.exception("checking the registry for %s failed; serving on", self.model_name)
                    continue
                if outcome is not None:
                    self.outcomes.put(outcome)
                    try:
                        # Never block: unread wake-ups are redundant, and at shutdown nobody reads any more.
                        wake.send(b"1", zmq.NOBLOCK)
                    except zmq.Again:
                        pass
        finally:
            wake.close(linger=0)

    def _stage_moved(self) -> ReloadOutcome | None:
        if self.pinned:
            return None
        try:
            ref = self.registry.resolve(self.model_name, stage=self.stage)
        except RegistryError as error:
            if str(error) != self._last_stage_problem:   # say it once, not every interval
                log.warning("cannot follow stage %s of %s: %s; serving on", self.stage, self.model_name, error)
                self._last_stage_problem = str(error)
            return None
        self._last_stage_problem = ""
        if ref.version == self.stage_version:
            return None
        self.stage_version = ref.version
        return self._load(ref, f"stage {self.stage} now at version {ref.version}")

    def _requested(self, version: str | None) -> ReloadOutcome:
        try:
            ref = (self.registry.resolve(self.model_name, version=version) if version is not None
                   else self.registry.resolve(self.model_name, stage=self.stage))
        except RegistryError as error:
            return ReloadOutcome(None, "reload request", problems=[str(error)])
        if version is None:
            self.stage_version = ref.version
        return self._load(ref, "reload request" + (f" for version {version}" if version is not None else
                                                   f" (stage {self.stage} at version {ref.version})"))

    def _load(self, ref: PackageRef, trigger: str) -> ReloadOutcome:
        log.info("loading %s (%s)", ref, trigger)
        start = time.perf_counter()
        try:
            model = load_package(self.registry, ref, self.yield_variant)
        except ModelRefused as refused:
            return ReloadOutcome(ref, trigger, problems=refused.problems, seconds=time.perf_counter() - start)
        except Exception as error:   # a loader bug must not kill the watcher; the loop logs it as a refusal
            log.exception("loading %s failed unexpectedly", ref)
            return ReloadOutcome(ref, trigger, problems=[f"unexpected {type(error).__name__}: {error}"],
                                 seconds=time.perf_counter() - start)
        return ReloadOutcome(ref, trigger, model=model, seconds=time.perf_counter() - start)


def yield_cpu_to_serving() -> None:
    """Run this thread at a lower CPU priority (Linux: niceness is per thread), so that verifying and loading a
    package, a few hundred ms of CPU, takes what the serving thread leaves rather than delaying requests."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICENESS)
    except (AttributeError, OSError) as error:   # not Linux, or not permitted: loading still works
        log.debug("cannot lower the reload thread's priority: %s", error)
