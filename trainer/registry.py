"""The model registry: immutable packages in ``<root>/<name>/<version>/``, stages per model, an audit history.

Layout of one model's folder::

    <root>/<name>/1/, 2/, ...     packages (read-only once published)
    <root>/<name>/registry.json   {"name", "stages": {version: stage}} -- replaced atomically
    <root>/<name>/history.jsonl   one JSON line per change (time, action, version, stages, reason, user)
    <root>/<name>/.lock           fcntl lock serialising every state change of this model
    <root>/<name>/.staging-*      a package being written; never listed, removed by gc once its writer is gone

A package appears under its version number only by one ``os.rename`` of a complete, verified folder, so a
writer that crashes leaves at most a ``.staging-*`` folder that no reader looks at.

stdlib only: the edge agent imports this module to find, verify and load packages.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import errno
import fcntl
import getpass
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import RegistryError
from .manifest_schema import MANIFEST_FILE, NAME_PATTERN, VERSION_PATTERN, fidelity_problems, validate_manifest

STAGES = ("candidate", "staging", "production", "archived")
SINGLE_HOLDER_STAGES = ("staging", "production")   # at most one version of a model holds each
DISPLACED_TO = {"staging": "candidate", "production": "archived"}
STATE_FILE = "registry.json"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = ".lock"
STAGING_PREFIX = ".staging-"
STALE_STAGING_S = 300.0   # gc leaves younger staging folders alone even when no writer holds them
_READ_ONLY_FILE, _READ_ONLY_DIR, _WRITABLE_DIR = 0o444, 0o555, 0o755
_BLOCK = 1 << 20


@dataclass(frozen=True)
class PackageRef:
    """One published package: model name and version ("1", "2", ...)."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}/{self.version}"


@dataclass
class VerifyResult:
    """Outcome of verifying a package folder.

    ``checksum`` is the sha256 of its manifest.json and ``manifest`` the parsed bytes that were checked
    (None when unreadable), so a loader uses exactly what was verified.
    """

    path: Path
    problems: list[str] = field(default_factory=list)
    checksum: str | None = None
    manifest: dict | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        if self.ok:
            return f"{self.path}: ok (manifest sha256 {self.checksum})"
        return "\n".join([f"{self.path}: {len(self.problems)} problem(s)"] + [f"  - {p}" for p in self.problems])


def verify_dir(path: str | Path) -> VerifyResult:
    """Check a package folder: manifest schema, fidelity gate, every listed file's sha256, no unlisted files."""
    path = Path(path)
    result = VerifyResult(path)
    try:
        raw = (path / MANIFEST_FILE).read_bytes()
    except FileNotFoundError:
        result.problems.append(f"{MANIFEST_FILE}: missing" if path.is_dir() else f"{path}: no such package folder")
        return result
    except OSError as error:
        result.problems.append(f"{MANIFEST_FILE}: cannot be read ({error.strerror})")
        return result
    result.checksum = hashlib.sha256(raw).hexdigest()
    try:
        manifest = json.loads(raw)
    except ValueError as error:   # JSONDecodeError and UnicodeDecodeError
        result.problems.append(f"{MANIFEST_FILE}: not valid JSON ({error})")
        return result
    result.problems += validate_manifest(manifest)
    if isinstance(manifest, dict):
        result.manifest = manifest
        result.problems += fidelity_problems(manifest)
        listed = manifest.get("files")
        result.problems += _file_problems(path, listed if isinstance(listed, dict) else {})
    return result


def _file_problems(path: Path, listed: dict) -> list[str]:
    problems = []
    for name, expected in listed.items():
        if not (isinstance(name, str) and NAME_PATTERN.fullmatch(name)) or name == MANIFEST_FILE:
            continue   # validate_manifest names it; never follow such a name out of the package
        file = path / name
        if not file.is_file():
            problems.append(f"{name}: missing (listed in manifest.files)")
            continue
        got = _sha256_file(file)
        if got != expected:
            problems.append(f"{name}: checksum mismatch, expected sha256 {expected}, got {got}")
    for entry in sorted(os.listdir(path)):
        if entry != MANIFEST_FILE and entry not in listed:
            kind = "folder" if (path / entry).is_dir() else "file"
            problems.append(f"{entry}: {kind} in the package but not listed in manifest.files")
    return problems


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


