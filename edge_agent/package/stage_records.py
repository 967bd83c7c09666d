"""A model's stage records, in its folder ``<root>/<name>/``: ``registry.json`` (the stage of every version,
replaced atomically), ``history.jsonl`` (one JSON line per change, signed when a key signs the change) and
``.lock`` (the fcntl lock serialising every change of the model).

registry.py decides the changes (publish, promote, rollback, sign) and checks the model's name; this module only
reads and writes their records. stdlib only (and signing.py for signed lines).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import getpass
import json
import os
from pathlib import Path
from typing import Iterator

from ..errors import RegistryError
from .files import append_lines, atomic_write
from .signing import SigningKey, sign_record

STATE_FILE = "registry.json"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = ".lock"


def recorded_stages(model_dir: Path) -> dict[str, str]:
    """{version: stage} as the state file records it (empty before the first change)."""
    path = model_dir / STATE_FILE
    try:
        state = json.loads(path.read_bytes())
        return dict(state["stages"])
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RegistryError(f"{path}: unreadable registry state ({error!r})") from error


def read_history(model_dir: Path) -> list[dict]:
    """Every recorded change of the model, oldest first."""
    path = model_dir / HISTORY_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    # A line without its newline is an append cut short by a crash: it never happened.
    complete = lines[:-1]
    events = []
    for number, line in enumerate(complete, 1):
        try:
            events.append(json.loads(line))
        except ValueError as error:
            raise RegistryError(f"{path}, line {number}: not a JSON history entry ({error})") from error
    return events


def holders(history: list[dict], stage: str) -> list[str]:
    """Versions that held ``stage``, oldest first, as a stack: a rollback pops the version it removed."""
    stack: list[str] = []
    for event in history:
        if event.get("to_stage") != stage:
            continue
        if event.get("action") == "rollback" and stack:
            stack.pop()
        if not stack or stack[-1] != event["version"]:
            stack.append(event["version"])
    return stack


@contextlib.contextmanager
def model_lock(model_dir: Path) -> Iterator[None]:
    """Hold the model's lock (created with its folder if need be) for the duration of the block."""
    model_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(model_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)   # closing drops the lock


def apply_changes(model_dir: Path, changes: list[tuple[str, str, str, str]], forced: str | None = None,
                  signer: SigningKey | None = None) -> None:
    """Record (version, to_stage, action, reason) changes: history first, so no change goes unrecorded.
    ``forced``: the gate a forced promotion overrode, written on the promotion's line; ``signer``: the key that
    signs each line (its id is recorded with the user). The caller holds ``model_lock(model_dir)``."""
    stages = recorded_stages(model_dir)
    now, user = _now(), _user()
    entries = []
    for version, to_stage, action, reason in changes:
        from_stage = stages.get(version, None if action == "publish" else "candidate")
        entry = {"time": now, "action": action, "version": version, "from_stage": from_stage,
                 "to_stage": to_stage, "reason": reason, "user": user}
        if forced is not None and action == "promote":
            entry["forced"] = forced
        entries.append(entry)
        stages[version] = to_stage
    _append(model_dir, entries, signer)
    state = {"name": model_dir.name, "updated_at": now, "stages": dict(sorted(stages.items(), key=lambda i: int(i[0])))}
    atomic_write(model_dir / STATE_FILE, (json.dumps(state, indent=2) + "\n").encode())


def append_history(model_dir: Path, entries: list[dict], signer: SigningKey | None = None) -> None:
    """Append history lines (time and user added, signed with ``signer``) for changes outside the stages; the
    caller holds ``model_lock(model_dir)``."""
    now, user = _now(), _user()
    _append(model_dir, [{"time": now, **entry, "user": user} for entry in entries], signer)


def _append(model_dir: Path, entries: list[dict], signer: SigningKey | None) -> None:
    append_lines(model_dir / HISTORY_FILE,
                 [json.dumps(entry if signer is None else sign_record(entry, signer)) for entry in entries])


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):   # no login name and no passwd entry (some containers)
        return f"uid {os.getuid()}"
