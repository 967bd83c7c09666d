"""Data path: how fast our STDF reader turns synthetic lots of growing size into the parametric table.

Lots come from ``trainer.synth`` written by ``trainer.stdf_writer`` (4-site touchdowns, 200 tests per part,
PTR and MPR records); each is read by ``bench.stdf_read.read_speed`` in a fresh process after a warm-up read
(best of ``repeats`` reads for the small lots, one read for the largest).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from bench.stdf_read import read_speed, synthetic_lot

TESTS = 200
FULL_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000,)


def run(quick: bool) -> dict:
    sizes = QUICK_SIZES if quick else FULL_SIZES
    figures: dict = {"stdf.tests": TESTS, "stdf.reader": "ours (trainer.ingest.stdf.read_stdf)"}
    workdir = Path(tempfile.mkdtemp(prefix="edge-bench-stdf-", dir="/tmp"))
    try:
        for parts in sizes:
            key = f"stdf.parts_{parts}"
            start = time.perf_counter()
            path = synthetic_lot(workdir / f"lot_{parts}.stdf", parts, TESTS)
            figures[f"{key}.write_s"] = round(time.perf_counter() - start, 2)
            row = read_speed(path, repeats=1 if parts >= 1_000_000 else 3)
            path.unlink()
            if "error" in row:
                figures[f"{key}.error"] = row["error"]
                continue
            figures.update({f"{key}.stdf_mb": round(row["stdf_mb"], 1), f"{key}.seconds": round(row["seconds"], 3),
                            f"{key}.mb_per_s": round(row["mb_per_s"], 1),
                            f"{key}.parts_per_s": round(row["parts_per_s"]),
                            f"{key}.parts_read": row["parts"], f"{key}.peak_rss_delta_mb": round(
                                row["peak_rss_delta_mb"], 1)})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return figures