class Registry:
    """Models and their versions under one root folder (``models/`` by default in the CLI)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---- reading ---------------------------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Names of the models that have at least one published version."""
        if not self.root.is_dir():
            return []
        return sorted(entry.name for entry in self.root.iterdir()
                      if entry.is_dir() and NAME_PATTERN.fullmatch(entry.name) and self._version_numbers(entry.name))

    def versions(self, name: str) -> list[PackageRef]:
        """Published versions of ``name``, oldest first (empty for an unknown model)."""
        return [PackageRef(name, str(number)) for number in self._version_numbers(name)]

    def stages(self, name: str) -> dict[str, str]:
        """Stage of every published version of ``name``; a version the state file does not know is a candidate."""
        recorded = self._read_state(name)
        return {ref.version: recorded.get(ref.version, "candidate") for ref in self.versions(name)}

    def stage_of(self, name: str, version: str | int) -> str:
        return self.stages(name)[self._existing(name, version).version]

    def resolve(self, name: str, stage: str = "production", version: str | int | None = None) -> PackageRef:
        """The given version, or the version in ``stage`` (the newest one for candidate/archived)."""
        if version is not None:
            return self._existing(name, version)
        _check_stage(stage)
        stages = self.stages(name)
        holders = [v for v, s in stages.items() if s == stage]
        if not holders:
            raise RegistryError(f"model {name!r} has no version in {stage}; {self._what_exists(name)}")
        return PackageRef(name, max(holders, key=int))

    def package_dir(self, ref: PackageRef) -> Path:
        return self._model_dir(ref.name) / _version_text(ref.version)

    def manifest(self, ref: PackageRef) -> dict:
        path = self.package_dir(self._existing(ref.name, ref.version)) / MANIFEST_FILE
        try:
            return json.loads(path.read_bytes())
        except (OSError, ValueError) as error:
            raise RegistryError(f"{path}: cannot read the manifest ({error}); run `edge-train registry verify "
                                f"{ref.name} {ref.version}`") from error

    def checksum(self, ref: PackageRef) -> str:
        """sha256 of the package's manifest.json: the identity an agent reports for "which model decided"."""
        path = self.package_dir(self._existing(ref.name, ref.version)) / MANIFEST_FILE
        try:
            return _sha256_file(path)
        except OSError as error:
            raise RegistryError(f"{path}: cannot be read ({error.strerror})") from error

    def verify(self, ref: PackageRef) -> VerifyResult:
        """``verify_dir`` plus: the manifest names this package's model and version."""
        ref = self._existing(ref.name, ref.version)
        result = verify_dir(self.package_dir(ref))
        for key, expected in (("name", ref.name), ("version", ref.version)):
            if result.manifest is not None and result.manifest.get(key) != expected:
                result.problems.append(f"{MANIFEST_FILE}: manifest.{key} is {result.manifest.get(key)!r} but the "
                                       f"package sits at {ref}, expected {expected!r}")
        return result

    def history(self, name: str) -> list[dict]:
        """Every recorded change of ``name``, oldest first."""
        path = self._model_dir(name) / HISTORY_FILE
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

    # ---- writing ---------------------------------------------------------------------------------------------

    def publish(self, name: str, files: dict[str, bytes | Path], manifest: dict, *,
                reason: str = "trained") -> PackageRef:
        """Write a new immutable version of ``name`` and make it a candidate.

        ``manifest`` is not modified: the published copy gets name, version and the sha256 of every file.
        """
        _check_name(name)
        sources = _check_files(files)
        if not isinstance(manifest, dict):
            raise RegistryError(f"manifest: expected a dict, got {type(manifest).__name__}")
        package = _json_copy(manifest)
        package["name"] = name
        # Refuse a bad manifest before writing anything; the digests and the version come later.
        problems = (validate_manifest({**package, "version": "1", "files": {n: "0" * 64 for n in sources}})
                    + fidelity_problems({**package, "files": dict.fromkeys(sources, "")}))
        if problems:
            raise RegistryError(f"refusing to publish {name}: the manifest is not valid:\n"
                                + "\n".join(f"  - {p}" for p in problems))
        model_dir = self._model_dir(name)
        model_dir.mkdir(parents=True, exist_ok=True)
        self.gc(name)
        staging = model_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        os.mkdir(staging)
        # The lock on the staging folder tells gc its writer is alive; the kernel drops it when the writer dies.
        staging_fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        published = False
        try:
            fcntl.flock(staging_fd, fcntl.LOCK_EX)
            package["files"] = {file_name: _write_file(staging / file_name, data)
                                for file_name, data in sources.items()}
            with self._locked(name):
                version = self._next_version(name)
                while True:
                    package["version"] = version
                    _write_manifest(staging, package)
                    result = verify_dir(staging)
                    if not result.ok:
                        raise RegistryError(f"refusing to publish {name}: the package does not verify:\n"
                                            + "\n".join(f"  - {p}" for p in result.problems))
                    os.chmod(staging, _READ_ONLY_DIR)
                    try:
                        _rename_no_replace(staging, model_dir / version)
                        break
                    except FileExistsError:
                        # Another writer took this number without our lock; the next number is free to try.
                        os.chmod(staging, _WRITABLE_DIR)
                        version = str(int(version) + 1)
                published = True
                _fsync_dir(model_dir)
                self._apply(name, [(version, "candidate", "publish", reason)])
        finally:
            os.close(staging_fd)
            if not published:
                _remove_tree(staging)
        return PackageRef(name, version)

    def promote(self, name: str, version: str | int, stage: str, reason: str) -> PackageRef:
        """Move a version to ``stage``; the previous holder of staging/production steps down.

        Promotion to production requires the package to verify. Promoting to the stage a version already
        holds changes nothing and records nothing.
        """
        _check_stage(stage)
        _check_reason(reason)
        with self._locked(name):
            ref = self._existing(name, version)
            stages = self.stages(name)
            if stages[ref.version] == stage:
                return ref
            if stage == "production":
                self._require_verified(ref)
            changes = [(ref.version, stage, "promote", reason)]
            for holder, held in stages.items():
                if stage in SINGLE_HOLDER_STAGES and held == stage and holder != ref.version:
                    changes.insert(0, (holder, DISPLACED_TO[stage], "superseded",
                                       f"version {ref.version} promoted to {stage}: {reason}"))
            self._apply(name, changes)
        return ref

    def rollback(self, name: str, stage: str = "production", reason: str = "") -> PackageRef:
        """Give ``stage`` back to the version that held it before the current one; the current one is archived."""
        if stage not in SINGLE_HOLDER_STAGES:
            raise RegistryError(f"rollback applies to {' and '.join(SINGLE_HOLDER_STAGES)}, not {stage!r}")
        _check_reason(reason)
        with self._locked(name):
            stages = self.stages(name)
            current = next((v for v, s in stages.items() if s == stage), None)
            if current is None:
                raise RegistryError(f"model {name!r} has no version in {stage} to roll back; promote one instead "
                                    f"({self._what_exists(name)})")
            earlier = [v for v in self._holders(name, stage) if v != current and v in stages]
            if not earlier:
                raise RegistryError(f"nothing to roll back to: no earlier version of model {name!r} held {stage} "
                                    f"before version {current} ({self._what_exists(name)})")
            ref = PackageRef(name, earlier[-1])
            if stage == "production":
                self._require_verified(ref)
            self._apply(name, [(current, "archived", "rollback", reason), (ref.version, stage, "rollback", reason)])
        return ref

    def gc(self, name: str | None = None, older_than_s: float = STALE_STAGING_S) -> list[Path]:
        """Remove staging folders left by crashed writers (no live writer, older than ``older_than_s``)."""
        names = [name] if name is not None else (
            sorted(e.name for e in self.root.iterdir() if e.is_dir() and NAME_PATTERN.fullmatch(e.name))
            if self.root.is_dir() else [])
        removed = []
        for model in names:
            model_dir = self._model_dir(model)
            for staging in sorted(model_dir.glob(f"{STAGING_PREFIX}*")):
                try:
                    if time.time() - staging.stat().st_mtime >= older_than_s and _abandoned(staging):
                        _remove_tree(staging)
                        removed.append(staging)
                except FileNotFoundError:
                    continue   # another gc got there first
                except OSError as error:
                    raise RegistryError(f"{staging}: cannot remove this abandoned staging folder "
                                        f"({error.strerror}); remove it by hand") from error
        return removed

    # ---- internals -------------------------------------------------------------------------------------------

    def _model_dir(self, name: str) -> Path:
        _check_name(name)
        return self.root / name

    def _version_numbers(self, name: str) -> list[int]:
        model_dir = self._model_dir(name)
        if not model_dir.is_dir():
            return []
        return sorted(int(e.name) for e in model_dir.iterdir() if VERSION_PATTERN.fullmatch(e.name) and e.is_dir())

    def _existing(self, name: str, version: str | int) -> PackageRef:
        ref = PackageRef(name, _version_text(version))
        if not self.package_dir(ref).is_dir():
            raise RegistryError(f"model {name!r} has no version {ref.version}; {self._what_exists(name)}")
        return ref

    def _what_exists(self, name: str) -> str:
        stages = self.stages(name)
        if stages:
            return "versions: " + ", ".join(f"{v} ({s})" for v, s in stages.items())
        if not self.root.is_dir():
            return f"the registry folder {self.root} does not exist"
        models = self.models()
        return (f"no such model in {self.root}; models there: {', '.join(models)}" if models
                else f"the registry {self.root} holds no models")

    def _next_version(self, name: str) -> str:
        """One above every version that exists or ever existed (history), so a number is never reused."""
        numbers = self._version_numbers(name) + [int(e["version"]) for e in self.history(name)]
        return str(max(numbers, default=0) + 1)

    def _holders(self, name: str, stage: str) -> list[str]:
        """Versions that held ``stage``, oldest first, as a stack: a rollback pops the version it removed."""
        stack: list[str] = []
        for event in self.history(name):
            if event.get("to_stage") != stage:
                continue
            if event.get("action") == "rollback" and stack:
                stack.pop()
            if not stack or stack[-1] != event["version"]:
                stack.append(event["version"])
        return stack

    def _require_verified(self, ref: PackageRef) -> None:
        result = self.verify(ref)
        if not result.ok:
            raise RegistryError(f"{ref} does not verify, it cannot go to production:\n"
                                + "\n".join(f"  - {p}" for p in result.problems))

    def _read_state(self, name: str) -> dict[str, str]:
        path = self._model_dir(name) / STATE_FILE
        try:
            state = json.loads(path.read_bytes())
            return dict(state["stages"])
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise RegistryError(f"{path}: unreadable registry state ({error!r})") from error

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        model_dir = self._model_dir(name)
        model_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(model_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)   # closing drops the lock

    def _apply(self, name: str, changes: list[tuple[str, str, str, str]]) -> None:
        """Record (version, to_stage, action, reason) changes: history first, so no change goes unrecorded."""
        model_dir = self._model_dir(name)
        stages = self._read_state(name)
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
        user = _user()
        lines = []
        for version, to_stage, action, reason in changes:
            from_stage = stages.get(version, None if action == "publish" else "candidate")
            lines.append(json.dumps({"time": now, "action": action, "version": version, "from_stage": from_stage,
                                     "to_stage": to_stage, "reason": reason, "user": user}))
            stages[version] = to_stage
        _append_lines(model_dir / HISTORY_FILE, lines)
        state = {"name": name, "updated_at": now, "stages": dict(sorted(stages.items(), key=lambda i: int(i[0])))}
        atomic_write(model_dir / STATE_FILE, (json.dumps(state, indent=2) + "\n").encode())


