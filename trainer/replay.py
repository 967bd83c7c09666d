"""`edge-replay`: play a recorded STDF file into a running edge agent, part by part, as its tester sent them.

    edge-replay LOT.stdf --registry models --model NAME [--stage production | --version N]
                [--connect tcp://127.0.0.1:5555] [--pace fast | --pace file [--speed 10]]
                [--replies replies.jsonl] [--json] [--wafer 09] [--min-shared-tests 0.5]
    edge-replay LOT.stdf --features-from-agent [--connect ...]      # the feature order of the model the agent serves
    edge-replay LOT.stdf --registry models --model NAME --dump messages.jsonl      # no agent: the messages only

Parts go out in the order the file completed them (PRR order), one score request each, with the readings in
the model's feature order: a test of the model that the file lacks is sent as NaN (not run), a test of the
file that the model does not know is dropped, and both are counted. ``--pace file`` sends each part when the
tester finished it (the running sum of the PRR test times, TEST_T, divided by ``--speed``); ``--pace fast``
sends each part as soon as the previous reply came back.

Parts without any reading of the model's tests are counted (a sampled datalog has many); the agent answers them
with the insufficient_readings bin. A file sharing fewer than ``--min-shared-tests`` (default half) of the
model's tests is refused before anything is sent. ``--wafer`` replays only the named wafers' parts.

Exit status: 0 every part got a decision, 1 some parts got none (the summary says why), 2 unusable input:
not an STDF file, a model the registry does not have, an agent that does not answer, a file that shares too few
of the model's tests.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, TextIO

import numpy as np

from edge_agent.client import AgentClient, AgentUnavailable, ScoreResult
from edge_agent.daemon.config import check_endpoint
from edge_agent.errors import EdgeError, run_command
from edge_agent.package.manifest import MANIFEST_FILE, read_manifest
from edge_agent.summary import ReplySummary
from edge_agent.wire.score import PROTOCOL_VERSION, SCORE

if TYPE_CHECKING:
    # Annotations only: pandas (the trainer role) is imported where a table is read, so that without the trainer
    # role `edge-replay` still reaches its error handler, which names the extra to install.
    import pandas as pd

    from trainer.table import ParametricTable

DEFAULT_CONNECT = "tcp://127.0.0.1:5555"
PART_IDENTITY = ("lot", "sublot", "wafer", "x", "y", "head", "site", "part_id")
MIN_SHARED_TESTS = 0.5   # the agent's default min_readings_share: below it every part would lack readings
PACES = ("fast", "file")
EXIT_OK, EXIT_UNDECIDED = 0, 1   # 2: unusable input (edge_agent.errors.run_command)
# A replay is not the production path: a generous timeout keeps a slow first call (session warm-up, a reload)
# from being counted as "no decision", while a dead agent still fails fast through the client's back-off.
DEFAULT_TIMEOUT_MS = 1000.0
HEALTH_TIMEOUT_MS = 2000.0


class ReplayError(EdgeError):
    """A replay that cannot start: no model to take the feature order from, or no agent answering."""


@dataclass
class Replay:
    """A lot's parts as the agent will receive them, in file (completion) or table order."""

    path: str
    features: list[str]          # the model's feature order
    readings: np.ndarray         # float32, parts x features; NaN = not run
    parts: list[dict]            # identity map per part, as sent
    test_time_ms: np.ndarray     # PRR TEST_T per part, NaN where the file did not record it
    missing_tests: list[str]     # model features the file lacks (sent as NaN)
    dropped_tests: list[str]     # file tests the model does not know (not sent)
    non_finite: int              # infinite readings sent as NaN (the agent refuses infinity)

    def __len__(self) -> int:
        return len(self.parts)

    def messages(self) -> Iterator[dict]:
        """The score requests in sending order (readings as a list; NaN becomes None in JSON)."""
        for index, (part, row) in enumerate(zip(self.parts, self.readings)):
            yield {"v": PROTOCOL_VERSION, "type": SCORE, "id": index + 1, "part": part,
                   "readings": [None if math.isnan(v) else v for v in row.tolist()]}

    @property
    def shared_tests(self) -> int:
        """Model tests the file has (readings for them are sent)."""
        return len(self.features) - len(self.missing_tests)

    def describe(self) -> dict:
        present = np.count_nonzero(~np.isnan(self.readings), axis=1)
        return {"file": self.path, "parts": len(self), "features": len(self.features),
                "shared_tests": self.shared_tests, "parts_without_readings": int(np.sum(present == 0)),
                "tests_missing_from_file": self.missing_tests, "tests_missing_count": len(self.missing_tests),
                "tests_dropped": self.dropped_tests, "tests_dropped_count": len(self.dropped_tests),
                "non_finite_readings_sent_as_nan": self.non_finite,
                "parts_without_test_time": int(np.isnan(self.test_time_ms).sum())}


