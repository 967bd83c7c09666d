"""Durable file-system steps shared by the model registry and the agent's drift spool, and the check every command
makes of the paths it will write.

Each write is complete or absent after a crash: write to a temporary name, fsync, rename, fsync the folder.
stdlib only.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
from pathlib import Path

from ..errors import EdgeError

BLOCK = 1 << 20   # read and hash files in blocks of this size
READ_ONLY_FILE, READ_ONLY_DIR, WRITABLE_DIR = 0o444, 0o555, 0o755


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write, fsync, rename over, fsync the folder: after return the file survives power loss whole.

    The caller owns the folder or holds its lock (one temporary name per file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def append_lines(path: Path, lines: list[str]) -> None:
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


def rename_no_replace(source: Path, target: Path) -> None:
    """rename(2) would silently replace an empty target folder; an existing target means "taken"."""
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, "version folder exists", str(target))
    try:
        os.rename(source, target)
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, "version folder exists", str(target)) from error
        raise


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def abandoned(staging: Path) -> bool:
    """True when no live writer holds the staging folder's lock."""
    fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove a (partly) read-only folder."""
    if not path.exists():
        return
    for folder, _, _ in os.walk(path):
        os.chmod(folder, WRITABLE_DIR)
    shutil.rmtree(path)


def output_path(path: str | os.PathLike, option: str, *, folder: bool = False, make_folders: bool = True) -> Path:
    """``path`` a command will write (a file, or with ``folder`` a folder), checked before any work starts: EdgeError
    naming ``option`` when a folder on the way is a file, when the path itself is of the other kind, or (without
    ``make_folders``) when the folder it goes into does not exist."""
    path = Path(path)
    for above in reversed(path.parents):
        if above.exists() and not above.is_dir():
            raise EdgeError(f"{option} {path}: {above} is a file; expected a folder there")
    if folder and path.exists() and not path.is_dir():
        raise EdgeError(f"{option} {path}: is a file; expected a folder")
    if not folder and path.is_dir():
        raise EdgeError(f"{option} {path}: is a folder; expected a file name")
    if not make_folders and not path.parent.is_dir():
        raise EdgeError(f"{option} {path}: folder {path.parent} does not exist; expected an existing folder")
    return path
