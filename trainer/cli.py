"""`edge-train`: synthesize, ingest, train, export and manage the model registry."""
from __future__ import annotations

import argparse
import sys
import time

from edge_agent.errors import run_command
from edge_agent.package.manifest import YIELD_KINDS

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

    from .registry_cli import add_registry_commands
    add_registry_commands(commands, DEFAULT_REGISTRY)
    return parser


def _add_synth_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parts", type=int, default=20000)
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--lots", type=int, default=1)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--first-lot", type=int, default=1, help="index of the first lot's name")
    parser.add_argument("--excursion", action="append", choices=["latent_outliers", "drifting_site", "shifted_lot"],
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
    parser.add_argument("--yield-model", choices=YIELD_KINDS, default="random_forest")
    parser.add_argument("--yield-trees", type=int, default=100)
    parser.add_argument("--yield-label", default=None, help="label column (default: final_pass if present, else passed)")
    parser.add_argument("--holdout-fraction", type=float, default=0.2,
                        help="share of the parts held out to evaluate both models")
    parser.add_argument("--retest-policy", choices=["last", "first", "all"], default="last")
    parser.add_argument("--min-rows", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--promote", choices=["staging", "production"], default=None,
                        help="promote the new version straight away")


# `edge-train fit` option -> the TrainConfig field it sets (messages name the option the user typed).
FIT_OPTIONS = {"name": "name", "trees": "n_trees", "max_samples": "max_samples", "max_features": "max_features",
               "target_outlier_rate": "target_outlier_rate", "train_outlier_on": "train_outlier_on",
               "yield_model": "yield_model", "yield_trees": "yield_trees", "yield_label": "yield_label",
               "holdout_fraction": "holdout_fraction", "seed": "seed"}


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
    summary = write(config, args.out)
    print(summary)
    print(f"written in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_fit(args) -> int:
    from edge_agent.package.registry import Registry

    from .ingest import load_tables
    from .package import build_and_publish
    from .train import TrainConfig, fit

    start = time.perf_counter()
    config = TrainConfig(**{field: getattr(args, option) for option, field in FIT_OPTIONS.items()})
    config.check("edge-train fit options", names={field: f"--{option.replace('_', '-')}"
                                                  for option, field in FIT_OPTIONS.items()})
    print(f"reading {len(args.data)} file(s)", file=sys.stderr)
    table, report = load_tables(args.data, retest_policy=args.retest_policy, min_rows=args.min_rows)
    print(report.summary(), file=sys.stderr)
    trained = fit(table, config)
    print("exporting ONNX graphs and checking them against scikit-learn", file=sys.stderr)
    registry = Registry(args.registry)
    ref = build_and_publish(trained, table, report.to_dict(), registry, args.data)
    if args.promote:
        registry.promote(ref.name, ref.version, args.promote, reason=f"--promote {args.promote} at fit")
    from .registry_cli import package_summary
    print(package_summary(registry, ref))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args.workdir, parts=args.parts, tests=args.tests, stream_parts=args.stream_parts,
                    seed=args.seed, registry_root=args.registry, name=args.name)


if __name__ == "__main__":
    sys.exit(main())