def load_replay(path: str | Path, features: list[str], wafers: list[str] | None = None) -> Replay:
    """Read the STDF file (DataError if it is not one) and line its readings up with ``features``; only the parts
    of ``wafers`` when given (ReplayError if the file has none of them)."""
    from trainer.ingest.stdf import read_stdf
    from trainer.table import ParametricTable
    table = read_stdf(path).table
    if wafers:
        known = table.frame["wafer"].astype(str) if "wafer" in table.frame.columns else None
        if known is None or not known.isin(wafers).any():
            raise ReplayError(f"{path}: no parts of wafer(s) {', '.join(wafers)}; the file has wafers "
                              f"{', '.join(sorted(set(known))) if known is not None else '(none recorded)'}")
        table = ParametricTable(table.frame[known.isin(wafers).to_numpy()].reset_index(drop=True), table.tests,
                                table.sources)
    return plan_from_table(table, features, str(path))


def check_shared_tests(plan: Replay, min_share: float) -> None:
    """Refuse a file that shares fewer than ``min_share`` of the model's tests: every part would reach the agent
    with too few readings, which means the wrong model or the wrong file."""
    if plan.shared_tests < min_share * len(plan.features):
        raise ReplayError(f"{plan.path} has {plan.shared_tests} of the model's {len(plan.features)} tests "
                          f"({plan.shared_tests / max(1, len(plan.features)):.0%}), fewer than --min-shared-tests "
                          f"{min_share:.0%}: wrong model or wrong file? (model tests missing from it: "
                          f"{', '.join(plan.missing_tests[:5])}{' ...' if len(plan.missing_tests) > 5 else ''})")


def plan_from_table(table: ParametricTable, features: list[str], source: str = "") -> Replay:
    """A table's parts, in table order, as the agent will receive them: readings in ``features`` order."""
    frame = table.frame
    in_table = set(table.test_columns)
    present = [c for c in features if c in in_table]
    readings = np.full((len(frame), len(features)), np.nan, dtype=np.float32)
    readings[:, [i for i, c in enumerate(features) if c in in_table]] = table.readings(present).astype(np.float32)
    infinite = np.isinf(readings)
    readings[infinite] = np.nan
    test_time = (frame["test_time_ms"].to_numpy(np.float64, na_value=np.nan) if "test_time_ms" in frame.columns
                 else np.full(len(frame), np.nan))
    known = set(features)
    return Replay(path=source, features=list(features), readings=readings, parts=part_identities(frame),
                  test_time_ms=np.where(test_time > 0, test_time, np.nan),
                  missing_tests=[c for c in features if c not in in_table],
                  dropped_tests=[c for c in table.test_columns if c not in known],
                  non_finite=int(infinite.sum()))


def part_identities(frame: pd.DataFrame) -> list[dict]:
    """Part identity maps with plain Python values (msgpack does not pack numpy scalars); unknowns left out."""
    import pandas as pd
    fields = [f for f in PART_IDENTITY if f in frame.columns]
    records = frame[fields].to_dict("records")
    return [{k: _plain(v) for k, v in record.items() if not pd.isna(v)} for record in records]


def _plain(value):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)   # integer identity columns read back as float when they hold missing values
    return value


def send_schedule(test_time_ms: np.ndarray, speed: float = 1.0) -> np.ndarray:
    """Seconds after the start at which each part is sent under ``--pace file``: when the tester finished it.

    Parts are taken as tested one after another, so part i finishes after the test times of parts 0..i; a part
    without a recorded test time adds nothing. ``speed`` 10 plays the file ten times faster than it was tested.
    """
    if not (speed > 0 and math.isfinite(speed)):
        raise ReplayError(f"--speed must be a positive number, got {speed!r}")
    return np.cumsum(np.nan_to_num(np.asarray(test_time_ms, np.float64), nan=0.0)) / 1000.0 / speed


def replay(plan: Replay, client: AgentClient, *, schedule: np.ndarray | None = None,
           replies: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep) -> ReplySummary:
    """Send every part (at ``schedule`` seconds from the start, or back to back without one); one summary.

    ``replies`` gets one JSON line per part: its identity and what the agent decided (or why it did not).
    """
    summary = ReplySummary()
    start = clock()
    for index, (part, row) in enumerate(zip(plan.parts, plan.readings)):
        if schedule is not None:
            wait = start + schedule[index] - clock()
            if wait > 0:
                sleep(wait)
        result = client.score(row, part)
        summary.add(part, result)
        if replies is not None:
            replies.write(json.dumps(reply_record(index, part, result)) + "\n")
    return summary


