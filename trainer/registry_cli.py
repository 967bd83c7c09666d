"""`edge-train registry <command>`, twelve commands:

- packages: ``list`` (models, versions, stages), ``show`` (one package's summary), ``history`` (every stage change),
  ``verify`` (signature, checksums, manifest, fidelity), ``sign``, ``gc`` (remove half-written packages);
- stages: ``promote``, ``rollback`` (a stage or a deployment group back to its previous version);
- the fleet: ``deploy`` (a version to a group of testers), ``shadow`` (score a challenger beside the champion),
  ``deployment`` (groups, shadow and what given agents run), ``gate`` (judge a canary or shadow version by the
  collector's evidence).

The registry itself (store, stages, history, verification) is the package contract in
``edge_agent.package.registry``; this module is only its command line and the package summary people read.
"""
from __future__ import annotations

import argparse
import dataclasses
import sqlite3
from pathlib import Path

from edge_agent.collector.evidence import Thresholds, failing_reason, judge
from edge_agent.errors import RegistryError
from edge_agent.keys import SigningKey, load_signing_key, load_trusted_keys
from edge_agent.package.manifest import MANIFEST_FILE, VERSION_PATTERN, Manifest, read_manifest
from edge_agent.package.registry import SINGLE_HOLDER_STAGES, STAGES, STALE_STAGING_S, PackageRef, Registry
from edge_agent.package.deployment import (PRODUCTION, SHADOW, Assignment, deploy, read_deployment, rollback_group,
                                           set_shadow)
from edge_agent.package.signing import Trust, check_record

DEFAULT_KEYS = "keys"                                   # edge-train keys create ... writes here by default
DEFAULT_SIGNING_KEY = f"{DEFAULT_KEYS}/trainer.ed25519"


