"""The model registry: immutable packages in ``<root>/<name>/<version>/``, stages per model, an audit history.

Layout of one model's folder::

    <root>/<name>/1/, 2/, ...     packages (read-only once published), each signed in its signature.json
    <root>/<name>/registry.json   {"name", "stages": {version: stage}} -- replaced atomically
    <root>/<name>/history.jsonl   one JSON line per change (time, action, version, stages, reason, user)
    <root>/<name>/.lock           fcntl lock serialising every state change of this model
    <root>/<name>/.staging-*      a package being written; never listed, removed by gc once its writer is gone

Stages, history and the lock are read and written by stage_records.py; this module decides the changes.

A package appears under its version number only by one ``os.rename`` of a complete, verified folder, so a
writer that crashes leaves at most a ``.staging-*`` folder that no reader looks at.

stdlib and ``cryptography`` (signatures) only: the edge agent imports this module to find, verify and load packages.
A registry given a ``Trust`` checks every package's signature as part of verifying it (package/signing.py).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import RegistryError
from .files import (BLOCK, READ_ONLY_DIR, READ_ONLY_FILE, WRITABLE_DIR, abandoned, atomic_write,
                    fsync_dir, remove_tree, rename_no_replace, sha256_file)
from .manifest import (MANIFEST_FILE, NAME_PATTERN, SIGNATURE_FILE, VERSION_PATTERN, Manifest, fidelity_problems,
                       read_manifest)
from .signing import SignatureCheck, SigningKey, Trust, check_signature, write_signature
from .stage_records import append_history, apply_changes, holders, model_lock, read_history, recorded_stages

STAGES = ("candidate", "staging", "production", "archived")
SINGLE_HOLDER_STAGES = ("staging", "production")   # at most one version of a model holds each
DISPLACED_TO = {"staging": "candidate", "production": "archived"}
STAGING_PREFIX = ".staging-"
STALE_STAGING_S = 300.0   # gc leaves younger staging folders alone even when no writer holds them


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

    ``checksum`` is the sha256 of its manifest.json and ``manifest`` what was read from exactly the bytes that
    were checked (partial when there are problems, None when unreadable), so a loader uses what was verified.
    ``signature``: how its signature stood, when the registry checks signatures (None: not checked).
    """

    path: Path
    problems: list[str] = field(default_factory=list)
    checksum: str | None = None
    manifest: Manifest | None = field(default=None, repr=False)
    signature: SignatureCheck | None = None

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
    result.manifest, result.problems = read_manifest(raw)
    if result.manifest is not None:
        result.problems += fidelity_problems(result.manifest)
        result.problems += _file_problems(path, result.manifest.files)
    return result


def _file_problems(path: Path, listed: dict) -> list[str]:
    problems = []
    for name, expected in listed.items():
        if not NAME_PATTERN.fullmatch(name) or name in (MANIFEST_FILE, SIGNATURE_FILE):
            continue   # read_manifest names it; never follow such a name out of the package
        file = path / name
        if not file.is_file():
            problems.append(f"{name}: missing (listed in manifest.files)")
            continue
        got = sha256_file(file)
        if got != expected:
            problems.append(f"{name}: checksum mismatch, expected sha256 {expected}, got {got}")
    for entry in sorted(os.listdir(path)):
        if entry not in (MANIFEST_FILE, SIGNATURE_FILE) and entry not in listed:
            kind = "folder" if (path / entry).is_dir() else "file"
            problems.append(f"{entry}: {kind} in the package but not listed in manifest.files")
    return problems


