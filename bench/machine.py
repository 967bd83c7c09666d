"""What the figures were measured on: cores, CPU model, library versions, load average."""
from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = {"onnxruntime": "onnxruntime", "numpy": "numpy", "pyzmq": "pyzmq", "sklearn": "scikit-learn",
            "onnx": "onnx", "skl2onnx": "skl2onnx"}


def describe() -> dict:
    """The ``machine`` dict of the results (load averages are added by the caller before and after)."""
    versions = {}
    for key, distribution in PACKAGES.items():
        try:
            versions[key] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[key] = None
    return {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "cpu_model": cpu_model(),
            "python": platform.python_version(), "platform": platform.platform(), **versions}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def summary_line(machine: dict) -> str:
    """One line naming the machine, for tables."""
    def get(key: str, index: int | None = None):
        value = machine.get(key)
        return "?" if value is None else value[index] if index is not None and isinstance(value, list) else value

    return (f"{get('cores')} cores, {get('cpu_model')}; Python {get('python')}, onnxruntime {get('onnxruntime')}, "
            f"numpy {get('numpy')}, pyzmq {get('pyzmq')}, scikit-learn {get('sklearn')}; load average "
            f"{get('load_before', 0)} before / {get('load_after', 0)} after")
