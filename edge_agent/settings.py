"""Configuration files of every program: TOML documents read with one function, errors naming the file.

stdlib only.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from .errors import EdgeError


def read_toml(path: str | Path, error: type[EdgeError]) -> dict:
    """The TOML document at ``path``; ``error`` names the file and what is wrong with it."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise error(f"{path}: configuration file not found") from None
    except OSError as failure:
        raise error(f"{path}: cannot be read ({failure.strerror})") from None
    except tomllib.TOMLDecodeError as failure:
        raise error(f"{path}: not valid TOML ({failure})") from None
