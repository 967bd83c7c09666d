"""Errors every program shows to people (each names what was wrong and where), and how a command reports them."""
from __future__ import annotations

import errno
import sys
from typing import Callable

EXIT_UNUSABLE = 2        # every command: the input, configuration or model cannot be used
EXIT_ADDRESS_IN_USE = 3  # a daemon: another process listens on its address
EXIT_INTERRUPTED = 130   # Ctrl-C, as a shell reports SIGINT


class EdgeError(Exception):
    """Base of every error the command line prints as a message instead of a traceback (exit status 2)."""

    exit_status = EXIT_UNUSABLE


class AddressInUse(EdgeError):
    """A daemon cannot listen because another process holds the address (exit status 3)."""

    exit_status = EXIT_ADDRESS_IN_USE


def listen_error(what: str, number: int | None, reason: str) -> EdgeError:
    """A daemon's socket cannot listen (``number``: the errno): another process holding the address is its own exit
    status (3), every other reason unusable input (2)."""
    return (AddressInUse if number == errno.EADDRINUSE else EdgeError)(f"{what}: {reason}")


class DataError(EdgeError):
    """Input data that cannot be used: names the file and, where known, column/record/offset."""

    def __init__(self, message: str, *, file: str | None = None, column: str | None = None,
                 record: str | None = None, offset: int | None = None,
                 expected: str | None = None, got: str | None = None):
        self.file, self.column, self.record, self.offset = file, column, record, offset
        self.expected, self.got = expected, got
        where = []
        if file:
            where.append(f"file {file}")
        if record:
            where.append(f"record {record}")
        if offset is not None:
            where.append(f"byte offset {offset}")
        if column:
            where.append(f"column {column!r}")
        detail = ""
        if expected is not None or got is not None:
            detail = f" (expected {expected}, got {got})"
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}{detail}" if prefix else f"{message}{detail}")


class ExportError(EdgeError):
    """An ONNX export that does not reproduce its scikit-learn model closely enough."""


class RegistryError(EdgeError):
    """A registry operation that cannot be done: unknown model/version, bad stage, failed verification."""


# The extra that installs each optional library: `pip install .` installs the agent and its client only.
EXTRA_OF_MODULE = {"sklearn": "trainer", "skl2onnx": "trainer", "pandas": "trainer", "pyarrow": "trainer",
                   "numba": "trainer", "scipy": "trainer", "matplotlib": "collector"}


def run_command(program: str, command: Callable[[], int | None]) -> int:
    """Run one command-line command: an EdgeError becomes one line on stderr and its exit status (2, or 3 for an
    address in use), Ctrl-C 130, a library of a role that is not installed one line naming the extra; anything else
    is a bug and keeps its traceback."""
    try:
        return command() or 0
    except EdgeError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return error.exit_status
    except ModuleNotFoundError as error:
        extra = EXTRA_OF_MODULE.get((error.name or "").partition(".")[0])
        if extra is None:
            raise
        print(f"{program}: error: this command needs {error.name}, which is not installed; install the "
              f"{extra} role with: pip install 'edge-inference[{extra}]'", file=sys.stderr)
        return EXIT_UNUSABLE
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
