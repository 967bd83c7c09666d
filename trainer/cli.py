"""`edge-train`: synthesize, ingest, train, export, sign and manage the model registry; create keys."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from edge_agent.errors import EdgeError, run_command
from edge_agent.package.manifest import THRESHOLD_OBJECTIVES, YIELD_KINDS

DEFAULT_REGISTRY = "models"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("edge-train", lambda: args.handler(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-train", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write a synthetic lot (Parquet, CSV or STDF V4)")
    synth.add_argument("--out", required=True,
                       help="output file: .parquet, .csv, or .stdf/.std (+ .gz/.bz2/.xz); STDF holds one lot per "
                            "file, so with several lots name them with {lot}, e.g. 'out/{lot}.stdf.gz' "
                            "(else _{lot} goes before the suffix)")
    synth.add_argument("--final-test", default=None, metavar="FILE",
                       help="also write the final-test lot of these dies (same formats; STDF: one file per lot): the "
                            "downstream result, joined by `edge-train fit --outcomes`; the wafer-sort file then has "
                            "no final_pass column")
    _add_synth_options(synth)
    synth.set_defaults(handler=cmd_synth)

    fit = commands.add_parser("fit", help="train, export and publish a model package")
    fit.add_argument("--data", action="append", required=True,
                     help="training data file (CSV, Parquet, STDF); repeat to combine lots")
    _add_fit_options(fit)
    fit.set_defaults(handler=cmd_fit)

    demo = commands.add_parser("demo", help="the whole product on a synthetic floor: train -> publish -> collector "
                                            "+ agent -> stream the next lot -> outliers, PAT vs model, latency, drift")
    demo.add_argument("--workdir", help="where the demo keeps its data and logs (default: a new temp folder)")
    demo.add_argument("--parts", type=int, default=20000, help="parts in the training lots")
    demo.add_argument("--tests", type=int, default=200)
    demo.add_argument("--stream-parts", type=int, default=6000, help="parts in the streamed next lot")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--registry", default=DEFAULT_REGISTRY)
    demo.add_argument("--name", default="demo", help="model name in the registry")
    demo.set_defaults(handler=cmd_demo)

    fleet = commands.add_parser("fleet", help="score the collector's incidents against ground truth: fleet scenarios "
                                              "(normal, drifting site, tester shift, process shift) replayed through "
                                              "real agents and a real collector")
    fleet.add_argument("--workdir", help="where the scenarios keep their data, databases and logs (default: a new "
                                         "temp folder)")
    fleet.add_argument("--scenario", action="append", choices=["normal", "drifting_site", "tester_shift",
                                                               "process_shift"], help="repeatable; default: all four")
    fleet.add_argument("--testers", type=int, default=4, help="agent processes, one per tester")
    fleet.add_argument("--sites", type=int, default=4)
    fleet.add_argument("--lots", type=int, default=3, help="lots per tester")
    fleet.add_argument("--lot-parts", type=int, default=3000)
    fleet.add_argument("--tests", type=int, default=200)
    fleet.add_argument("--repeats", type=int, default=1, help="runs per scenario, each on other tester floors")
    fleet.add_argument("--seed", type=int, default=100, help="tester k's floor is seed + k (+ 100 per repeat)")
    fleet.add_argument("--pace", type=float, default=0.0, help="parts per second per tester (default 0: as fast as "
                                                               "the agents answer)")
    fleet.set_defaults(handler=cmd_fleet)

    from edge_agent.keys import add_keys_command

    from .registry_cli import DEFAULT_KEYS, add_registry_commands
    add_registry_commands(commands, DEFAULT_REGISTRY)
    add_keys_command(commands, DEFAULT_KEYS)
    return parser


def _add_synth_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parts", type=int, default=20000)
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--lots", type=int, default=1)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--first-lot", type=int, default=1, help="index of the first lot's name")
    parser.add_argument("--excursion", action="append", choices=["latent_outliers", "drifting_site", "shifted_lot",
                                                                   "tester_shift", "process_shift"],
                        help="inject an excursion (repeatable; default: latent_outliers)")


def _add_fit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="demo", help="model name in the registry")
    parser.add_argument("--registry", default=DEFAULT_REGISTRY, help="registry root folder")
    parser.add_argument("--trees", type=int, default=200, help="Isolation Forest trees")
    parser.add_argument("--max-samples", type=_max_samples, default="auto", help="'auto', an integer, or a fraction")
    parser.add_argument("--max-features", type=float, default=1.0)
    parser.add_argument("--target-outlier-rate", type=float, default=0.01,
                        help="share of passing training parts flagged at the calibrated threshold")
    parser.add_argument("--train-outlier-on", choices=["passing", "all"], default="passing")
    parser.add_argument("--yield-model", choices=("auto", *YIELD_KINDS), default="auto",
                        help="auto: the forward folds choose among logistic L2/L1, histogram gradient boosting and a "
                             "random forest; a kind trains that one alone (still judged on the forward folds)")
    parser.add_argument("--yield-trees", type=int, default=100, help="trees of the yield random forest")
    parser.add_argument("--label-column", "--yield-label", dest="yield_label", default=None,
                        help="label column, by its name in the file (default: final_pass if present, else passed, "
                             "this step's own pass flag); never a feature")
    parser.add_argument("--pass-value", "--label-pass-value", dest="label_pass_value", default=None,
                        help="the label value that means pass, for labels not coded 0/1 or true/false (e.g. -1 for "
                             "SECOM's -1/1, PASS for PASS/FAIL); every other value must be one fail value")
    parser.add_argument("--label-kind", choices=("outcome", "test-flag"), default=None,
                        help="what the label is: a later step's outcome, or this test step's own pass flag")
    parser.add_argument("--time-column", default=None,
                        help="the column holding each part's time (ISO text or unix seconds) under its own name: "
                             "it orders the forward folds")
    parser.add_argument("--outcomes", action="append", metavar="FILE",
                        help="a later test step's results (final-test STDF, or CSV/Parquet of part identity and "
                             "result), joined to the training parts: the yield model learns them; repeatable")
    parser.add_argument("--join-on", type=_column_list, default=None, metavar="COLUMNS",
                        help="columns that identify a part on both sides, e.g. lot,wafer,x,y (default: lot,wafer,x,y, "
                             "else lot,part_id, else part_id); never features")
    parser.add_argument("--outcome-column", default=None,
                        help="the result column of CSV/Parquet outcome files (default: final_pass, passed, result or "
                             "outcome)")
    parser.add_argument("--holdout-fraction", type=float, default=0.2,
                        help="share of the parts held out at random to evaluate the outlier model")
    parser.add_argument("--folds", type=int, default=5,
                        help="forward folds of the yield model: each trains on the parts before its block (by lot, "
                             "else time, else input order)")
    parser.add_argument("--min-train-share", type=float, default=0.4,
                        help="share of the parts (the earliest) the first forward fold trains on")
    parser.add_argument("--threshold-objective", choices=THRESHOLD_OBJECTIVES, default="fail_f1",
                        help="what the yield threshold is chosen for on the pooled forward predictions: the best F1 "
                             "of the fail class, the most fails at --target-precision, or --yield-threshold as given")
    parser.add_argument("--target-precision", type=float, default=0.5,
                        help="fail precision to reach with --threshold-objective fail_precision")
    parser.add_argument("--yield-threshold", type=float, default=0.5,
                        help="threshold of --threshold-objective fixed (and when held-out parts cannot choose one)")
    parser.add_argument("--min-auc", type=float, default=0.55,
                        help="the lower bound of the forward ROC AUC's 95%% interval must reach this, else the yield "
                             "model cannot be told from chance and is refused (published only with --advisory)")
    parser.add_argument("--advisory", action="store_true",
                        help="publish a yield model that does not pass --min-auc, marked advisory in the manifest "
                             "and in every agent reply; promoted only with --force")
    parser.add_argument("--pat-max-flag-rate", type=float, default=0.001,
                        help="static PAT self-check: a test whose limits flag more than this share of passing "
                             "training parts is widened to it or disabled (default 0.001)")
    parser.add_argument("--pat-on-excess", choices=["widen", "disable"], default="widen",
                        help="what the self-check does to such a test (default widen)")
    parser.add_argument("--retest-policy", choices=["last", "first", "all"], default="last")
    parser.add_argument("--min-rows", type=int, default=200)
    parser.add_argument("--min-readings-share", type=float, default=0.5,
                        help="parts with readings for fewer than this share of the tests are reported by file and "
                             "left out of training (default 0.5)")
    parser.add_argument("--keep-sparse-parts", action="store_true",
                        help="train on those parts too (their missing readings are imputed with medians)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--promote", choices=["staging", "production"], default=None,
                        help="promote the new version straight away")
    parser.add_argument("--force", action="store_true",
                        help="with --promote: promote even a yield model below --min-auc (needs --reason; recorded)")
    parser.add_argument("--reason", default=None, help="why, for the registry history (required with --force)")
    parser.add_argument("--signing-key", default=None,
                        help="the trainer's Ed25519 secret key that signs the package (default: keys/trainer.ed25519; "
                             "edge-train keys create trainer --kind signing)")
    parser.add_argument("--unsigned", action="store_true",
                        help="development only: publish without a signature (agents refuse it unless allow_unsigned)")


# `edge-train fit` option -> the TrainConfig field it sets (messages name the option the user typed).
FIT_OPTIONS = {"name": "name", "trees": "n_trees", "max_samples": "max_samples", "max_features": "max_features",
               "target_outlier_rate": "target_outlier_rate", "train_outlier_on": "train_outlier_on",
               "yield_model": "yield_model", "yield_trees": "yield_trees", "yield_label": "yield_label",
               "label_pass_value": "label_pass_value", "label_kind": "label_kind",
               "holdout_fraction": "holdout_fraction", "folds": "forward_folds", "min_train_share": "min_train_share",
               "threshold_objective": "threshold_objective", "target_precision": "target_precision",
               "yield_threshold": "yield_threshold", "min_auc": "min_auc", "seed": "seed",
               "pat_max_flag_rate": "pat_max_flag_rate", "pat_on_excess": "pat_on_excess"}


def _column_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _fit_option_problems(args) -> list[str]:
    """Problems of option combinations (each option alone is checked by TrainConfig)."""
    problems = []
    if args.outcomes and args.yield_label:
        problems.append("--yield-label: the label is the joined outcome when --outcomes is given; give one of them")
    if (args.join_on is not None or args.outcome_column) and not args.outcomes:
        problems.append("--join-on/--outcome-column: they apply to --outcomes, which is not given")
    if args.join_on is not None and not args.join_on:
        problems.append("--join-on: expected column names separated by commas, got none")
    if args.force and not args.promote:
        problems.append("--force: it forces --promote past the gate against chance; --promote is not given")
    if args.force and not (args.reason or "").strip():
        problems.append("--force: needs --reason (the registry history records why the gate was overridden)")
    if args.unsigned and args.signing_key:
        problems.append("--unsigned: the package is signed with --signing-key; give one of them")
    return problems


def _fit_signer(args):
    """The key that signs the published package, or None with --unsigned; checked before any data is read."""
    from edge_agent.keys import load_signing_key

    from .registry_cli import DEFAULT_SIGNING_KEY
    if args.unsigned:
        print("warning: --unsigned: the package is published without a signature; agents refuse it unless they run "
              "in development mode (allow_unsigned)", file=sys.stderr)
        return None
    path = args.signing_key or DEFAULT_SIGNING_KEY
    if args.signing_key is None and not Path(path).exists():
        raise EdgeError(f"no signing key at {path}: publishing signs the package with the trainer's key; create it "
                        "with `edge-train keys create trainer --kind signing`, give --signing-key FILE, or publish "
                        "unsigned for development with --unsigned")
    return load_signing_key(path)


def _max_samples(text: str) -> int | float | str:
    """An integer, a fraction or the text itself ('auto', or a mistake that the config check names)."""
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


def cmd_synth(args) -> int:
    from edge_agent.package.files import output_path
    from .synth import SynthConfig, write
    output_path(args.out, "--out")
    config = SynthConfig(seed=args.seed, parts=args.parts, tests=args.tests, lots=args.lots, sites=args.sites,
                         heads=args.heads, first_lot_index=args.first_lot,
                         excursions=tuple(args.excursion or ("latent_outliers",)))
    start = time.perf_counter()
    summary = write(config, args.out, final_test=args.final_test)
    print(summary)
    print(f"written in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_fit(args) -> int:
    from edge_agent.package.registry import Registry
    from edge_agent.package.signing import Trust
    from edge_agent.checked import unusable

    from .ingest import load_tables
    from .package import build_and_publish
    from .train import TrainConfig, TrainConfigError, fit

    start = time.perf_counter()
    config = TrainConfig(**{field: getattr(args, option) for option, field in FIT_OPTIONS.items()})
    problems = config.problems({field: f"--{option.replace('_', '-')}" for option, field in FIT_OPTIONS.items()})
    problems += _fit_option_problems(args)
    if problems:
        raise unusable(TrainConfigError, "edge-train fit options", problems)
    signer = _fit_signer(args)
    print(f"reading {len(args.data)} file(s)", file=sys.stderr)
    set_aside = [column for column in (args.yield_label, args.time_column, *(args.join_on or ())) if column]
    table, report = load_tables(args.data, retest_policy=args.retest_policy, min_rows=args.min_rows,
                                set_aside=set_aside, min_readings_share=args.min_readings_share,
                                keep_sparse_parts=args.keep_sparse_parts)
    print(report.summary(), file=sys.stderr)
    if args.time_column:
        from .ingest.tabular import use_time_column
        table = use_time_column(table, args.time_column)
    outcomes = None
    if args.outcomes:
        from .outcomes import join_outcomes
        print(f"joining {len(args.outcomes)} outcome file(s)", file=sys.stderr)
        table, outcomes = join_outcomes(table, args.outcomes, join_on=args.join_on,
                                        outcome_column=args.outcome_column, pass_value=args.label_pass_value)
        print(outcomes.summary(), file=sys.stderr)
    trained = fit(table, config, outcomes=outcomes)
    print(_parsed_range(table, trained), file=sys.stderr)
    print(_evaluation_summary(trained), file=sys.stderr)
    if not trained.gate.passed and not args.advisory:
        raise EdgeError(f"refused: {trained.gate.reason}")
    print("exporting ONNX graphs and checking them against scikit-learn", file=sys.stderr)
    # The summary below checks the signature just written against the signer's own public key.
    registry = Registry(args.registry, None if signer is None else
                        Trust({signer.key_id: signer.private.public_key()}, signer.source))
    ref = build_and_publish(trained, table, report.to_dict(), registry, args.data, signer=signer)
    if not trained.gate.passed:
        print(f"warning: {trained.gate.reason}; {ref} is published as ADVISORY (--advisory) and is promoted only "
              "with --force and a reason", file=sys.stderr)
    if args.promote:
        registry.promote(ref.name, ref.version, args.promote, force=args.force,
                         reason=args.reason or f"--promote {args.promote} at fit", signer=signer)
    from .registry_cli import package_summary
    print(package_summary(registry, ref))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def _parsed_range(table, trained) -> str:
    """First and last time, parts and fails of what the yield model learned from."""
    known = trained.label.known
    fails = int((trained.label.values[known] == 0).sum())
    span = "no times"
    if "timestamp" in table.frame.columns:
        import pandas as pd
        times = pd.to_numeric(table.frame["timestamp"], errors="coerce")
        if times.notna().any():
            span = (f"{pd.Timestamp(times.min(), unit='s').isoformat()} to "
                    f"{pd.Timestamp(times.max(), unit='s').isoformat()} UTC")
    return f"parsed: {span}; {int(known.sum()):,} parts with a label, {fails:,} failing"


def _evaluation_summary(trained) -> str:
    metrics, forward = trained.metrics["yield"], trained.forward
    auc = ("n/a" if metrics["roc_auc"] is None else
           f"{metrics['roc_auc']:.3f} (95% interval {metrics['roc_auc_low']:.3f}-{metrics['roc_auc_high']:.3f})")
    candidates = "; ".join(f"{c.name} mean {'n/a' if c.mean_auc is None else f'{c.mean_auc:.3f}'}"
                           for c in forward.candidates)
    return "\n".join([
        f"yield label: {trained.label.source} ({trained.label.column}): {trained.label.meaning}",
        f"forward folds ({trained.folds.kind}): {trained.folds.reason}",
        f"candidates (mean forward ROC AUC): {candidates}",
        f"chosen: {forward.choice}",
        f"yield model: forward ROC AUC {auc} on {metrics['evaluated_parts']:,} out-of-time parts "
        f"({metrics['fail_parts']:,} failing); threshold {trained.yield_threshold:.4g} "
        f"({trained.threshold.objective}: {trained.threshold.note})",
    ])


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args.workdir, parts=args.parts, tests=args.tests, stream_parts=args.stream_parts,
                    seed=args.seed, registry_root=args.registry, name=args.name)


def cmd_fleet(args) -> int:
    import tempfile

    from .fleet import SCENARIOS, FleetConfig, evaluate, table
    config = FleetConfig(testers=args.testers, sites=args.sites, lots=args.lots, lot_parts=args.lot_parts,
                         tests=args.tests, seed=args.seed, pace=args.pace)
    start = time.perf_counter()
    scores = evaluate(config, args.workdir or tempfile.mkdtemp(prefix="edge-fleet-"),
                      scenarios=tuple(args.scenario or SCENARIOS), repeats=args.repeats)
    print(table(scores))
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0 if all(score.passed for score in scores) else 1


if __name__ == "__main__":
    sys.exit(main())