def add_registry_commands(commands: argparse._SubParsersAction, default_root: str = "models") -> None:
    """Add ``registry list|show|history|promote|rollback|verify|sign|gc`` to an ``edge-train`` subparsers object.

    Each leaf sets ``handler(args) -> int`` (0 ok, 1 verification failed); errors raise RegistryError.
    """
    root = argparse.ArgumentParser(add_help=False)
    root.add_argument("--registry", default=default_root, help=f"registry root folder (default: {default_root})")
    trusted = argparse.ArgumentParser(add_help=False)
    trusted.add_argument("--trusted-keys", default=DEFAULT_KEYS,
                         help=f"public signing key(s) packages must be signed by: a *.ed25519.pub file or a folder "
                              f"(default: {DEFAULT_KEYS})")
    trusted.add_argument("--allow-unsigned", action="store_true",
                         help="development mode: unsigned packages and untrusted signers pass (said in the report)")
    signing = argparse.ArgumentParser(add_help=False)
    signing.add_argument("--signing-key", default=None,
                         help=f"Ed25519 secret key that signs the history line (default: {DEFAULT_SIGNING_KEY} if it "
                              "exists; its key id is recorded with the user)")
    registry = commands.add_parser("registry", help="list, inspect, promote, roll back and verify model packages")
    actions = registry.add_subparsers(dest="registry_command", required=True)

    listing = actions.add_parser("list", parents=[root], help="models, versions and their stages")
    listing.add_argument("name", nargs="?")
    listing.set_defaults(handler=lambda a: _print(cli_list(Registry(a.registry), a.name)))

    show = actions.add_parser("show", parents=[root, trusted], help="summary of one package")
    show.add_argument("name")
    show.add_argument("which", nargs="?", default="production",
                      help="a version number or a stage (default: production)")
    show.set_defaults(handler=lambda a: _print(cli_show(Registry(a.registry, _trust(a)), a.name, a.which)))

    history = actions.add_parser("history", parents=[root, trusted],
                                 help="every stage change with time, user, key and reason")
    history.add_argument("name")
    history.set_defaults(handler=lambda a: _print(cli_history(Registry(a.registry, _trust(a, required=False)),
                                                              a.name)))

    gate_options = argparse.ArgumentParser(add_help=False)
    gate_options.add_argument("--fleet-db", help="the collector's SQLite database: the fleet's evidence for the gate")
    for option in dataclasses.fields(Thresholds):
        gate_options.add_argument(f"--{option.name.replace('_', '-')}", type=type(option.default),
                                  default=option.default, help=f"gate threshold (default: {option.default})")

    promote = actions.add_parser("promote", parents=[root, signing, gate_options], help="move a version to a stage")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("stage", choices=STAGES)
    promote.add_argument("--reason", required=True)
    promote.add_argument("--force", action="store_true",
                         help="promote a package whose yield model failed the gate against chance, or whose fleet "
                              "gate failed (recorded)")
    promote.set_defaults(handler=lambda a: _print(cli_promote(Registry(a.registry), a.name, a.version, a.stage,
                                                              a.reason, force=a.force, signer=_signer(a),
                                                              fleet_db=a.fleet_db, thresholds=_thresholds(a))))

    rollback = actions.add_parser("rollback", parents=[root, signing], help="give a stage (or a deployment group) "
                                                                           "back to its previous version")
    rollback.add_argument("name")
    rollback.add_argument("--stage", choices=SINGLE_HOLDER_STAGES, default="production")
    rollback.add_argument("--group", help="roll back this deployment group instead (a group without a previous "
                                          "version is removed: its testers run production)")
    rollback.add_argument("--reason", required=True)
    rollback.set_defaults(handler=lambda a: _print(
        cli_rollback_group(Registry(a.registry), a.name, a.group, a.reason, signer=_signer(a)) if a.group else
        cli_rollback(Registry(a.registry), a.name, a.stage, a.reason, signer=_signer(a))))

    deploy_ = actions.add_parser("deploy", parents=[root, trusted, signing],
                                 help="make a group of testers (e.g. canary) run a version")
    deploy_.add_argument("name")
    deploy_.add_argument("version")
    deploy_.add_argument("--group", default="canary")
    deploy_.add_argument("--agents", default="", help="agent ids or tester names, comma-separated")
    deploy_.add_argument("--percent", type=float, default=0.0, help="a share of the fleet, picked by agent id hash")
    deploy_.add_argument("--reason", required=True)
    deploy_.set_defaults(handler=lambda a: _print(_deployment_text(deploy(
        Registry(a.registry, _trust(a)), a.name, a.group, a.version, a.reason, agents=_agents(a.agents),
        percent=a.percent, signer=_signer(a)), a.agents)))

    shadow = actions.add_parser("shadow", parents=[root, trusted, signing],
                                help="score a challenger version beside the champion (or --off)")
    shadow.add_argument("name")
    shadow.add_argument("version", nargs="?")
    shadow.add_argument("--agents", default="", help="agent ids or tester names, comma-separated")
    shadow.add_argument("--percent", type=float, default=0.0, help="a share of the fleet, picked by agent id hash")
    shadow.add_argument("--off", action="store_true", help="stop shadow scoring")
    shadow.add_argument("--reason", required=True)
    shadow.set_defaults(handler=_handle_shadow)

    deployment = actions.add_parser("deployment", parents=[root], help="groups, shadow, and what given agents run")
    deployment.add_argument("name")
    deployment.add_argument("--agents", default="", help="agent ids (tester = agent id) to show the assignment of")
    deployment.set_defaults(handler=lambda a: _print(_deployment_text(read_deployment(Registry(a.registry), a.name),
                                                                      a.agents, Registry(a.registry))))

    gate = actions.add_parser("gate", parents=[root, gate_options],
                              help="judge a canary or shadow version by the collector's evidence (exit 1: failed)")
    gate.add_argument("name")
    gate.add_argument("version")
    gate.set_defaults(handler=_handle_gate)

    verify = actions.add_parser("verify", parents=[root, trusted],
                                help="check the signature, checksums, manifest schema and fidelity")
    verify.add_argument("name", nargs="?", help="default: every model")
    verify.add_argument("version", nargs="?", help="default: every version")
    verify.set_defaults(handler=_handle_verify)

    sign = actions.add_parser("sign", parents=[root], help="sign a published package (unsigned, or with a new key "
                                                           "in a rotation); recorded in the history")
    sign.add_argument("name")
    sign.add_argument("version")
    sign.add_argument("--signing-key", default=DEFAULT_SIGNING_KEY,
                      help=f"the trainer's Ed25519 secret key (default: {DEFAULT_SIGNING_KEY})")
    sign.add_argument("--reason", required=True)
    sign.set_defaults(handler=lambda a: _print(cli_sign(Registry(a.registry), a.name, a.version,
                                                        load_signing_key(a.signing_key), a.reason)))

    gc = actions.add_parser("gc", parents=[root], help="remove packages half-written by crashed writers")
    gc.add_argument("--older-than", type=float, default=STALE_STAGING_S, metavar="SECONDS")
    gc.set_defaults(handler=lambda a: _print(cli_gc(Registry(a.registry), a.older_than)))