def reply_record(index: int, part: dict, result: ScoreResult) -> dict:
    """One line of ``--replies``."""
    return {"index": index, "part": part, "decided": result.decided, "bin": result.bin,
            "bin_name": result.bin_name, "why": result.why or None, "flags": result.flags,
            "drivers": result.drivers, "insufficient_readings": result.insufficient_readings,
            "tests_present": result.tests_present, "outlier_score": result.outlier_score,
            "outlier": result.outlier, "pass_probability": result.pass_probability,
            "predicted_fail": result.predicted_fail,
            "model_version": None if result.model is None else result.model.get("version"),
            "round_trip_us": result.round_trip_us, "agent_us": result.agent_us,
            "error_code": result.error_code, "error_message": result.error_message or None}


def dump(plan: Replay, out: TextIO) -> int:
    """Write the messages a replay would send, one JSON line each; returns how many."""
    count = 0
    for message in plan.messages():
        out.write(json.dumps(message) + "\n")
        count += 1
    return count


def registry_features(registry_root: str, name: str, stage: str = "production",
                      version: str | None = None) -> tuple[list[str], str]:
    """The feature order of a registry package and its version (RegistryError if there is no such package)."""
    from edge_agent.package.registry import Registry
    registry = Registry(registry_root)
    ref = registry.resolve(name, stage, version)
    return registry.manifest(ref).columns, ref.version


def agent_features(client: AgentClient) -> tuple[list[str], str]:
    """The feature order of the package the agent serves, read from the package folder its health reply names
    (the agent runs on this machine, next to its registry)."""
    model = check_agent(client)
    manifest_path = Path(str(model.get("path", ""))) / MANIFEST_FILE
    try:
        manifest, problems = read_manifest(manifest_path.read_bytes())
    except OSError as error:
        manifest, problems = None, [error.strerror]
    if problems:
        raise ReplayError(f"cannot read the feature order of the agent's model from {manifest_path} ({problems[0]}); "
                          "give --registry and --model instead")
    return manifest.columns, str(model.get("version"))