# ---- file-system steps --------------------------------------------------------------------------------------

def _write_file(path: Path, data: bytes | Path) -> str:
    """Write one package file durably and read-only; returns its sha256."""
    digest = hashlib.sha256()
    with open(path, "xb") as out:
        if isinstance(data, (bytes, bytearray, memoryview)):
            digest.update(data)
            out.write(data)
        else:
            with open(data, "rb") as source:
                for block in iter(lambda: source.read(_BLOCK), b""):
                    digest.update(block)
                    out.write(block)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(path, _READ_ONLY_FILE)
    return digest.hexdigest()


def _write_manifest(staging: Path, manifest: dict) -> None:
    atomic_write(staging / MANIFEST_FILE, (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode())
    os.chmod(staging / MANIFEST_FILE, _READ_ONLY_FILE)
    _fsync_dir(staging)


def atomic_write(path: Path, data: bytes) -> None:
    """Write, fsync, rename over, fsync the folder: after return the file survives power loss whole.

    The caller owns the folder or holds its lock (one temporary name per file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _append_lines(path: Path, lines: list[str]) -> None:
    with open(path, "ab+") as log:
        size = log.seek(0, os.SEEK_END)
        if size:
            log.seek(size - 1)
            if log.read(1) != b"\n":
                # Drop the torn tail of an append cut short by a crash (history() already ignores it).
                log.seek(0)
                log.truncate(log.read().rfind(b"\n") + 1)
        log.write("".join(line + "\n" for line in lines).encode())
        log.flush()
        os.fsync(log.fileno())


def _rename_no_replace(source: Path, target: Path) -> None:
    """rename(2) would silently replace an empty target folder; an existing target means "taken"."""
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, "version folder exists", str(target))
    try:
        os.rename(source, target)
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, "version folder exists", str(target)) from error
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _abandoned(staging: Path) -> bool:
    """True when no live writer holds the staging folder's lock."""
    fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    """Remove a (partly) read-only folder."""
    if not path.exists():
        return
    for folder, _, _ in os.walk(path):
        os.chmod(folder, _WRITABLE_DIR)
    shutil.rmtree(path)


# ---- argument checks --------------------------------------------------------------------------------------------

def _check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise RegistryError(f"invalid model name {name!r}: expected letters, digits, '.', '_' or '-' "
                            "(first a letter or digit, at most 128 characters)")


def _version_text(version: str | int) -> str:
    text = str(version)
    if isinstance(version, bool) or not VERSION_PATTERN.fullmatch(text):
        raise RegistryError(f"invalid version {version!r}: expected a positive integer such as 1, 2, 3")
    return text


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise RegistryError(f"unknown stage {stage!r}: expected one of {', '.join(STAGES)}")


def _check_reason(reason: str) -> None:
    if not isinstance(reason, str) or not reason.strip():
        raise RegistryError("a reason is required: every stage change is recorded with why it was made")


def _check_files(files: dict[str, bytes | Path]) -> dict[str, bytes | Path]:
    sources = {}
    for name, data in files.items():
        if name == MANIFEST_FILE or not NAME_PATTERN.fullmatch(name):
            raise RegistryError(f"invalid package file name {name!r}: expected a plain file name other than "
                                f"{MANIFEST_FILE} (letters, digits, '.', '_', '-')")
        if isinstance(data, (bytes, bytearray, memoryview)):
            sources[name] = data
        elif isinstance(data, (str, os.PathLike)) and Path(data).is_file():
            sources[name] = Path(data)
        else:
            raise RegistryError(f"package file {name!r}: expected bytes or the path of an existing file, "
                                f"got {data!r:.80}")
    return sources


def _json_copy(manifest: dict) -> dict:
    """A deep copy holding only JSON values, so what is validated is exactly what manifest.json will hold."""
    try:
        return json.loads(json.dumps(manifest, default=_json_default))
    except TypeError as error:   # e.g. a tuple used as a key
        raise RegistryError(f"manifest is not JSON: {error}") from error


def _json_default(value):
    """numpy scalars (from training code) become plain numbers; anything else is named."""
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    raise RegistryError(f"manifest holds a {type(value).__module__}.{type(value).__name__}, which is not a JSON "
                        f"value: {value!r:.80}")


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):   # no login name and no passwd entry (some containers)
        return f"uid {os.getuid()}"