def _agents(text: str) -> tuple[str, ...]:
    return tuple(agent.strip() for agent in text.split(",") if agent.strip())


def _thresholds(args) -> Thresholds:
    return Thresholds(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Thresholds)})


def _handle_shadow(args) -> int:
    if args.off == (args.version is not None):
        raise RegistryError("shadow: give a VERSION to score in shadow, or --off to stop")
    deployment = set_shadow(Registry(args.registry, _trust(args, required=not args.off)), args.name, args.version,
                            args.reason,
                            agents=_agents(args.agents), percent=args.percent, signer=_signer(args))
    return _print(_deployment_text(deployment, args.agents))


def _handle_gate(args) -> int:
    passed, lines = fleet_gate(args.fleet_db, args.name, args.version, _thresholds(args))
    print("\n".join(lines))
    return 0 if passed else 1


def fleet_gate(fleet_db: str | None, name: str, version: str, thresholds: Thresholds) -> tuple[bool, list[str]]:
    """(passed, report) of ``name``/``version`` against the collector database ``fleet_db``."""
    if not fleet_db:
        raise RegistryError("the fleet gate needs the collector's database: --fleet-db stats.sqlite")
    if not Path(fleet_db).exists():
        raise RegistryError(f"--fleet-db {fleet_db}: no such database")
    db = sqlite3.connect(f"file:{fleet_db}?mode=ro", uri=True)
    try:
        return judge(db, name, str(version), thresholds)
    finally:
        db.close()


def _deployment_text(deployment, agents: str = "", registry: Registry | None = None) -> str:
    lines = [f"deployment of {deployment.name}"]
    for group, entry in deployment.groups.items():
        who = ", ".join(entry["agents"]) + (f" + {entry['percent']:g} % of the fleet" if entry["percent"] else "")
        previous = f" (previous v{entry['previous']})" if entry.get("previous") else ""
        lines.append(f"  {group:<12} v{entry['version']}{previous}: {who}")
    lines.append(f"  {PRODUCTION:<12} the production stage: every other agent")
    if deployment.shadow:
        entry = deployment.shadow
        who = ", ".join(entry["agents"]) + (f" + {entry['percent']:g} % of the fleet" if entry["percent"] else "")
        lines.append(f"  {SHADOW:<12} v{entry['version']} scored beside the champion: {who}")
    if registry is not None and agents:
        production = [v for v, s in registry.stages(deployment.name).items() if s == PRODUCTION]
        for agent in _agents(agents):
            given: Assignment = deployment.assign(agent, agent, max(production, key=int) if production else None)
            challenger = f", challenger v{given.challenger.version}" if given.challenger else ""
            lines.append(f"  agent {agent}: {given.group}, champion v{given.champion.version}{challenger}")
    return "\n".join(lines)


