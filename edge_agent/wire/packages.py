"""The packages protocol (``edge-packages`` version 1): agents ask the registry service what to run and fetch the
packages in chunks.

Every message type, error code and the version live here, and both ends import them: the service
(``edge_agent/fleet/service.py``) validates requests and builds replies, the agent's follower
(``edge_agent/fleet/follower.py``) builds requests and reads replies. PACKAGES_PROTOCOL.md beside this file documents
every message.

Nothing received here is trusted: a package is served only after the agent verified every file's sha256 against the
manifest and the manifest's signature against its own trusted keys, exactly as for a package on its own disk.
"""
from __future__ import annotations

from typing import Any

VERSION = 1
ASSIGNMENT, CHUNK, ERROR = "assignment", "chunk", "error"   # requests (and their replies), and the refusal
MAX_CHUNK_BYTES = 4 << 20                                    # a chunk request asks for at most this many bytes
MAX_NAME_CHARS = 255


class Code:
    """Error codes: the ``code`` of an ``error`` reply. They never change meaning within a protocol version."""

    INVALID_REQUEST = "invalid_request"       # not a request this service can read (field, type, range)
    UNKNOWN_MODEL = "unknown_model"           # no such model, or nothing assigned to this agent (no production)
    UNKNOWN_FILE = "unknown_file"             # the package has no such version or file
    NOT_SERVABLE = "not_servable"             # the assigned package fails verification on the service's own disk
    AGENT_ID_MISMATCH = "agent_id_mismatch"   # agent_id is not the id the sender's CURVE key is bound to


class InvalidRequest(ValueError):
    """A request that cannot be served: says which field and what was expected."""


# ---- builders -----------------------------------------------------------------------------------------------

def assignment_request(agent_id: str, tester: str, model: str) -> dict:
    return {"type": ASSIGNMENT, "v": VERSION, "agent_id": agent_id, "tester": tester, "model": model}


def chunk_request(agent_id: str, model: str, version: str, file: str, offset: int, length: int) -> dict:
    return {"type": CHUNK, "v": VERSION, "agent_id": agent_id, "model": model, "version": version, "file": file,
            "offset": offset, "length": length}


def package_listing(name: str, version: str, checksum: str, files: dict[str, tuple[int, str | None]]) -> dict:
    """One package in an assignment: identity and every file with its size and sha256 (None for manifest.json,
    whose sha256 is ``checksum``, and for signature.json, which the signature check reads)."""
    return {"name": name, "version": version, "checksum": checksum,
            "files": [{"name": file, "size": size, "sha256": sha} for file, (size, sha) in sorted(files.items())]}


def assignment_reply(group: str, champion: dict, challenger: dict | None) -> dict:
    return {"type": ASSIGNMENT, "v": VERSION, "group": group, "champion": champion, "challenger": challenger}


def chunk_reply(request: dict, data: bytes, size: int) -> dict:
    return {"type": CHUNK, "v": VERSION, "model": request["model"], "version": request["version"],
            "file": request["file"], "offset": request["offset"], "data": data, "size": size}


def error_reply(code: str, message: str) -> dict:
    return {"type": ERROR, "v": VERSION, "code": code, "message": message}


# ---- the service's validation ------------------------------------------------------------------------------------

def parse_request(message: Any) -> dict:
    """Check a request's fields; InvalidRequest names the first bad one.

    >>> parse_request(chunk_request("a", "m", "2", "outlier.onnx", 0, 1 << 20))["file"]
    'outlier.onnx'
    >>> parse_request({"type": "chunk", "v": 1})
    Traceback (most recent call last):
    ...
    edge_agent.wire.packages.InvalidRequest: agent_id: missing
    """
    if not isinstance(message, dict):
        raise InvalidRequest(f"expected a msgpack map, got {type(message).__name__}")
    if message.get("type") not in (ASSIGNMENT, CHUNK) or message.get("v") != VERSION:
        raise InvalidRequest(f"expected type {ASSIGNMENT!r} or {CHUNK!r} version {VERSION}, got type "
                             f"{_short(message.get('type'))} version {_short(message.get('v'))}")
    texts = ("agent_id", "tester", "model") if message["type"] == ASSIGNMENT else ("agent_id", "model", "version",
                                                                                  "file")
    for key in texts:
        value = message.get(key)
        if key not in message:
            raise InvalidRequest(f"{key}: missing")
        if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS:
            raise InvalidRequest(f"{key}: expected a non-empty string of at most {MAX_NAME_CHARS} characters, got "
                                 f"{_short(value)}")
    if message["type"] == CHUNK:
        for key, high in (("offset", 2 ** 62), ("length", MAX_CHUNK_BYTES)):
            value = message.get(key)
            if type(value) is not int or not 0 <= value <= high:
                raise InvalidRequest(f"{key}: expected an integer in 0..{high}, got {_short(value)}")
    return message


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
