"""Package signatures: the trainer's Ed25519 signature over what the registry published, checked by every reader.

A package's ``manifest.json`` holds the sha256 of every other file, so signing the manifest's sha256 together with
the registry's record of it (model name and version) signs the whole package. The signature sits in the package
folder as ``signature.json``, outside ``manifest.files`` (a manifest cannot list its own signature), written before
the folder is renamed into place: a version appears signed, or unsigned, never half. The package identity an agent
reports (the sha256 of manifest.json) is exactly what is signed, so it stays the identity; re-signing with a new
key (a rotation) replaces ``signature.json`` and changes no identity.

``signature.json``::

    {"statement": {"format": "edge-package-signature", "v": 1, "name": "m", "version": "3",
                   "manifest_sha256": "bc6f...", "key_id": "3f2a9c0d1e4b5a6f", "signed_by": "trainer@host",
                   "signed_at": "2026-01-05T10:00:00+00:00"},
     "signature": "<base64 Ed25519 signature of the statement's canonical JSON>"}

Canonical JSON: keys sorted, no spaces, ASCII (``canonical``). The same signing covers registry history lines
(``sign_record``): a stage change made with a signing key records the key id and a signature of the line.

What a check says (``check_signature``): ``trusted`` (signed by a trusted key, for this manifest, name and version),
``unsigned``, ``untrusted`` (a key that is not trusted) or ``invalid`` (the statement or signature was altered, or the
manifest changed after signing). Development mode (``Trust.allow_unsigned``) serves unsigned and untrusted packages
with a warning; an invalid signature is refused in every mode: it is evidence of tampering.
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import getpass
import hashlib
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .files import atomic_write
from .manifest import SIGNATURE_FILE

FORMAT, VERSION = "edge-package-signature", 1
TRUSTED, UNSIGNED, UNTRUSTED, INVALID = "trusted", "unsigned", "untrusted", "invalid"
STATEMENT_FIELDS = ("format", "v", "name", "version", "manifest_sha256", "key_id", "signed_by", "signed_at")
KEY_ID_HEX = 16


@dataclass(frozen=True)
class SigningKey:
    """The trainer's Ed25519 private key, loaded (edge_agent/keys.py loads it from its file); signs package
    statements and history lines."""

    private: Ed25519PrivateKey = field(repr=False)
    key_id: str
    source: str

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)


def key_id(public: Ed25519PublicKey) -> str:
    """16 hex digits of the sha256 of the raw public key: the name of a signing key in signatures and history."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_HEX]


@dataclass(frozen=True)
class Trust:
    """Whose signatures a reader accepts: public keys by key id, from ``source``; ``allow_unsigned`` is development
    mode."""

    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict, repr=False)
    source: str = ""
    allow_unsigned: bool = False

    def describe(self) -> dict:
        return {"trusted_key_ids": sorted(self.keys), "source": self.source,
                "development_mode": self.allow_unsigned,
                "packages": ("DEVELOPMENT MODE: unsigned packages and untrusted signers are accepted"
                             if self.allow_unsigned else "a signature by a trusted key is required")}


@dataclass
class SignatureCheck:
    status: str                           # TRUSTED, UNSIGNED, UNTRUSTED or INVALID
    problems: list[str]                   # why the package is refused (empty: accepted)
    statement: dict | None = None         # what was signed, when it could be read

    def describe(self) -> dict:
        statement = self.statement or {}
        return {"status": self.status, "accepted": not self.problems, "key_id": statement.get("key_id"),
                "signed_by": statement.get("signed_by"), "signed_at": statement.get("signed_at")}


def canonical(value: dict) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def signer_name() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):   # no login name and no passwd entry (some containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


# ---- writing ------------------------------------------------------------------------------------------------------