def _print(text: str) -> int:
    print(text)
    return 0


def _handle_verify(args) -> int:
    ok, text = cli_verify(Registry(args.registry, _trust(args)), args.name, args.version)
    print(text)
    return 0 if ok else 1


def _trust(args, *, required: bool = True) -> Trust | None:
    """The keys of ``--trusted-keys`` (development mode with ``--allow-unsigned``); None when not ``required`` and
    there are none."""
    if not Path(args.trusted_keys).exists() and (args.allow_unsigned or not required):
        return Trust(allow_unsigned=True) if args.allow_unsigned else None
    return Trust(load_trusted_keys(args.trusted_keys), args.trusted_keys, args.allow_unsigned)


def _signer(args) -> SigningKey | None:
    """``--signing-key``, else the default key if there is one, else None (the line records the user only)."""
    if args.signing_key is None and not Path(DEFAULT_SIGNING_KEY).exists():
        return None
    return load_signing_key(args.signing_key or DEFAULT_SIGNING_KEY)


def cli_list(registry: Registry, name: str | None = None) -> str:
    names = [name] if name is not None else registry.models()
    if name is not None and not registry.versions(name):
        raise RegistryError(f"model {name!r}: {registry._what_exists(name)}")
    if not names:
        return f"no models in {registry.root}"
    lines = []
    for model in names:
        stages = registry.stages(model)
        lines += [model, f"  {'version':>7}  {'stage':<10}  {'created':<25}  {'checksum':<12}  size"]
        for ref in registry.versions(model):
            folder = registry.package_dir(ref)
            try:
                manifest, _ = read_manifest((folder / MANIFEST_FILE).read_bytes())
                checksum = registry.checksum(ref)[:12]
            except (OSError, RegistryError):
                manifest = None
            if manifest is None:
                created, checksum = "unreadable manifest", "-"
            else:
                created = manifest.created_at
            size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            lines.append(f"  {ref.version:>7}  {stages[ref.version]:<10}  {_fmt(created):<25}  {checksum:<12}  "
                         f"{_size(size)}")
    return "\n".join(lines)


def cli_show(registry: Registry, name: str, which: str = "production") -> str:
    ref = (registry.resolve(name, version=which) if VERSION_PATTERN.fullmatch(which)
           else registry.resolve(name, stage=which))
    return package_summary(registry, ref)


def package_summary(registry: Registry, ref: PackageRef) -> str:
    """What a person needs to decide about a package, from its manifest (what can be read of a malformed one)."""
    result = registry.verify(ref)
    lines = [
        f"package   {ref}  (stage {registry.stage_of(ref.name, ref.version)})",
        f"folder    {registry.package_dir(ref)}",
        f"checksum  {result.checksum}  (sha256 of {MANIFEST_FILE})",
        f"verified  {'ok' if result.ok else f'FAILED, {len(result.problems)} problem(s), first: {result.problems[0]}'}",
        f"signature {_signature_line(result.signature)}",
    ]
    if result.manifest is not None:
        lines += _manifest_summary(result.manifest)
    lines.append("files")
    lines += [f"  {file.name:<20} {_size(file.stat().st_size):>10}" for file in sorted(result.path.iterdir())]
    return "\n".join(lines)


def _signature_line(check) -> str:
    if check is None:
        return "not checked (no trusted keys given)"
    statement = check.statement or {}
    signed = f": key {statement['key_id']}, {statement['signed_by']}, {statement['signed_at']}" if statement else ""
    return f"{check.status}{'' if check.problems else ' (accepted)'}{signed}"


