"""STDF read speed and memory: our reader against Semi-ATE-STDF and (if installed) pystdf.

Every reader turns the file into a parts x tests table: ours returns the ParametricTable; the others
decode PIR/PTR/MPR/PRR (and MIR/WIR) records into per-part dicts and build a DataFrame from them, the
least a user of those libraries has to do. Each measurement runs in a fresh subprocess (so peak
memory is that reader's alone) after a warm-up read of a tiny file (numba's cached machine code is
loaded then; the one-time cost of that load is reported as ``cold_s``).

    python -m bench.stdf_read                      # a595 + synthetic lots (2k and 100k parts x 200 tests)
    python -m bench.stdf_read --quick              # a595 + 2k and 10k parts
    python -m bench.stdf_read my.stdf other.stdf.gz

pystdf (GPL) is never a dependency of the product; install it into the environment to include it
(``pip install pystdf``). Files above ``--reference-limit`` MB are read by our reader only (the pure
Python readers need minutes for them).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
A595 = REPO / "tests" / "data" / "stdf" / "a595.stdf.gz"
READERS = ("ours", "semi_ate", "pystdf")


# ----------------------------------------------------------------------------------------------
# the readers (run inside the worker subprocess)


def _read_ours(path: str) -> dict:
    from trainer.ingest.stdf import read_stdf
    result = read_stdf(path)
    frame = result.table.frame
    return {"parts": len(frame), "tests": len(result.table.tests), "results": result.stats.results,
            "table_mb": frame.memory_usage(deep=True).sum() / 1e6, "problems": len(result.problems)}


def _table_from_parts(parts: list[dict]) -> dict:
    import pandas as pd
    frame = pd.DataFrame.from_records(parts)
    identity = {"head", "site", "hard_bin", "soft_bin", "x", "y", "part_id", "wafer"}
    tests = [c for c in frame.columns if c not in identity]
    return {"parts": len(frame), "tests": len(tests), "results": int(frame[tests].notna().to_numpy().sum()),
            "table_mb": frame.memory_usage(deep=True).sum() / 1e6, "problems": 0}


def _read_semi_ate(path: str) -> dict:
    from Semi_ATE.STDF import records_from_file
    parts, open_parts, wafer = [], {}, {}
    wanted = ["MIR", "WIR", "PIR", "PTR", "MPR", "PRR"]
    for rec in records_from_file(path, of_interest=wanted):
        kind = rec.id
        if kind == "PTR":
            part = open_parts.get((rec.get_value("HEAD_NUM"), rec.get_value("SITE_NUM")))
            if part is not None:
                part[(rec.get_value("TEST_NUM"), rec.get_value("TEST_TXT"))] = rec.get_value("RESULT")
        elif kind == "MPR":
            part = open_parts.get((rec.get_value("HEAD_NUM"), rec.get_value("SITE_NUM")))
            if part is not None:
                number, name = rec.get_value("TEST_NUM"), rec.get_value("TEST_TXT")
                for pin, value in enumerate(rec.to_dict()["RTN_RSLT"]):
                    part[(number, name, pin)] = value
        elif kind == "PIR":
            open_parts[(rec.get_value("HEAD_NUM"), rec.get_value("SITE_NUM"))] = {
                "wafer": wafer.get(rec.get_value("HEAD_NUM"), "")}
        elif kind == "PRR":
            part = open_parts.pop((rec.get_value("HEAD_NUM"), rec.get_value("SITE_NUM")), None)
            if part is not None:
                part.update(head=rec.get_value("HEAD_NUM"), site=rec.get_value("SITE_NUM"),
                            hard_bin=rec.get_value("HARD_BIN"), soft_bin=rec.get_value("SOFT_BIN"),
                            x=rec.get_value("X_COORD"), y=rec.get_value("Y_COORD"), part_id=rec.get_value("PART_ID"))
                parts.append(part)
        elif kind == "WIR":
            wafer[rec.get_value("HEAD_NUM")] = rec.get_value("WAFER_ID")
    return _table_from_parts(parts)


def _read_pystdf(path: str) -> dict:
    from pystdf import V4
    from pystdf.IO import Parser

    class Sink:
        def __init__(self):
            self.parts, self.open, self.wafer = [], {}, {}

        def after_send(self, source, data):
            record, f = data
            kind = type(record).__name__
            if kind == "Ptr":
                part = self.open.get((f[1], f[2]))
                if part is not None:
                    part[(f[0], f[6])] = f[5]
            elif kind == "Mpr":
                part = self.open.get((f[1], f[2]))
                if part is not None:
                    for pin, value in enumerate(f[8] or []):
                        part[(f[0], f[9], pin)] = value
            elif kind == "Pir":
                self.open[(f[0], f[1])] = {"wafer": self.wafer.get(f[0], "")}
            elif kind == "Prr":
                part = self.open.pop((f[0], f[1]), None)
                if part is not None:
                    part.update(head=f[0], site=f[1], hard_bin=f[4], soft_bin=f[5], x=f[6], y=f[7], part_id=f[9])
                    self.parts.append(part)
            elif kind == "Wir":
                self.wafer[f[0]] = f[3]

    opener = gzip.open if path.endswith(".gz") else open
    sink = Sink()
    with opener(path, "rb") as handle:
        parser = Parser(recTypes=[V4.mir, V4.wir, V4.pir, V4.ptr, V4.mpr, V4.prr], inp=handle)
        parser.addSink(sink)
        parser.parse()
    return _table_from_parts(sink.parts)


# ----------------------------------------------------------------------------------------------
# the worker: one reader, one file, its time and memory


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class _PeakRss:
    """Peak resident memory above the baseline during a block: VmHWM after resetting it, else sampling
    VmRSS every 10 ms (the sampler competes for the GIL, so it only runs when the reset is refused)."""

    def __enter__(self):
        self.baseline = _status_kb("VmRSS") or 0
        try:
            Path("/proc/self/clear_refs").write_text("5")          # resets VmHWM (Linux >= 4.0)
            self.hwm_reset = (_status_kb("VmHWM") or 1 << 60) <= self.baseline * 1.02 + 1024
        except OSError:
            self.hwm_reset = False
        self.sampled, self._stop = self.baseline, threading.Event()
        self._thread = None if self.hwm_reset else threading.Thread(target=self._sample, daemon=True)
        if self._thread:
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.sampled = max(self.sampled, _status_kb("VmRSS") or 0)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()
        peak = (_status_kb("VmHWM") or 0) if self.hwm_reset else self.sampled
        self.delta_mb = (peak - self.baseline) / 1e3
        self.method = "VmHWM" if self.hwm_reset else "sampled VmRSS"


def _worker(reader: str, path: str, warmup: str | None, repeats: int) -> dict:
    """Best time of ``repeats`` reads (the machine may be shared); peak memory of the first."""
    read = {"ours": _read_ours, "semi_ate": _read_semi_ate, "pystdf": _read_pystdf}[reader]
    cold = None
    if warmup:
        start = time.perf_counter()
        read(warmup)
        cold = time.perf_counter() - start
    times = []
    with _PeakRss() as memory:
        start = time.perf_counter()
        figures = read(path)
        times.append(time.perf_counter() - start)
    for _ in range(repeats - 1):
        start = time.perf_counter()
        read(path)
        times.append(time.perf_counter() - start)
    figures.update(seconds=min(times), repeats=repeats, cold_s=cold, peak_rss_delta_mb=memory.delta_mb,
                   memory_method=memory.method)
    return figures


def _measure(reader: str, path: Path, warmup: Path, repeats: int) -> dict:
    command = [sys.executable, "-m", "bench.stdf_read", "--worker", reader, str(path), "--warmup", str(warmup),
               "--repeats", str(repeats)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# files and the run


def _stdf_bytes(path: Path) -> int:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as handle:
            return sum(len(block) for block in iter(lambda: handle.read(1 << 20), b""))
    return path.stat().st_size


def synthetic_lot(path: Path, parts: int, tests: int = 200) -> Path:
    """One lot from trainer.synth (4-site touchdowns, MPR pins, excursions) written as STDF."""
    from trainer import synth
    from trainer.stdf_writer import write_stdf
    config = synth.SynthConfig(parts=parts, tests=tests, lots=1,
                               excursions=tuple(e for e in synth.EXCURSIONS if e != "shifted_lot"))
    write_stdf(path, synth.generate(config, chunk_parts=20_000), synth.test_catalog(config),
               sites_per_touchdown=config.sites)
    return path


def _default_files(workdir: Path, quick: bool) -> list[Path]:
    plain = workdir / "a595.stdf"
    with gzip.open(A595, "rb") as src, open(plain, "wb") as dst:
        shutil.copyfileobj(src, dst)
    files = [plain, A595]
    for parts in (2_000, 10_000 if quick else 100_000):
        files.append(synthetic_lot(workdir / f"synth_{parts // 1000}k_x200.stdf", parts))
    return files


def _available(reader: str) -> bool:
    module = {"ours": "trainer.ingest.stdf", "semi_ate": "Semi_ATE.STDF", "pystdf": "pystdf"}[reader]
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def run(paths: list[str] | None = None, quick: bool = False, reference_limit_mb: float | None = None) -> dict:
    """Measure every available reader on ``paths`` (default: a595 plain and .gz, synthetic lots)."""
    limit = reference_limit_mb if reference_limit_mb is not None else (5.0 if quick else 30.0)
    workdir = Path(tempfile.mkdtemp(prefix="stdf_bench_"))
    try:
        files = [Path(p) for p in paths] if paths else _default_files(workdir, quick)
        warmup = workdir / "warmup.stdf"
        shutil.copyfile(REPO / "tests" / "data" / "stdf" / "d10_final_test.std", warmup)
        readers = [r for r in READERS if _available(r)]
        measurements = []
        for path in files:
            size = _stdf_bytes(path)
            for reader in readers:
                row = {"file": path.name, "stdf_mb": size / 1e6, "reader": reader}
                if reader != "ours" and size / 1e6 > limit:
                    row["skipped"] = f"over {limit:g} MB"
                else:
                    # the pure-Python readers take seconds per MB: one read is steady enough
                    repeats = 3 if reader == "ours" or size < 3e6 else 1
                    row.update(_measure(reader, path, warmup, repeats))
                    if "seconds" in row:
                        row["mb_per_s"] = size / 1e6 / row["seconds"]
                        row["parts_per_s"] = row["parts"] / row["seconds"]
                measurements.append(row)
        for row in measurements:
            ours = next((m for m in measurements if m["file"] == row["file"] and m["reader"] == "ours"), None)
            if ours and "seconds" in row and "seconds" in ours:
                row["slower_than_ours"] = row["seconds"] / ours["seconds"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"measurements": measurements, "readers": readers,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}}


def read_speed(path: Path, reader: str = "ours", repeats: int = 1) -> dict:
    """One reader on one file in a fresh process: the ``_worker`` figures plus ``stdf_mb``, ``mb_per_s`` and
    ``parts_per_s`` (or ``error``)."""
    size = _stdf_bytes(path)
    row = {"stdf_mb": size / 1e6, **_measure(reader, path, REPO / "tests" / "data" / "stdf" / "d10_final_test.std",
                                             repeats)}
    if "seconds" in row:
        row["mb_per_s"] = size / 1e6 / row["seconds"]
        row["parts_per_s"] = row["parts"] / row["seconds"]
    return row


def markdown(result: dict) -> str:
    lines = ["| file | STDF MB | reader | parts | tests | best s | MB/s | parts/s | x ours time | "
             "peak RSS +MB | table MB |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in result["measurements"]:
        head = f"| {m['file']} | {m['stdf_mb']:.1f} | {m['reader']} |"
        if "seconds" not in m:
            lines.append(head + f" {m.get('skipped') or m.get('error')} |" + " |" * 8)
            continue
        lines.append(head + f" {m['parts']:,} | {m['tests']} | {m['seconds']:.3f} | {m['mb_per_s']:.1f} | "
                            f"{m['parts_per_s']:,.0f} | {m.get('slower_than_ours', 1.0):.1f} | "
                            f"{m['peak_rss_delta_mb']:.0f} | {m['table_mb']:.1f} |")
    ours = [m for m in result["measurements"] if m["reader"] == "ours" and m.get("cold_s") is not None]
    if ours:
        lines.append("")
        lines.append(f"ours: first read in a fresh process (numba cache load) {ours[0]['cold_s']:.2f} s; "
                     f"memory measured by {ours[0]['memory_method']}; readers: {', '.join(result['readers'])}; "
                     f"{result['machine']['cpus']} CPUs, Python {result['machine']['python']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="STDF files (default: a595 and synthetic lots)")
    parser.add_argument("--quick", action="store_true", help="smaller synthetic lots")
    parser.add_argument("--reference-limit", type=float, default=None,
                        help="largest file (MB) the reference readers get (default 30, quick 5)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--worker", choices=READERS, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.paths[0], args.warmup, args.repeats)))
        return 0
    result = run(args.paths or None, quick=args.quick, reference_limit_mb=args.reference_limit)
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
