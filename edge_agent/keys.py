"""Key files of every program: the trainer's package-signing key (Ed25519, from the ``cryptography`` library) and the
CURVE key pairs (ZeroMQ certificate files, from ``zmq.auth``) of agents, the collector and control clients. Who
holds which key and where it lives: docs/security.md.

    edge-train keys create trainer --kind signing        # keys/trainer.ed25519 (secret) + keys/trainer.ed25519.pub
    edge-agent keys create tester-07-agent --kind curve  # keys/tester-07-agent.key_secret (secret) + .key (public)
    edge-train keys list

A key folder this module creates is owner-only (0700) and every secret file is written owner-only (0600) from the
start (umask 077 while it is created); a secret file that others can read or write is refused when loaded, as ssh
refuses such a private key. Public files (0644) are meant to be copied. A key id (16 hex digits of the sha256 of
the raw public key, ``package.signing.key_id``) names a signing key in signatures, history lines and messages.
This module sits above the package contract: it loads keys into ``package.signing.SigningKey``; package/ never
imports it (tests/test_boundary.py).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import stat
from pathlib import Path
from typing import Iterator

import zmq.auth
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from zmq.utils import z85

from .errors import EdgeError
from .package.manifest import NAME_PATTERN
from .package.signing import SigningKey, key_id
from .wire.links import CurvePair

KINDS = ("signing", "curve")
SIGNING_SECRET, SIGNING_PUBLIC = ".ed25519", ".ed25519.pub"
CURVE_PUBLIC, CURVE_SECRET = ".key", ".key_secret"          # zmq.auth.create_certificates' names
OWNER_ONLY_DIR, OWNER_ONLY_FILE, PUBLIC_FILE = 0o700, 0o600, 0o644
Z85_KEY_CHARS = 40   # a 32-byte Curve25519 key in z85


class KeyFileError(EdgeError):
    """A key file that cannot be created or used (names the file and what is wrong)."""


# ---- creating -------------------------------------------------------------------------------------------------------

def create_signing_key(folder: str | Path, name: str) -> tuple[Path, Path]:
    """A new Ed25519 key pair: (secret PEM file, public PEM file); refuses to replace existing files."""
    secret, public = _new_files(folder, name, SIGNING_SECRET, SIGNING_PUBLIC)
    private = Ed25519PrivateKey.generate()
    with _owner_only_umask():
        _write_new(secret, private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()), OWNER_ONLY_FILE)
    _write_new(public, private.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo), PUBLIC_FILE)
    return secret, public


def create_curve_pair(folder: str | Path, name: str) -> tuple[Path, Path]:
    """A new CURVE key pair as ZeroMQ certificates: (secret certificate, public certificate)."""
    secret, public = _new_files(folder, name, CURVE_SECRET, CURVE_PUBLIC)
    with _owner_only_umask():
        zmq.auth.create_certificates(secret.parent, name, metadata={"name": name})
    os.chmod(public, PUBLIC_FILE)
    return secret, public


def _new_files(folder: str | Path, name: str, *suffixes: str) -> list[Path]:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise KeyFileError(f"invalid key name {name!r}: expected letters, digits, '.', '_' or '-' (first a letter or "
                           "digit), e.g. trainer, collector or the agent id")
    folder = Path(folder)
    if not folder.exists():
        folder.mkdir(parents=True)
        os.chmod(folder, OWNER_ONLY_DIR)
    files = [folder / f"{name}{suffix}" for suffix in suffixes]
    taken = [str(file) for file in files if file.exists()]
    if taken:
        raise KeyFileError(f"{', '.join(taken)}: exists already; a key is never overwritten (rotate by creating a key "
                           "under a new name: docs/security.md)")
    return files


@contextlib.contextmanager
def _owner_only_umask() -> Iterator[None]:
    """Files created meanwhile are owner-only from their first byte (the command is single-threaded)."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, mode)


# ---- loading ------------------------------------------------------------------------------------------------------

def load_signing_key(path: str | Path) -> SigningKey:
    """The Ed25519 private key in ``path`` (PEM); refused when others can read the file."""
    data = _read(path, secret=True)
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise KeyFileError(f"{path}: not an unencrypted Ed25519 private key in PEM ({error})") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: expected an Ed25519 private key, got {type(private).__name__}")
    return SigningKey(private, key_id(private.public_key()), str(path))


def load_trusted_keys(path: str | Path) -> dict[str, Ed25519PublicKey]:
    """Key id -> public key of every signing key trusted at ``path``: one ``*.ed25519.pub`` file, or a folder of
    them (several during a key rotation)."""
    path = Path(path)
    if not path.exists():
        raise KeyFileError(f"{path}: no such file or folder of trusted public signing keys (*{SIGNING_PUBLIC})")
    files = sorted(path.glob(f"*{SIGNING_PUBLIC}")) if path.is_dir() else [path]
    if not files:
        raise KeyFileError(f"{path}: no public signing keys (*{SIGNING_PUBLIC}) in this folder")
    trusted = {}
    for file in files:
        try:
            public = serialization.load_pem_public_key(_read(file))
        except (ValueError, TypeError, UnsupportedAlgorithm) as error:
            raise KeyFileError(f"{file}: not a public key in PEM ({error})") from None
        if not isinstance(public, Ed25519PublicKey):
            raise KeyFileError(f"{file}: expected an Ed25519 public key, got {type(public).__name__}")
        trusted[key_id(public)] = public
    return trusted