def _manifest_summary(manifest: Manifest) -> list[str]:
    """Lines about a manifest that may be partial (None where a value could not be read)."""
    lineage, columns = manifest.lineage, [str(column) for column in manifest.columns]
    metrics = {"outlier": manifest.metrics.outlier, "yield": manifest.metrics.yield_model}
    lines = [
        f"created   {_fmt(manifest.created_at)}",
        f"rows      {_fmt(lineage.rows)} (train {_fmt(lineage.train_rows)}, held out "
        f"{_fmt(lineage.holdout_rows)}), data sha256 {str(lineage.data_sha256)[:12]}",
        f"features  {len(columns)}: {', '.join(columns[:8])}{', ...' if len(columns) > 8 else ''}",
    ]
    for name, model in manifest.models.named():
        detail = (f"target outlier rate {_fmt(model.target_outlier_rate)}" if name == "outlier"
                  else f"label {_fmt(model.label)}")
        lines.append(f"{name:<9} {_fmt(model.kind)}, threshold {_fmt(model.threshold)}, {detail}")
        if name == "yield":
            lines += _yield_lines(manifest)
        scalars = [f"{k} {_fmt(v)}" for k, v in metrics[name].items() if v is None or isinstance(v, (int, float))]
        if scalars:
            lines.append(f"  metrics       {', '.join(scalars)}")
        lines.append(f"  quantization  {_fmt(model.quantization.reason)}")
    lines.append("fidelity")
    for key, entry in manifest.fidelity.items():
        lines.append(f"  {key:<16} {entry.file}: {'passed' if entry.passed is True else 'FAILED'}, "
                     f"decisions agree {_fmt(entry.decision_agreement)} (min {_fmt(entry.min_agreement)}) "
                     f"over {_fmt(entry.rows)} rows, max abs diff {_fmt(entry.max_abs_diff)}")
    return lines


def _yield_lines(manifest: Manifest) -> list[str]:
    """The yield label's meaning, the held-out split and the gate (absent from packages written before them)."""
    model, held_out, lines = manifest.models.yield_model, manifest.held_out, []
    if model.label_source is not None:
        lines.append(f"  label         {model.label_source.source}: {model.label_source.meaning}")
        join = model.label_source.outcomes
        if join:
            lines.append(f"  outcomes      matched {join['matched']:,} of {join['training_parts']:,} training parts on "
                         f"{', '.join(join['join_on'])}; {join['training_without_outcome']:,} without outcome, "
                         f"{join['outcomes_without_part']:,} outcomes without part, {join['duplicate_outcomes']:,} "
                         "duplicates")
    if held_out is not None:
        lines.append(f"  held out      {held_out.split}: {held_out.reason}")
    if model.threshold_choice is not None:
        lines.append(f"  threshold     {model.threshold_choice.objective}: {model.threshold_choice.note}")
    if model.gate is not None:
        lines.append(f"  gate          {'passed' if model.gate.passed else 'NOT PASSED (promotion needs --force)'}: "
                     f"{model.gate.reason}")
    return lines


def cli_history(registry: Registry, name: str) -> str:
    events = registry.history(name)
    if not events:
        raise RegistryError(f"model {name!r} has no history; {registry._what_exists(name)}")
    return "\n".join(f"{e['time']}  {e['user']:<10}  v{e['version']:<5} {e['action']:<10} "
                     f"{e['from_stage'] or '-'} -> {e['to_stage']}: {e['reason']}"
                     + (f" [agents: {e['agents']}]" if e.get("agents") else "")
                     + (f" [FORCED past: {e['forced']}]" if e.get("forced") else "")
                     + (f" [{signed}]" if (signed := check_record(e, registry.trust)) else "") for e in events)