def check_agent(client: AgentClient) -> dict:
    """The model the agent serves (its health reply's ``model``); ReplayError when the agent does not answer."""
    try:
        reply = client.health(timeout_ms=HEALTH_TIMEOUT_MS)
    except AgentUnavailable as error:
        raise ReplayError(f"{error}; is `edge-agent run` up and bound there? (--connect)") from None
    if not isinstance(reply.get("model"), dict):
        raise ReplayError(f"the agent at {client.endpoint} answered health with {reply.get('type')!r} "
                          f"({reply.get('code', '')} {reply.get('message', '')}), not a model description")
    return reply["model"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stdf", help="STDF V4 file (.stdf/.std, plain or .gz/.bz2/.xz)")
    parser.add_argument("--registry", default="models", help="registry root folder (default: models)")
    parser.add_argument("--model", help="model name: its manifest gives the feature order")
    parser.add_argument("--stage", default="production", help="registry stage of the model (default: production)")
    parser.add_argument("--version", help="model version (instead of --stage)")
    parser.add_argument("--features-from-agent", action="store_true",
                        help="take the feature order from the package the agent serves (instead of --model)")
    parser.add_argument("--connect", default=DEFAULT_CONNECT, help=f"agent endpoint (default: {DEFAULT_CONNECT})")
    parser.add_argument("--pace", choices=PACES, default="fast",
                        help="fast: back to back; file: when the tester finished each part (PRR TEST_T)")
    parser.add_argument("--speed", type=float, default=1.0, help="with --pace file: play this many times faster")
    parser.add_argument("--timeout-ms", type=float, default=DEFAULT_TIMEOUT_MS, help="per part")
    parser.add_argument("--replies", help="write every reply here, one JSON line per part")
    parser.add_argument("--dump", help="write the messages to this file, one JSON line per part; no agent needed")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--wafer", action="append", help="replay only this wafer's parts (repeatable)")
    parser.add_argument("--min-shared-tests", type=float, default=MIN_SHARED_TESTS,
                        help="refuse (exit 2) a file with fewer than this share of the model's tests "
                             f"(default {MIN_SHARED_TESTS})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("edge-replay", lambda: run(args))


def run(args: argparse.Namespace) -> int:
    if args.features_from_agent == bool(args.model):
        raise ReplayError("give either --model (feature order from the registry) or --features-from-agent")
    if args.dump and args.features_from_agent:
        raise ReplayError("--dump needs no agent: give --model for the feature order")
    if not args.dump:
        check_endpoint("--connect", args.connect)
    schedule_speed = args.speed if args.pace == "file" else None
    if schedule_speed is not None:
        send_schedule(np.zeros(0), schedule_speed)   # refuse a bad --speed before reading anything
    with ExitStack() as stack:
        client = None
        if not args.dump:
            client = stack.enter_context(AgentClient(args.connect, timeout_ms=args.timeout_ms))
        if args.features_from_agent:
            features, version = agent_features(client)
        else:
            features, version = registry_features(args.registry, args.model, args.stage, args.version)
        plan = load_replay(args.stdf, features, args.wafer)
        check_shared_tests(plan, args.min_shared_tests)
        inputs = {**plan.describe(), "model_version": version, "pace": args.pace,
                  "speed": schedule_speed}
        if args.dump:
            with _open_out(args.dump) as out:
                inputs["messages_written"] = dump(plan, out)
            _report(inputs, None, args.json)
            return EXIT_OK
        if not args.features_from_agent:
            _check_served_model(check_agent(client), features, version, args)
        schedule = None if schedule_speed is None else send_schedule(plan.test_time_ms, schedule_speed)
        replies = stack.enter_context(_open_out(args.replies)) if args.replies else None
        started = time.perf_counter()
        summary = replay(plan, client, schedule=schedule, replies=replies)
        inputs["seconds"] = round(time.perf_counter() - started, 3)
    _report(inputs, summary, args.json)
    return EXIT_OK if summary.decided == summary.parts else EXIT_UNDECIDED


def _check_served_model(served: dict, features: list[str], version: str, args: argparse.Namespace) -> None:
    """Readings in another model's order would be refused part after part: stop before the first."""
    chosen = f"version {args.version}" if args.version else args.stage
    if served.get("features") != len(features):
        raise ReplayError(f"the agent at {args.connect} serves {served.get('name')} version {served.get('version')} "
                          f"with {served.get('features')} features, but {args.model} ({chosen}) in {args.registry} "
                          f"has {len(features)}; replay with the model the agent serves (--features-from-agent)")
    if (served.get("name"), str(served.get("version"))) != (args.model, version):
        print(f"edge-replay: note: the agent serves {served.get('name')!r} version {served.get('version')}, "
              f"the feature order comes from {args.model!r} version {version}", file=sys.stderr)


def _open_out(path: str) -> TextIO:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return open(path, "w")
    except OSError as error:
        raise ReplayError(f"cannot write {path}: {error.strerror or error}") from None


def _report(inputs: dict, summary: ReplySummary | None, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"replay": inputs, "replies": None if summary is None else summary.as_dict()}, indent=1))
        return
    speed = f" x{inputs['speed']:g}" if inputs["speed"] else ""
    print(f"{inputs['file']}: {inputs['parts']:,} parts, {inputs['features']} features of model version "
          f"{inputs['model_version']}, pace {inputs['pace']}{speed}")
    print(f"  model tests the file lacks (sent as NaN): {inputs['tests_missing_count']}"
          + _some(inputs["tests_missing_from_file"]))
    print(f"  parts without readings for any model test: {inputs['parts_without_readings']:,}")
    print(f"  file tests the model does not know (dropped): {inputs['tests_dropped_count']}"
          + _some(inputs["tests_dropped"]))
    if inputs["non_finite_readings_sent_as_nan"]:
        print(f"  infinite readings sent as NaN: {inputs['non_finite_readings_sent_as_nan']:,}")
    if inputs["pace"] == "file" and inputs["parts_without_test_time"]:
        print(f"  parts without a test time (sent without waiting): {inputs['parts_without_test_time']:,}")
    if "messages_written" in inputs:
        print(f"  {inputs['messages_written']:,} messages written, no agent contacted")
    if summary is not None:
        print(f"  replayed in {inputs['seconds']:.2f} s")
        print(summary.describe())


def _some(names: list[str], shown: int = 5) -> str:
    if not names:
        return ""
    more = f", ... {len(names) - shown} more" if len(names) > shown else ""
    return " (" + ", ".join(names[:shown]) + more + ")"


if __name__ == "__main__":
    sys.exit(main())


def feature_columns(registry_root: str, name: str, stage: str = "production") -> list[str]:
    """The model's feature order (manifest), which the readings sent to the agent follow."""
    return registry_features(registry_root, name, stage)[0]


def stream_lot(client: AgentClient, table: ParametricTable, columns: list[str]) -> dict:
    """Score every part of ``table`` (in table order) one call at a time, back to back; summary of the decisions.

    Tests of the model that the table lacks are sent as NaN (not run). The summary is ReplySummary.as_dict()
    plus the model's tests that the table lacks.
    """
    plan = plan_from_table(table, columns)
    return {**replay(plan, client).as_dict(), "tests_missing_from_table": plan.missing_tests}