class Registry:
    """Models and their versions under one root folder (``models/`` by default in the CLI); ``trust``: the signing
    keys a package must be signed by to verify (None: signatures are not checked, only integrity)."""

    def __init__(self, root: str | Path, trust: Trust | None = None):
        self.root = Path(root)
        self.trust = trust

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
        recorded = recorded_stages(self._model_dir(name))
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

    def manifest(self, ref: PackageRef) -> Manifest:
        """The package's manifest (not its files' checksums: ``verify`` checks those)."""
        path = self.package_dir(self._existing(ref.name, ref.version)) / MANIFEST_FILE
        try:
            manifest, problems = read_manifest(path.read_bytes())
        except OSError as error:
            raise RegistryError(f"{path}: cannot be read ({error.strerror})") from error
        if problems:
            more = f" and {len(problems) - 1} more problem(s)" if len(problems) > 1 else ""
            raise RegistryError(f"{path}: cannot read the manifest ({problems[0]}{more}); run `edge-train registry "
                                f"verify {ref.name} {ref.version}`")
        return manifest

    def checksum(self, ref: PackageRef) -> str:
        """sha256 of the package's manifest.json: the identity an agent reports for "which model decided"."""
        path = self.package_dir(self._existing(ref.name, ref.version)) / MANIFEST_FILE
        try:
            return sha256_file(path)
        except OSError as error:
            raise RegistryError(f"{path}: cannot be read ({error.strerror})") from error

    def verify(self, ref: PackageRef) -> VerifyResult:
        """``verify_dir`` plus: the manifest names this package's model and version, and (with a ``trust``) a
        trusted key signed this manifest for this name and version."""
        ref = self._existing(ref.name, ref.version)
        result = verify_dir(self.package_dir(ref))
        for key, expected in (("name", ref.name), ("version", ref.version)):
            found = getattr(result.manifest, key, expected)   # no manifest: verify_dir said why
            if found != expected:
                result.problems.append(f"{MANIFEST_FILE}: manifest.{key} is {found!r} but the package sits at "
                                       f"{ref}, expected {expected!r}")
        if self.trust is not None and result.checksum is not None:
            result.signature = check_signature(result.path, ref.name, ref.version, result.checksum, self.trust)
            result.problems += result.signature.problems
        return result

    def history(self, name: str) -> list[dict]:
        """Every recorded change of ``name``, oldest first."""
        return read_history(self._model_dir(name))

    # ---- writing ---------------------------------------------------------------------------------------------

    def publish(self, name: str, files: dict[str, bytes | Path], manifest: Manifest, *,
                reason: str = "trained", signer: SigningKey | None = None) -> PackageRef:
        """Write a new immutable version of ``name`` and make it a candidate.

        The published manifest is ``manifest`` with name, version and the sha256 of every file filled in. With a
        ``signer`` the version appears signed (signature.json is written before the folder is renamed into place);
        without one it is unsigned, and a reader that checks signatures refuses it.
        """
        _check_name(name)
        sources = _check_files(files)
        if not isinstance(manifest, Manifest):
            raise RegistryError(f"manifest: expected a Manifest, got {type(manifest).__name__}")
        # Refuse a bad manifest before writing anything; the digests and the version come later.
        draft, problems = read_manifest(
            replace(manifest, name=name, version="1", files=dict.fromkeys(sources, "0" * 64)).to_document())
        problems += fidelity_problems(draft)
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
            digests = {file_name: _write_file(staging / file_name, data) for file_name, data in sources.items()}
            with self.locked(name):
                version = self._next_version(name)
                while True:
                    _write_manifest(staging, replace(manifest, name=name, version=version, files=digests))
                    result = verify_dir(staging)
                    if not result.ok:
                        raise RegistryError(f"refusing to publish {name}: the package does not verify:\n"
                                            + "\n".join(f"  - {p}" for p in result.problems))
                    if signer is not None:
                        write_signature(staging, signer, name, version, result.checksum)
                        os.chmod(staging / SIGNATURE_FILE, READ_ONLY_FILE)
                    os.chmod(staging, READ_ONLY_DIR)
                    try:
                        rename_no_replace(staging, model_dir / version)
                        break
                    except FileExistsError:
                        # Another writer took this number without our lock; the next number is free to try.
                        os.chmod(staging, WRITABLE_DIR)
                        version = str(int(version) + 1)
                published = True
                fsync_dir(model_dir)
                apply_changes(model_dir, [(version, "candidate", "publish", reason)], signer=signer)
        finally:
            os.close(staging_fd)
            if not published:
                remove_tree(staging)
        return PackageRef(name, version)

    def promote(self, name: str, version: str | int, stage: str, reason: str, *, force: bool = False,
                signer: SigningKey | None = None, gate: str | None = None) -> PackageRef:
        """Move a version to ``stage``; the previous holder of staging/production steps down.

        Promotion to production requires the package to verify. A package whose manifest says its yield model did
        not pass the gate against chance goes to staging or production only with ``force``; the history line then
        records what was overridden. Promoting to the stage a version already holds changes nothing and records
        nothing. With a ``signer`` the history lines carry its key id and signature. ``gate``: why the fleet's
        evidence holds the version back from production (edge_agent/collector/evidence.py), overridden by ``force``
        and recorded the same way.
        """
        _check_stage(stage)
        _check_reason(reason)
        with self.locked(name):
            ref = self._existing(name, version)
            stages = self.stages(name)
            if stages[ref.version] == stage:
                return ref
            if stage == "production":
                self.require_verified(ref)
            held = self._quality_hold(ref) if stage in SINGLE_HOLDER_STAGES else None
            if gate is not None and stage == "production":
                held = f"{held}; {gate}" if held else gate
            if held is not None and not force:
                raise RegistryError(f"{ref} cannot go to {stage}: {held}. It stays {stages[ref.version]}; to promote "
                                    "it anyway, force it with a reason (edge-train registry promote ... --force "
                                    "--reason '...'), which the history records")
            changes = [(ref.version, stage, "promote", reason)]
            for holder, held_stage in stages.items():
                if stage in SINGLE_HOLDER_STAGES and held_stage == stage and holder != ref.version:
                    changes.insert(0, (holder, DISPLACED_TO[stage], "superseded",
                                       f"version {ref.version} promoted to {stage}: {reason}"))
            apply_changes(self._model_dir(name), changes, forced=held, signer=signer)
        return ref

    def rollback(self, name: str, stage: str = "production", reason: str = "", *,
                 signer: SigningKey | None = None) -> PackageRef:
        """Give ``stage`` back to the version that held it before the current one; the current one is archived."""
        if stage not in SINGLE_HOLDER_STAGES:
            raise RegistryError(f"rollback applies to {' and '.join(SINGLE_HOLDER_STAGES)}, not {stage!r}")
        _check_reason(reason)
        with self.locked(name):
            stages = self.stages(name)
            current = next((v for v, s in stages.items() if s == stage), None)
            if current is None:
                raise RegistryError(f"model {name!r} has no version in {stage} to roll back; promote one instead "
                                    f"({self._what_exists(name)})")
            earlier = [v for v in holders(self.history(name), stage) if v != current and v in stages]
            if not earlier:
                raise RegistryError(f"nothing to roll back to: no earlier version of model {name!r} held {stage} "
                                    f"before version {current} ({self._what_exists(name)})")
            ref = PackageRef(name, earlier[-1])
            if stage == "production":
                self.require_verified(ref)
            apply_changes(self._model_dir(name), [(current, "archived", "rollback", reason),
                                                  (ref.version, stage, "rollback", reason)], signer=signer)
        return ref

    def sign(self, ref: PackageRef, signer: SigningKey, reason: str) -> dict:
        """Sign a published package (one published unsigned, or again with a new key in a rotation): its files
        must verify first. Replaces signature.json, changes no package file and no identity; the history records
        it. Returns the signed statement."""
        _check_reason(reason)
        with self.locked(ref.name):
            ref = self._existing(ref.name, ref.version)
            result = verify_dir(self.package_dir(ref))
            if not result.ok:
                raise RegistryError(f"{ref} does not verify, it is not signed:\n"
                                    + "\n".join(f"  - {p}" for p in result.problems))
            folder = self.package_dir(ref)
            os.chmod(folder, WRITABLE_DIR)
            try:
                statement = write_signature(folder, signer, ref.name, ref.version, result.checksum)
                os.chmod(folder / SIGNATURE_FILE, READ_ONLY_FILE)
            finally:
                os.chmod(folder, READ_ONLY_DIR)
            stage = self.stages(ref.name)[ref.version]
            apply_changes(self._model_dir(ref.name), [(ref.version, stage, "sign", reason)], signer=signer)
        return statement

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
                    if time.time() - staging.stat().st_mtime >= older_than_s and abandoned(staging):
                        remove_tree(staging)
                        removed.append(staging)
                except FileNotFoundError:
                    continue   # another gc got there first
                except OSError as error:
                    raise RegistryError(f"{staging}: cannot remove this abandoned staging folder "
                                        f"({error.strerror}); remove it by hand") from error
        return removed

    def locked(self, name: str):
        """The lock that serialises every state change of ``name`` (deployment.py changes under it too)."""
        return model_lock(self._model_dir(name))

    def require_verified(self, ref: PackageRef, what: str = "go to production") -> None:
        """RegistryError listing every problem unless ``ref`` verifies (with this registry's trust)."""
        result = self.verify(ref)
        if not result.ok:
            raise RegistryError(f"{ref} does not verify, it cannot {what}:\n"
                                + "\n".join(f"  - {p}" for p in result.problems))

    def record(self, name: str, entries: list[dict], *, signer: SigningKey | None = None) -> None:
        """Append history lines (time and user added, signed with ``signer``) for changes outside the stages; the
        caller holds ``locked(name)``."""
        append_history(self._model_dir(name), entries, signer)

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

    def _quality_hold(self, ref: PackageRef) -> str | None:
        """Why the package must not be promoted unforced (its yield model failed the gate against chance), else
        None. A manifest that cannot be read holds nothing here: verification is what judges it."""
        try:
            manifest, _ = read_manifest((self.package_dir(ref) / MANIFEST_FILE).read_bytes())
        except OSError:
            return None
        gate = manifest.models.yield_model.gate if manifest is not None else None
        return None if gate is None or gate.passed is not False else gate.reason


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
                for block in iter(lambda: source.read(BLOCK), b""):
                    digest.update(block)
                    out.write(block)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(path, READ_ONLY_FILE)
    return digest.hexdigest()


def _write_manifest(staging: Path, manifest: Manifest) -> None:
    atomic_write(staging / MANIFEST_FILE, manifest.to_json())
    os.chmod(staging / MANIFEST_FILE, READ_ONLY_FILE)
    fsync_dir(staging)


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
        if name in (MANIFEST_FILE, SIGNATURE_FILE) or not NAME_PATTERN.fullmatch(name):
            raise RegistryError(f"invalid package file name {name!r}: expected a plain file name other than "
                                f"{MANIFEST_FILE} and {SIGNATURE_FILE} (letters, digits, '.', '_', '-')")
        if isinstance(data, (bytes, bytearray, memoryview)):
            sources[name] = data
        elif isinstance(data, (str, os.PathLike)) and Path(data).is_file():
            sources[name] = Path(data)
        else:
            raise RegistryError(f"package file {name!r}: expected bytes or the path of an existing file, "
                                f"got {data!r:.80}")
    return sources