def cli_promote(registry: Registry, name: str, version: str, stage: str, reason: str, *, force: bool = False,
                signer: SigningKey | None = None, fleet_db: str | None = None,
                thresholds: Thresholds = Thresholds()) -> str:
    """A version that ran as a canary or in shadow goes to production only past the fleet gate (or forced)."""
    before = registry.stage_of(name, version)
    gate, report = None, []
    if stage == PRODUCTION and before != stage and _ran_in_fleet(registry, name, str(version)):
        if fleet_db is None and not force:
            raise RegistryError(f"{name}/{version} ran as a canary or in shadow: promoting it to production needs "
                                "the fleet gate (--fleet-db stats.sqlite), or --force with a reason")
        if fleet_db is not None:
            passed, report = fleet_gate(fleet_db, name, str(version), thresholds)
            gate = None if passed else failing_reason(report)
            if gate is not None and not force:
                raise RegistryError("\n".join(report) + f"\n{name}/{version} stays {before}: the fleet gate failed; "
                                    "to promote it anyway, force it with a reason (--force --reason '...'), which "
                                    "the history records")
    ref = registry.promote(name, version, stage, reason, force=force, signer=signer, gate=gate)
    if before == stage:
        return f"{ref} is already in {stage}; nothing changed"
    forced = [e["forced"] for e in registry.history(name)[-1:] if e.get("forced") and e["version"] == ref.version]
    note = f" (forced past the quality gate: {forced[0]})" if forced else ""
    return "\n".join([*report, f"{ref}: {before} -> {stage}{note}", _stage_line(registry, name)])


def _ran_in_fleet(registry: Registry, name: str, version: str) -> bool:
    return any(e.get("action") in ("deploy", "shadow") and e.get("version") == version for e in registry.history(name))


def cli_rollback_group(registry: Registry, name: str, group: str, reason: str, *,
                       signer: SigningKey | None = None) -> str:
    return _deployment_text(rollback_group(registry, name, group, reason, signer=signer))


def cli_rollback(registry: Registry, name: str, stage: str = "production", reason: str = "", *,
                 signer: SigningKey | None = None) -> str:
    ref = registry.rollback(name, stage, reason, signer=signer)
    return f"{ref} restored to {stage}\n" + _stage_line(registry, name)


def cli_sign(registry: Registry, name: str, version: str, signer: SigningKey, reason: str) -> str:
    statement = registry.sign(registry.resolve(name, version=version), signer, reason)
    return (f"{name}/{version} signed with key {statement['key_id']} (manifest sha256 "
            f"{statement['manifest_sha256']}); agents that trust this key accept it")


def cli_verify(registry: Registry, name: str | None = None, version: str | None = None) -> tuple[bool, str]:
    """(all ok, report) for one version, every version of a model, or every model."""
    if version is not None:
        refs = [registry.resolve(name, version=version)]
    elif name is not None:
        refs = registry.versions(name)
        if not refs:
            raise RegistryError(f"model {name!r}: {registry._what_exists(name)}")
    else:
        refs = [ref for model in registry.models() for ref in registry.versions(model)]
        if not refs:
            return True, f"no packages in {registry.root}"
    results = [(ref, registry.verify(ref)) for ref in refs]
    lines = [f"{ref}: ok ({_signature_line(result.signature)})" if result.ok
             else f"{ref}: FAILED\n" + "\n".join(f"  - {p}" for p in result.problems) for ref, result in results]
    failed = sum(not result.ok for _, result in results)
    lines.append(f"{len(results) - failed} of {len(results)} package(s) verified")
    return failed == 0, "\n".join(lines)


def cli_gc(registry: Registry, older_than_s: float = STALE_STAGING_S) -> str:
    removed = registry.gc(older_than_s=older_than_s)
    return "\n".join([f"removed {path}" for path in removed] + [f"{len(removed)} abandoned staging folder(s) removed"])


def _stage_line(registry: Registry, name: str) -> str:
    return "stages: " + ", ".join(f"{v} {s}" for v, s in registry.stages(name).items())


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def _size(n_bytes: int) -> str:
    if n_bytes < 1024:
        return f"{n_bytes} B"
    if n_bytes < 1 << 20:
        return f"{n_bytes / 1024:.1f} KiB"
    return f"{n_bytes / (1 << 20):.1f} MiB"