def load_curve_pair(path: str | Path) -> CurvePair:
    """The CURVE key pair of a secret certificate (``*.key_secret``); refused when others can read the file."""
    _read(path, secret=True)
    public, secret = _certificate(path)
    if secret is None:
        raise KeyFileError(f"{path}: a public certificate; expected the secret one ({CURVE_SECRET})")
    return CurvePair(public, secret, str(path))


def load_curve_public(path: str | Path) -> bytes:
    """The public key of a certificate (either file of a pair)."""
    return _certificate(path)[0]


def load_allow_list(path: str | Path) -> dict[bytes, str]:
    """Public key -> id of every client allowed at ``path``: a folder of public certificates, each named for the
    id its key is bound to (``tester-07-agent.key``), or one such file. One key, one id."""
    path = Path(path)
    files = sorted(path.glob(f"*{CURVE_PUBLIC}")) if path.is_dir() else [path]
    if not files:
        raise KeyFileError(f"{path}: no public certificates (*{CURVE_PUBLIC}) in this folder")
    allowed: dict[bytes, str] = {}
    for file in files:
        key, name = load_curve_public(file), file.name.removesuffix(CURVE_PUBLIC)
        if key in allowed:
            raise KeyFileError(f"{file}: the same public key as {allowed[key]}{CURVE_PUBLIC}; a key is bound to one "
                               "id only")
        allowed[key] = name
    return allowed


def _certificate(path: str | Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as error:
        raise KeyFileError(f"{path}: not a ZeroMQ certificate ({error})") from None
    for which, key in (("public-key", public), ("secret-key", secret)):
        if key is not None and not _is_z85_key(key):
            raise KeyFileError(f"{path}: {which} is not a CURVE key (expected {Z85_KEY_CHARS} z85 characters)")
    return public, secret


def _is_z85_key(key: bytes) -> bool:
    try:
        return len(key) == Z85_KEY_CHARS and len(z85.decode(key)) == 32
    except (ValueError, KeyError, IndexError):
        return False


def _read(path: str | Path, *, secret: bool = False) -> bytes:
    try:
        mode = os.stat(path).st_mode
        if secret and mode & 0o077:
            raise KeyFileError(f"{path}: a secret key that others can read or write (mode {stat.S_IMODE(mode):04o}); "
                               f"allow its owner only: chmod 600 {path}")
        return Path(path).read_bytes()
    except OSError as error:
        raise KeyFileError(f"{path}: cannot be read ({error.strerror})") from None


# ---- the `keys` command of every program --------------------------------------------------------------------------

def add_keys_command(commands: argparse._SubParsersAction, default_dir: str) -> None:
    """Add ``keys create|list`` to a program's subparsers; each leaf sets ``handler(args) -> int``."""
    keys = commands.add_parser("keys", help="create and list key pairs (package signing, CURVE links)")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser("create", help="a new key pair, secret file owner-only")
    create.add_argument("name", help="file name: e.g. trainer (signing), collector, the agent id (tester-07-agent: "
                                     "the collector binds the key to this id), ops-alice (a control key)")
    create.add_argument("--kind", choices=KINDS, required=True,
                        help="signing: the trainer's Ed25519 package-signing key; curve: a ZeroMQ CURVE key pair")
    create.add_argument("--dir", default=default_dir, help=f"key folder (default: {default_dir})")
    create.set_defaults(handler=_cmd_create)
    listing = actions.add_parser("list", help="the keys in a folder: kind, key id or public key, permissions")
    listing.add_argument("--dir", default=default_dir, help=f"key folder (default: {default_dir})")
    listing.set_defaults(handler=_cmd_list)


def _cmd_create(args: argparse.Namespace) -> int:
    if args.kind == "signing":
        secret, public = create_signing_key(args.dir, args.name)
        print(f"{secret}: secret signing key (0600): stays on the trainer host, signs every package published\n"
              f"{public}: public key, id {key_id(load_signing_key(secret).private.public_key())}: copy it into every "
              "agent's [security] trusted_keys")
    else:
        secret, public = create_curve_pair(args.dir, args.name)
        print(f"{secret}: secret CURVE certificate (0600): stays with {args.name}\n"
              f"{public}: public certificate ({load_curve_public(public).decode()}): give it to the peers that must "
              f"recognise {args.name} (an agent's goes into the collector's agent keys as <agent id>{CURVE_PUBLIC})")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    print("\n".join(list_keys(args.dir)) or f"no keys in {args.dir}")
    return 0


def list_keys(folder: str | Path) -> list[str]:
    """One line per key file in ``folder``: file, kind, key id or public key, and whether its mode is safe."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KeyFileError(f"{folder}: no such key folder")
    lines = []
    for file in sorted(folder.iterdir()):
        mode = stat.S_IMODE(file.stat().st_mode)
        secret = file.name.endswith((SIGNING_SECRET, CURVE_SECRET))
        try:
            if file.name.endswith(SIGNING_PUBLIC):
                what = f"signing public  id {next(iter(load_trusted_keys(file)))}"
            elif file.name.endswith(SIGNING_SECRET):
                what = f"signing SECRET  id {load_signing_key(file).key_id}"
            elif file.name.endswith((CURVE_PUBLIC, CURVE_SECRET)):
                what = f"curve {'SECRET' if secret else 'public'}    {load_curve_public(file).decode()}"
            else:
                continue
        except KeyFileError as error:
            what = f"unusable: {error}"
        lines.append(f"{file.name:<36} {what}  mode {mode:04o}")
    return lines