# ---- command line ---------------------------------------------------------------------------------------------

def add_registry_commands(commands: argparse._SubParsersAction, default_root: str = "models") -> None:
    """Add ``registry list|show|history|promote|rollback|verify|gc`` to an ``edge-train`` subparsers object.

    Each leaf sets ``handler(args) -> int`` (0 ok, 1 verification failed); errors raise RegistryError.
    """
    root = argparse.ArgumentParser(add_help=False)
    root.add_argument("--registry", default=default_root, help=f"registry root folder (default: {default_root})")
    registry = commands.add_parser("registry", help="list, inspect, promote, roll back and verify model packages")
    actions = registry.add_subparsers(dest="registry_command", required=True)

    listing = actions.add_parser("list", parents=[root], help="models, versions and their stages")
    listing.add_argument("name", nargs="?")
    listing.set_defaults(handler=lambda a: _print(cli_list(Registry(a.registry), a.name)))

    show = actions.add_parser("show", parents=[root], help="summary of one package")
    show.add_argument("name")
    show.add_argument("which", nargs="?", default="production",
                      help="a version number or a stage (default: production)")
    show.set_defaults(handler=lambda a: _print(cli_show(Registry(a.registry), a.name, a.which)))

    history = actions.add_parser("history", parents=[root], help="every stage change with time, user and reason")
    history.add_argument("name")
    history.set_defaults(handler=lambda a: _print(cli_history(Registry(a.registry), a.name)))

    promote = actions.add_parser("promote", parents=[root], help="move a version to a stage")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("stage", choices=STAGES)
    promote.add_argument("--reason", required=True)
    promote.set_defaults(handler=lambda a: _print(cli_promote(Registry(a.registry), a.name, a.version, a.stage,
                                                              a.reason)))

    rollback = actions.add_parser("rollback", parents=[root], help="give a stage back to its previous version")
    rollback.add_argument("name")
    rollback.add_argument("--stage", choices=SINGLE_HOLDER_STAGES, default="production")
    rollback.add_argument("--reason", required=True)
    rollback.set_defaults(handler=lambda a: _print(cli_rollback(Registry(a.registry), a.name, a.stage, a.reason)))

    verify = actions.add_parser("verify", parents=[root], help="check checksums, manifest schema and fidelity")
    verify.add_argument("name", nargs="?", help="default: every model")
    verify.add_argument("version", nargs="?", help="default: every version")
    verify.set_defaults(handler=_handle_verify)

    gc = actions.add_parser("gc", parents=[root], help="remove packages half-written by crashed writers")
    gc.add_argument("--older-than", type=float, default=STALE_STAGING_S, metavar="SECONDS")
    gc.set_defaults(handler=lambda a: _print(cli_gc(Registry(a.registry), a.older_than)))