def write_signature(folder: Path, key: SigningKey, name: str, version: str, manifest_sha256: str) -> dict:
    """Sign package ``name``/``version`` whose manifest has ``manifest_sha256``; write ``signature.json`` durably
    into ``folder`` (the caller may write there). Returns the statement."""
    statement = {"format": FORMAT, "v": VERSION, "name": name, "version": version, "manifest_sha256": manifest_sha256,
                 "key_id": key.key_id, "signed_by": signer_name(),
                 "signed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    document = {"statement": statement, "signature": base64.b64encode(key.sign(canonical(statement))).decode()}
    atomic_write(folder / SIGNATURE_FILE, (json.dumps(document, indent=2) + "\n").encode())
    return statement


def sign_record(record: dict, key: SigningKey) -> dict:
    """A history line with the key id and a signature of everything else in it."""
    signed = {**record, "key_id": key.key_id}
    return {**signed, "signature": base64.b64encode(key.sign(canonical(signed))).decode()}


# ---- checking -----------------------------------------------------------------------------------------------------

def check_signature(folder: Path, name: str, version: str, manifest_sha256: str, trust: Trust) -> SignatureCheck:
    """Whether ``folder``'s signature is a trusted key's, for this name, version and manifest (see the module)."""
    path = folder / SIGNATURE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return _unacceptable(UNSIGNED, trust, f"{SIGNATURE_FILE}: missing: the package is unsigned; sign it with "
                                              f"`edge-train registry sign {name} {version}`")
    except OSError as error:
        return SignatureCheck(INVALID, [f"{SIGNATURE_FILE}: cannot be read ({error.strerror})"])
    try:
        document = json.loads(raw)
        statement, signature = document["statement"], base64.b64decode(document["signature"], validate=True)
        if set(statement) != set(STATEMENT_FIELDS) or (statement["format"], statement["v"]) != (FORMAT, VERSION):
            raise ValueError(f"expected a statement with {', '.join(STATEMENT_FIELDS)} of format {FORMAT} v{VERSION}")
    except (ValueError, KeyError, TypeError, binascii.Error) as error:
        return SignatureCheck(INVALID, [f"{SIGNATURE_FILE}: not a package signature ({type(error).__name__}: "
                                        f"{error})"])
    signed_for = f"{statement['name']}/{statement['version']}"
    if signed_for != f"{name}/{version}":
        return SignatureCheck(INVALID, [f"{SIGNATURE_FILE}: signed for package {signed_for}, this package is "
                                        f"{name}/{version}"], statement)
    if statement["manifest_sha256"] != manifest_sha256:
        return SignatureCheck(INVALID, [f"manifest.json changed after signing: the signature covers sha256 "
                                        f"{statement['manifest_sha256']}, the manifest now has sha256 "
                                        f"{manifest_sha256}"], statement)
    public = trust.keys.get(statement["key_id"])
    if public is None:
        check = _unacceptable(UNTRUSTED, trust, f"{SIGNATURE_FILE}: signed by key {statement['key_id']} "
                                                f"({statement['signed_by']}, {statement['signed_at']}), which is not "
                                                f"trusted here (trusted: {_trusted(trust)})")
        check.statement = statement
        return check
    try:
        public.verify(signature, canonical(statement))
    except InvalidSignature:
        return SignatureCheck(INVALID, [f"{SIGNATURE_FILE}: the signature does not verify with trusted key "
                                        f"{statement['key_id']}: the signed statement was altered"], statement)
    return SignatureCheck(TRUSTED, [], statement)


def check_record(record: dict, trust: Trust | None) -> str:
    """How a history line's signature stands: "" (not signed), or "signed by key K" with "ok", "untrusted key" or
    "NOT VALID"."""
    if "signature" not in record:
        return ""
    unsigned = {k: v for k, v in record.items() if k != "signature"}
    public = None if trust is None else trust.keys.get(record.get("key_id"))
    if public is None:
        return f"signed by key {record.get('key_id')} ({'not checked' if trust is None else 'untrusted key'})"
    try:
        public.verify(base64.b64decode(record["signature"], validate=True), canonical(unsigned))
    except (InvalidSignature, ValueError, binascii.Error):
        return f"signed by key {record['key_id']} (signature NOT VALID: the line was altered)"
    return f"signed by key {record['key_id']} (ok)"


def _unacceptable(status: str, trust: Trust, problem: str) -> SignatureCheck:
    return SignatureCheck(status, [] if trust.allow_unsigned else [problem])


def _trusted(trust: Trust) -> str:
    return f"{', '.join(sorted(trust.keys))} from {trust.source}" if trust.keys else "no key"