def _print(text: str) -> int:
    print(text)
    return 0


def _handle_verify(args) -> int:
    ok, text = cli_verify(Registry(args.registry), args.name, args.version)
    print(text)
    return 0 if ok else 1


def cli_list(registry: Registry, name: str | None = None) -> str:
    names = [name] if name is not None else registry.models()
    if name is not None and not registry.versions(name):
        raise RegistryError(f"model {name!r}: {registry._what_exists(name)}")
    if not names:
        return f"no models in {registry.root}"
    lines = []
    for model in names:
        stages = registry.stages(model)
        lines += [model, f"  {'version':>7}  {'stage':<10}  {'created':<25}  {'checksum':<12}  size"]
        for ref in registry.versions(model):
            folder = registry.package_dir(ref)
            try:
                created = json.loads((folder / MANIFEST_FILE).read_bytes()).get("created_at")
                checksum = registry.checksum(ref)[:12]
            except (OSError, ValueError, AttributeError, RegistryError):
                created, checksum = "unreadable manifest", "-"
            size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            lines.append(f"  {ref.version:>7}  {stages[ref.version]:<10}  {_fmt(created):<25}  {checksum:<12}  "
                         f"{_size(size)}")
    return "\n".join(lines)


def cli_show(registry: Registry, name: str, which: str = "production") -> str:
    ref = (registry.resolve(name, version=which) if VERSION_PATTERN.fullmatch(which)
           else registry.resolve(name, stage=which))
    return package_summary(registry, ref)


def package_summary(registry: Registry, ref: PackageRef) -> str:
    """What a person needs to decide about a package, from its manifest (tolerant of a malformed one)."""
    result = registry.verify(ref)
    manifest = result.manifest or {}
    lineage = _section(manifest, "lineage")
    features = manifest.get("features") if isinstance(manifest.get("features"), list) else []
    columns = [str(f.get("column")) for f in features if isinstance(f, dict)]
    lines = [
        f"package   {ref}  (stage {registry.stage_of(ref.name, ref.version)})",
        f"folder    {registry.package_dir(ref)}",
        f"checksum  {result.checksum}  (sha256 of manifest.json)",
        f"verified  {'ok' if result.ok else f'FAILED, {len(result.problems)} problem(s), first: {result.problems[0]}'}",
        f"created   {_fmt(manifest.get('created_at'))}",
        f"rows      {_fmt(lineage.get('rows'))} (train {_fmt(lineage.get('train_rows'))}, held out "
        f"{_fmt(lineage.get('holdout_rows'))}), data sha256 {str(lineage.get('data_sha256'))[:12]}",
        f"features  {len(columns)}: {', '.join(columns[:8])}{', ...' if len(columns) > 8 else ''}",
    ]
    for model in ("outlier", "yield"):
        spec = _section(_section(manifest, "models"), model)
        detail = (f"target outlier rate {_fmt(spec.get('target_outlier_rate'))}" if model == "outlier"
                  else f"label {_fmt(spec.get('label'))}")
        lines.append(f"{model:<9} {_fmt(spec.get('kind'))}, threshold {_fmt(spec.get('threshold'))}, {detail}")
        metrics = _section(_section(manifest, "metrics"), model)
        scalars = [f"{k} {_fmt(v)}" for k, v in metrics.items() if v is None or isinstance(v, (int, float))]
        if scalars:
            lines.append(f"  metrics       {', '.join(scalars)}")
        lines.append(f"  quantization  {_fmt(_section(spec, 'quantization').get('reason'))}")
    lines.append("fidelity")
    for key, entry in _section(manifest, "fidelity").items():
        if isinstance(entry, dict):
            lines.append(f"  {key:<16} {entry.get('file')}: {'passed' if entry.get('passed') is True else 'FAILED'}, "
                         f"decisions agree {_fmt(entry.get('decision_agreement'))} "
                         f"(min {_fmt(entry.get('min_agreement'))}) over {_fmt(entry.get('rows'))} rows, "
                         f"max abs diff {_fmt(entry.get('max_abs_diff'))}")
    lines.append("files")
    lines += [f"  {file.name:<20} {_size(file.stat().st_size):>10}" for file in sorted(result.path.iterdir())]
    return "\n".join(lines)


def cli_history(registry: Registry, name: str) -> str:
    events = registry.history(name)
    if not events:
        raise RegistryError(f"model {name!r} has no history; {registry._what_exists(name)}")
    return "\n".join(f"{e['time']}  {e['user']:<10}  v{e['version']:<5} {e['action']:<10} "
                     f"{e['from_stage'] or '-'} -> {e['to_stage']}: {e['reason']}" for e in events)


def cli_promote(registry: Registry, name: str, version: str, stage: str, reason: str) -> str:
    before = registry.stage_of(name, version)
    ref = registry.promote(name, version, stage, reason)
    if before == stage:
        return f"{ref} is already in {stage}; nothing changed"
    return f"{ref}: {before} -> {stage}\n" + _stage_line(registry, name)


def cli_rollback(registry: Registry, name: str, stage: str = "production", reason: str = "") -> str:
    ref = registry.rollback(name, stage, reason)
    return f"{ref} restored to {stage}\n" + _stage_line(registry, name)


def cli_verify(registry: Registry, name: str | None = None, version: str | None = None) -> tuple[bool, str]:
    """(all ok, report) for one version, every version of a model, or every model."""
    if version is not None:
        refs = [registry.resolve(name, version=version)]
    elif name is not None:
        refs = registry.versions(name)
        if not refs:
            raise RegistryError(f"model {name!r}: {registry._what_exists(name)}")
    else:
        refs = [ref for model in registry.models() for ref in registry.versions(model)]
        if not refs:
            return True, f"no packages in {registry.root}"
    results = [(ref, registry.verify(ref)) for ref in refs]
    lines = [f"{ref}: ok" if result.ok else f"{ref}: FAILED\n" + "\n".join(f"  - {p}" for p in result.problems)
             for ref, result in results]
    failed = sum(not result.ok for _, result in results)
    lines.append(f"{len(results) - failed} of {len(results)} package(s) verified")
    return failed == 0, "\n".join(lines)


def cli_gc(registry: Registry, older_than_s: float = STALE_STAGING_S) -> str:
    removed = registry.gc(older_than_s=older_than_s)
    return "\n".join([f"removed {path}" for path in removed] + [f"{len(removed)} abandoned staging folder(s) removed"])


def _stage_line(registry: Registry, name: str) -> str:
    return "stages: " + ", ".join(f"{v} {s}" for v, s in registry.stages(name).items())


def _section(obj, key: str) -> dict:
    """obj[key] when both are dicts, else {} (a summary must work on a malformed manifest too)."""
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, dict) else {}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def _size(n_bytes: int) -> str:
    if n_bytes < 1024:
        return f"{n_bytes} B"
    if n_bytes < 1 << 20:
        return f"{n_bytes / 1024:.1f} KiB"
    return f"{n_bytes / (1 << 20):.1f} MiB"
