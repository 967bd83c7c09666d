"""Model registry: publish, verify, stages, rollback, crash safety and concurrent writers.

Packages here are real ones that the trainer built and did not publish (tests/conftest.py, ``unpublished``),
so the schema and fidelity checks run on exactly what the trainer writes.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import RegistryError
from edge_agent.keys import KeyFileError
from edge_agent.package.manifest import (MANIFEST_FILE, MODEL_CARD_FILE, OUTLIER_FILE, SAMPLE_ROWS_FILE, YIELD_FILE,
                                         YIELD_INT8_FILE, Manifest, read_manifest)
from edge_agent.package.registry import PackageRef, Registry, verify_dir
from trainer.registry_cli import add_registry_commands, cli_list, cli_show, cli_verify

REPO = Path(__file__).resolve().parents[1]


def _fidelity(file: str, agreement: float = 1.0, passed: bool = True) -> dict:
    return {"file": file, "rows": 500, "max_abs_diff": 3e-7, "decision_agreement": agreement,
            "min_agreement": 0.999, "passed": passed}


def as_document(files: dict[str, bytes], manifest: Manifest) -> dict:
    """The manifest.json document of an unpublished package, as the registry would publish it as demo/1."""
    return replace(manifest, name="demo", version="1", files={n: _sha256(b) for n, b in files.items()}).to_document()


def as_published_by_the_trainer(document: dict) -> Manifest:
    """The typed manifest of a document, as the trainer hands it to publish: name, version and files are the
    registry's to fill."""
    manifest, problems = read_manifest(document)
    assert problems == []
    return replace(manifest, name="", version="", files={})


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry(tmp_path / "models")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _overwrite(path: Path, data: bytes) -> None:
    """Change a published (read-only) file the way a careless person or a disk fault would."""
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o644)
    path.write_bytes(data)


def _published_manifest(registry: Registry, ref: PackageRef) -> dict:
    return json.loads((registry.package_dir(ref) / MANIFEST_FILE).read_bytes())


# ---- schema ---------------------------------------------------------------------------------------------------

def test_fixture_manifest_reads_without_problems_and_writes_back_the_same_document(unpublished):
    document = as_document(*unpublished.package())
    manifest, problems = read_manifest(json.dumps(document).encode())
    assert problems == []
    assert manifest.columns == [f["column"] for f in document["features"]]
    assert manifest.models.yield_model.files == {"float32": YIELD_FILE, "int8": YIELD_INT8_FILE}
    assert manifest.to_document() == document
    assert read_manifest(manifest.to_json()) == (manifest, [])
    # A document as packages written before the optional fields were: they read as their defaults.
    older = copy.deepcopy(document)
    for limit in older["pat"]["limits"]:
        del limit["scale"]
    del older["drift_reference"]["rows"]
    older["lineage"]["sources"] = ["/data/lot1.stdf", {"path": "/data/lot2.parquet", "sha256": "ab", "bytes": 3}]
    manifest, problems = read_manifest(json.dumps(older).encode())
    assert problems == []
    assert manifest.lineage.sources[1].bytes == 3
    written = manifest.to_document()
    assert manifest.pat.limits[0].scale == written["pat"]["limits"][0]["scale"] == "linear"
    assert manifest.drift_reference.rows == written["drift_reference"].pop("rows") == 0
    for limit in written["pat"]["limits"]:
        del limit["scale"]
    assert written == older


def test_a_manifest_built_in_code_is_written_as_json_values_and_what_it_lacks_is_named(unpublished):
    files, manifest = unpublished.package()
    features = [*manifest.features]
    features[3] = replace(features[3], number=None)
    outlier = replace(manifest.models.outlier, threshold=np.float64(-0.031))
    manifest = replace(manifest, name="demo", version="1", files={n: _sha256(b) for n, b in files.items()},
                       features=features, models=replace(manifest.models, outlier=outlier))
    assert type(manifest.to_document()["models"]["outlier"]["threshold"]) is float   # numpy scalars from training
    assert json.loads(manifest.to_json())["models"]["outlier"]["threshold"] == -0.031
    assert manifest.to_document()["features"][3]["number"] is None, "a field that takes null is written as null"
    lacking = replace(manifest, pat=replace(manifest.pat, limits=None), validation={"seen": {1, 2}})
    assert read_manifest(lacking.to_document())[1] == ["manifest.validation.seen: a builtins.set is not a JSON value",
                                                       "manifest.pat.limits: missing"]


@pytest.mark.parametrize("change, expected", [
    (lambda m: m["pat"].pop("k_sigma"), "manifest.pat.k_sigma: missing"),
    (lambda m: m.pop("lineage"), "manifest.lineage: missing"),
    (lambda m: m["features"][3].update(low="0.1"), "manifest.features[3].low: expected number or null, got str"),
    (lambda m: m["features"][1].update(index=5), "manifest.features[1].index: expected 1"),
    (lambda m: m["input"].update(shape=[None, 3]), "manifest.input.shape[1]: expected {features}"),
    (lambda m: m["models"]["yield"].update(threshold=float("nan")), "manifest.models.yield.threshold: nan is not"),
    (lambda m: m["models"]["yield"].update(kind="svm"), "manifest.models.yield.kind: expected one of"),
    (lambda m: m["models"]["yield"]["files"].update(int8="missing.onnx"),
     "manifest.models.yield.files.int8: 'missing.onnx' is not listed in manifest.files"),
    (lambda m: m["models"]["yield"]["quantization"].update(int8=False), "manifest.models.yield.quantization.int8"),
    (lambda m: m["drift_reference"]["tests"][2].update(proportions=[0.5, 0.5]),
     "manifest.drift_reference.tests[2].proportions: expected {test_2_bins}"),
    (lambda m: m["pat"]["limits"][0].update(column="9:NOPE"), "manifest.pat.limits[0].column: '9:NOPE' is not"),
    (lambda m: m.update(created_at="2025-11-23T06:00:00+02:00"), "manifest.created_at: expected a UTC time"),
    (lambda m: m["files"].pop(MODEL_CARD_FILE), f"manifest.files: {MODEL_CARD_FILE} missing"),
    (lambda m: m["files"].update({"../escape.onnx": "0" * 64}), "manifest.files['../escape.onnx']: expected a plain"),
    (lambda m: m["fidelity"]["yield.int8"].pop("min_agreement"), "manifest.fidelity['yield.int8'].min_agreement"),
])
def test_schema_problems_name_the_json_path(unpublished, change, expected):
    document = as_document(*unpublished.package())
    expected = expected.format(features=len(document["features"]),
                               test_2_bins=len(document["drift_reference"]["tests"][2]["edges"]) + 1)
    change(document)
    _, problems = read_manifest(document)
    assert any(p.startswith(expected) for p in problems), problems


# ---- publish and verify ---------------------------------------------------------------------------------------

def test_publish_writes_a_package_that_verifies(registry, unpublished):
    files, manifest = unpublished.package()
    ref = registry.publish("demo", files, manifest, reason="first training")
    assert ref == PackageRef("demo", "1")
    folder = registry.package_dir(ref)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*files, MANIFEST_FILE])
    for name, data in files.items():
        assert (folder / name).read_bytes() == data
    published = _published_manifest(registry, ref)
    assert published["name"] == "demo" and published["version"] == "1"
    assert published["files"] == {name: _sha256(data) for name, data in files.items()}
    assert manifest.version == "" and manifest.files == {}, "the caller's manifest is left alone"
    assert registry.checksum(ref) == _sha256((folder / MANIFEST_FILE).read_bytes())
    result = registry.verify(ref)
    assert result.ok, result.problems
    assert result.checksum == registry.checksum(ref)
    assert result.manifest.to_document() == published
    assert registry.manifest(ref) == result.manifest
    assert registry.stage_of("demo", 1) == "candidate"
    assert registry.models() == ["demo"]
    assert registry.resolve("demo", stage="candidate") == ref
    [event] = registry.history("demo")
    assert (event["action"], event["version"], event["from_stage"], event["to_stage"], event["reason"]) == \
        ("publish", "1", None, "candidate", "first training")


def test_publish_accepts_file_paths(registry, tmp_path, unpublished):
    files, manifest = unpublished.package(int8=False)
    source = tmp_path / "export"
    source.mkdir()
    for name, data in files.items():
        (source / name).write_bytes(data)
    ref = registry.publish("demo", {name: source / name for name in files}, manifest)
    assert registry.verify(ref).ok
    assert (registry.package_dir(ref) / OUTLIER_FILE).read_bytes() == files[OUTLIER_FILE]


def test_a_tampered_byte_is_named_with_both_checksums(registry, unpublished):
    files, manifest = unpublished.package()
    ref = registry.publish("demo", files, manifest)
    target = registry.package_dir(ref) / YIELD_FILE
    tampered = bytearray(files[YIELD_FILE])
    tampered[5] ^= 0x01
    _overwrite(target, bytes(tampered))
    result = registry.verify(ref)
    assert not result.ok
    assert result.problems == [f"{YIELD_FILE}: checksum mismatch, expected sha256 {_sha256(files[YIELD_FILE])}, "
                               f"got {_sha256(bytes(tampered))}"]


def test_missing_and_unlisted_files_are_named(registry, unpublished):
    files, manifest = unpublished.package()
    ref = registry.publish("demo", files, manifest)
    folder = registry.package_dir(ref)
    os.chmod(folder, 0o755)
    (folder / MODEL_CARD_FILE).unlink()
    (folder / "notes.txt").write_text("added later")
    problems = registry.verify(ref).problems
    assert f"{MODEL_CARD_FILE}: missing (listed in manifest.files)" in problems
    assert "notes.txt: file in the package but not listed in manifest.files" in problems


def test_an_edited_manifest_fails_on_schema_and_changes_the_checksum(registry, unpublished):
    files, manifest = unpublished.package()
    ref = registry.publish("demo", files, manifest)
    before = registry.checksum(ref)
    edited = _published_manifest(registry, ref)
    del edited["drift_reference"]["outlier_score"]
    edited["version"] = "7"
    _overwrite(registry.package_dir(ref) / MANIFEST_FILE, json.dumps(edited).encode())
    problems = registry.verify(ref).problems
    assert "manifest.drift_reference.outlier_score: missing" in problems
    assert any("manifest.version is '7'" in p and "demo/1" in p for p in problems)
    assert registry.checksum(ref) != before
    with pytest.raises(RegistryError, match=r"cannot read the manifest \(manifest.drift_reference.outlier_score: "
                                            r"missing\); run `edge-train registry verify demo 1`"):
        registry.manifest(ref)


def test_publish_refuses_an_invalid_manifest_and_leaves_nothing(registry, unpublished):
    files, manifest = unpublished.package()
    with pytest.raises(RegistryError, match=r"manifest.pat.limits: missing"):
        registry.publish("demo", files, replace(manifest, pat=replace(manifest.pat, limits=None)))
    assert registry.versions("demo") == []
    assert not (registry.root / "demo").exists(), "refused before anything was written"


def test_failed_fidelity_refuses_publish_and_fails_verification(registry, tmp_path, unpublished):
    files, manifest = unpublished.package()
    document = as_document(files, manifest)
    document["fidelity"]["yield.int8"].update(passed=False, decision_agreement=0.97)
    with pytest.raises(RegistryError, match=rf"{YIELD_INT8_FILE}: fidelity.yield.int8.passed is False"):
        registry.publish("demo", files, as_published_by_the_trainer(document))
    assert registry.versions("demo") == []

    # A package written by hand (not through publish) is caught by verification.
    folder = tmp_path / "handmade"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / MANIFEST_FILE).write_text(json.dumps(document))
    problems = verify_dir(folder).problems
    assert f"{YIELD_INT8_FILE}: fidelity.yield.int8.passed is False, expected true" in problems
    assert f"{YIELD_INT8_FILE}: fidelity.yield.int8.decision_agreement 0.97 is below min_agreement 0.999" in problems
    assert len(problems) == 2, problems


def test_fidelity_gate_covers_every_shipped_graph_and_only_shipped_files(registry, unpublished):
    files, manifest = unpublished.package(int8=False)
    document = as_document(files, manifest)
    # The int8 variant was refused and not shipped: its failed check does not block the package.
    document["fidelity"]["yield.int8"] = _fidelity(YIELD_INT8_FILE, 0.95, passed=False)
    ref = registry.publish("demo", files, as_published_by_the_trainer(document))
    assert registry.verify(ref).ok

    del document["fidelity"]["outlier.float32"]
    with pytest.raises(RegistryError, match=rf"{OUTLIER_FILE}: no fidelity entry 'fidelity.outlier.float32'"):
        registry.publish("demo", files, as_published_by_the_trainer(document))

    files, manifest = unpublished.package()
    document = as_document(files, manifest)
    document["fidelity"]["yield.float32"]["decision_agreement"] = 0.998   # passed stays True: a lying entry
    with pytest.raises(RegistryError, match=r"decision_agreement 0.998 is below min_agreement 0.999"):
        registry.publish("demo", files, as_published_by_the_trainer(document))


def test_versions_are_immutable_and_numbered(registry, unpublished):
    files, manifest = unpublished.package()
    first = registry.publish("demo", files, manifest)
    folder = registry.package_dir(first)
    snapshot = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    for path in [folder, *folder.iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o222 == 0, f"{path} is writable"

    files[MODEL_CARD_FILE] = b"# Model card: demo, retrained\n"
    second = registry.publish("demo", files, manifest)
    assert second.version == "2"
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()} == snapshot
    assert [r.version for r in registry.versions("demo")] == ["1", "2"]
    assert registry.verify(first).ok and registry.verify(second).ok
    assert registry.checksum(first) != registry.checksum(second)


def test_version_numbers_taken_behind_the_lock_are_skipped(registry, monkeypatch, unpublished):
    """Writers that ignore the lock took the numbers this publish allocated: the next free number is used."""
    files, manifest = unpublished.package()
    first = registry.publish("demo", files, manifest)
    before = {p.name: p.read_bytes() for p in registry.package_dir(first).iterdir()}
    (registry.root / "demo" / "2").mkdir()   # another writer's folder, still empty: rename(2) would replace it
    monkeypatch.setattr(Registry, "_next_version", lambda self, name: "1")
    third = registry.publish("demo", files, manifest)
    assert third.version == "3"
    assert {p.name: p.read_bytes() for p in registry.package_dir(first).iterdir()} == before
    assert list((registry.root / "demo" / "2").iterdir()) == []
    assert _published_manifest(registry, third)["version"] == "3"
    assert registry.verify(first).ok and registry.verify(third).ok


def test_numbers_of_deleted_versions_are_not_reused(registry, unpublished):
    files, manifest = unpublished.package()
    ref = registry.publish("demo", files, manifest)
    folder = registry.package_dir(ref)
    for path in [folder, *folder.iterdir()]:
        os.chmod(path, 0o755)
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    assert registry.publish("demo", files, manifest).version == "2"


# ---- stages, history, rollback ----------------------------------------------------------------------------------

def _publish_versions(registry: Registry, unpublished, count: int, signer=None) -> list[PackageRef]:
    files, manifest = unpublished.package()
    return [registry.publish("demo", files, manifest, signer=signer) for _ in range(count)]


def test_promotion_path_and_history(registry, unpublished):
    v1, v2 = _publish_versions(registry, unpublished, 2)
    start = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)   # history times are in milliseconds
    registry.promote("demo", "1", "staging", reason="passed offline review")
    registry.promote("demo", "1", "production", reason="shadow run on tester T7 ok")
    assert registry.stages("demo") == {"1": "production", "2": "candidate"}
    registry.promote("demo", "2", "staging", reason="retrained on lot 12")
    registry.promote("demo", "2", "production", reason="better ROC AUC")
    assert registry.stages("demo") == {"1": "archived", "2": "production"}
    assert registry.resolve("demo") == v2
    assert registry.resolve("demo", "archived") == v1
    end = dt.datetime.now(dt.timezone.utc)

    changes = [(e["action"], e["version"], e["from_stage"], e["to_stage"], e["reason"])
               for e in registry.history("demo")[2:]]
    assert changes == [
        ("promote", "1", "candidate", "staging", "passed offline review"),
        ("promote", "1", "staging", "production", "shadow run on tester T7 ok"),
        ("promote", "2", "candidate", "staging", "retrained on lot 12"),
        ("superseded", "1", "production", "archived", "version 2 promoted to production: better ROC AUC"),
        ("promote", "2", "staging", "production", "better ROC AUC"),
    ]
    for event in registry.history("demo")[2:]:
        when = dt.datetime.fromisoformat(event["time"])
        assert when.utcoffset() == dt.timedelta(0) and start <= when <= end
        assert event["user"]


def test_a_new_staging_version_sends_the_previous_one_back_to_candidate(registry, unpublished):
    _publish_versions(registry, unpublished, 2)
    registry.promote("demo", 1, "staging", reason="review")
    registry.promote("demo", 2, "staging", reason="newer")
    assert registry.stages("demo") == {"1": "candidate", "2": "staging"}


def test_promoting_to_the_current_stage_records_nothing(registry, unpublished):
    _publish_versions(registry, unpublished, 1)
    registry.promote("demo", 1, "production", reason="go")
    events = len(registry.history("demo"))
    registry.promote("demo", 1, "production", reason="again")
    assert len(registry.history("demo")) == events


def test_production_requires_a_package_that_verifies(registry, unpublished):
    v1, v2 = _publish_versions(registry, unpublished, 2)
    registry.promote("demo", 1, "production", reason="first")
    _overwrite(registry.package_dir(v2) / OUTLIER_FILE, b"corrupted")
    with pytest.raises(RegistryError, match=rf"demo/2 does not verify(.|\n)*{OUTLIER_FILE}: checksum mismatch"):
        registry.promote("demo", 2, "production", reason="should be refused")
    assert registry.stages("demo") == {"1": "production", "2": "candidate"}
    registry.promote("demo", 2, "staging", reason="staging needs no verification")


def test_rollback_walks_back_through_production_holders(registry, unpublished):
    _publish_versions(registry, unpublished, 3)
    for version in ("1", "2", "3"):
        registry.promote("demo", version, "production", reason=f"release {version}")
    assert registry.rollback("demo", reason="v3 flags too many parts").version == "2"
    assert registry.stages("demo") == {"1": "archived", "2": "production", "3": "archived"}
    assert registry.rollback("demo", reason="v2 drifts on site 3").version == "1"
    assert registry.stages("demo") == {"1": "production", "2": "archived", "3": "archived"}
    with pytest.raises(RegistryError, match=r"nothing to roll back to.*'demo'.*production.*before version 1"):
        registry.rollback("demo", reason="no more")
    last_two = [(e["action"], e["version"], e["from_stage"], e["to_stage"], e["reason"])
                for e in registry.history("demo")[-2:]]
    assert last_two == [("rollback", "2", "production", "archived", "v2 drifts on site 3"),
                        ("rollback", "1", "archived", "production", "v2 drifts on site 3")]


def test_rollback_after_a_re_promotion_restores_the_version_it_replaced(registry, unpublished):
    _publish_versions(registry, unpublished, 2)
    registry.promote("demo", 1, "production", reason="a")
    registry.promote("demo", 2, "production", reason="b")
    registry.rollback("demo", reason="b was bad")
    registry.promote("demo", 2, "production", reason="b fixed upstream")
    assert registry.rollback("demo", reason="still bad").version == "1"


def test_rollback_with_nothing_before_is_an_error(registry, unpublished):
    _publish_versions(registry, unpublished, 2)
    with pytest.raises(RegistryError, match=r"no version in production to roll back"):
        registry.rollback("demo", reason="nothing there")
    registry.promote("demo", 1, "production", reason="only one")
    with pytest.raises(RegistryError, match=r"nothing to roll back to"):
        registry.rollback("demo", reason="no predecessor")
    assert registry.stages("demo") == {"1": "production", "2": "candidate"}
    with pytest.raises(RegistryError, match=r"a reason is required"):
        registry.promote("demo", 2, "production", reason=" ")


def test_resolve_errors_say_what_exists(registry, unpublished):
    with pytest.raises(RegistryError, match=r"does not exist"):
        registry.resolve("demo")
    _publish_versions(registry, unpublished, 2)
    registry.promote("demo", 2, "staging", reason="r")
    with pytest.raises(RegistryError, match=r"model 'demo' has no version in production; "
                                            r"versions: 1 \(candidate\), 2 \(staging\)"):
        registry.resolve("demo")
    with pytest.raises(RegistryError, match=r"model 'other' has no version in production; .*models there: demo"):
        registry.resolve("other")
    with pytest.raises(RegistryError, match=r"model 'demo' has no version 9"):
        registry.resolve("demo", version=9)
    with pytest.raises(RegistryError, match=r"unknown stage 'prod'"):
        registry.resolve("demo", "prod")
    with pytest.raises(RegistryError, match=r"invalid model name '../x'"):
        registry.versions("../x")


# ---- crashes and concurrent writers ---------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import edge_agent.package.registry as registry_module
    from edge_agent.package.manifest import read_manifest

    root, source, mode, count = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    manifest, problems = read_manifest((source / "manifest-in.json").read_bytes())
    assert problems == [], problems
    files = {p.name: p for p in sorted(source.iterdir()) if p.name != "manifest-in.json"}
    real_write, written = registry_module._write_file, []

    def write_then_wait(path, data):
        digest = real_write(path, data)
        written.append(path.name)
        if len(written) == count:
            print("wrote", " ".join(written), flush=True)
            sys.stdin.readline()   # the test kills this process here
        return digest

    if mode == "kill_after_files":
        registry_module._write_file = write_then_wait
    elif mode == "exit_before_rename":
        registry_module.rename_no_replace = lambda source, target: os._exit(1)
    elif mode == "publish_on_go":
        print("ready", flush=True)
        sys.stdin.readline()
    registry = registry_module.Registry(root)
    for _ in range(count if mode == "publish_on_go" else 1):
        print("published", registry.publish("demo", files, manifest, reason=f"pid {os.getpid()}").version,
              flush=True)
""")


def _writer(tmp_path: Path, registry: Registry, unpublished, mode: str, count: int) -> subprocess.Popen:
    source = tmp_path / "source"
    if not source.exists():
        source.mkdir()
        files, manifest = unpublished.package()
        for name, data in files.items():
            (source / name).write_bytes(data)
        (source / "manifest-in.json").write_text(json.dumps(as_document(files, manifest)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(registry.root), str(source), mode, str(count)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _staging_dirs(registry: Registry) -> list[Path]:
    return sorted((registry.root / "demo").glob(".staging-*"))


def _assert_nothing_loadable(registry: Registry) -> None:
    assert registry.versions("demo") == []
    assert registry.models() == []
    with pytest.raises(RegistryError):
        registry.resolve("demo", "candidate")
    assert cli_verify(registry) == (True, f"no packages in {registry.root}")


def test_writer_killed_mid_publish_leaves_nothing_loadable(registry, tmp_path, unpublished):
    writer = _writer(tmp_path, registry, unpublished, "kill_after_files", 2)
    assert writer.stdout.readline().split()[0] == "wrote"   # the writer now blocks after two files
    [staging] = _staging_dirs(registry)
    assert len(list(staging.iterdir())) == 2, "the crash must hit a half-written package"
    assert registry.gc(older_than_s=0) == [], "gc must not touch the staging folder of a live writer"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert writer.returncode == -signal.SIGKILL
    _assert_nothing_loadable(registry)

    files, manifest = unpublished.package()
    ref = registry.publish("demo", files, manifest, reason="after the crash")
    assert ref.version == "1"
    assert registry.verify(ref).ok
    assert registry.gc(older_than_s=3600) == [], "a young leftover is kept by the default age rule"
    assert registry.gc(older_than_s=0) == [staging]
    assert _staging_dirs(registry) == []
    assert [e["action"] for e in registry.history("demo")] == ["publish"]


def test_writer_dying_just_before_the_rename_leaves_nothing_loadable(registry, tmp_path, unpublished):
    writer = _writer(tmp_path, registry, unpublished, "exit_before_rename", 1)
    _, stderr = writer.communicate()
    assert writer.returncode == 1, stderr
    [staging] = _staging_dirs(registry)
    assert verify_dir(staging).ok, "the whole package was written, only the rename was missing"
    _assert_nothing_loadable(registry)
    assert registry.history("demo") == []

    files, manifest = unpublished.package()
    assert registry.publish("demo", files, manifest).version == "1"
    assert registry.gc(older_than_s=0) == [staging]


def test_concurrent_writers_get_distinct_versions(registry, tmp_path, unpublished):
    writers = [_writer(tmp_path, registry, unpublished, "publish_on_go", 3) for _ in range(2)]
    for writer in writers:
        assert writer.stdout.readline().strip() == "ready"
    for writer in writers:
        writer.stdin.write("go\n")
        writer.stdin.flush()
    published = []
    for writer in writers:
        stdout, stderr = writer.communicate()
        assert writer.returncode == 0, stderr
        published += [line.split()[1] for line in stdout.splitlines() if line.startswith("published")]
    assert sorted(published, key=int) == ["1", "2", "3", "4", "5", "6"]
    assert all(registry.verify(ref).ok for ref in registry.versions("demo"))
    events = registry.history("demo")
    assert sorted((e["version"] for e in events), key=int) == ["1", "2", "3", "4", "5", "6"]
    assert {e["reason"] for e in events} == {f"pid {w.pid}" for w in writers}
    assert registry.stages("demo") == {str(v): "candidate" for v in range(1, 7)}
    assert _staging_dirs(registry) == []


def test_a_torn_history_line_is_ignored_and_repaired(registry, unpublished):
    _publish_versions(registry, unpublished, 1)
    history = registry.root / "demo" / "history.jsonl"
    with open(history, "ab") as log:
        log.write(b'{"time": "2025-11-23T06:00:00')   # an append cut short by a crash
    assert len(registry.history("demo")) == 1
    registry.promote("demo", 1, "staging", reason="after the torn write")
    assert [e["action"] for e in registry.history("demo")] == ["publish", "promote"]
    assert all(json.loads(line) for line in history.read_text().splitlines())


# ---- command line ---------------------------------------------------------------------------------------------

def _run(root: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="edge-train")
    add_registry_commands(parser.add_subparsers(dest="command", required=True), str(root))
    args = parser.parse_args(list(argv))
    return args.handler(args)


def test_cli_commands(registry, capsys, unpublished, keys):
    v1, v2 = _publish_versions(registry, unpublished, 2, signer=keys.signer)
    trusted = ("--trusted-keys", str(keys.trusted))
    root = registry.root
    assert _run(root, "registry", "promote", "demo", "1", "production", "--reason", "first release") == 0
    assert "demo/1: candidate -> production" in capsys.readouterr().out

    assert _run(root, "registry", "list") == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0] == "demo"
    manifest = registry.manifest(v1)
    assert listing[2].split()[:4] == ["1", "production", manifest.created_at, registry.checksum(v1)[:12]]
    assert listing[3].split()[:2] == ["2", "candidate"]

    summary = cli_show(registry, "demo")
    lineage, columns = manifest.lineage, manifest.columns
    outlier, int8 = manifest.models.outlier, manifest.fidelity["yield.int8"]
    for expected in ("package   demo/1  (stage production)", f"checksum  {registry.checksum(v1)}", "verified  ok",
                     f"rows      {lineage.rows} (train {lineage.train_rows}, held out {lineage.holdout_rows})",
                     f"features  {len(columns)}: {columns[0]}, {columns[1]}",
                     f"outlier   isolation_forest, threshold {outlier.threshold:.4g}",
                     f"roc_auc {manifest.metrics.yield_model['roc_auc']:.4g}",
                     f"yield.int8       {YIELD_INT8_FILE}: passed, decisions agree {int8.decision_agreement:.4g} "
                     f"(min 0.999)", outlier.quantization.reason, SAMPLE_ROWS_FILE):
        assert expected in summary, expected
    assert cli_show(registry, "demo", "2").startswith("package   demo/2  (stage candidate)")

    _overwrite(registry.package_dir(v2) / SAMPLE_ROWS_FILE, b"not an npz")
    assert _run(root, "registry", "verify", "demo", *trusted) == 1
    report = capsys.readouterr().out
    assert "demo/1: ok" in report and "demo/2: FAILED" in report and f"{SAMPLE_ROWS_FILE}: checksum mismatch" in report
    assert "1 of 2 package(s) verified" in report
    assert _run(root, "registry", "verify", "demo", "1", *trusted) == 0
    with pytest.raises(KeyFileError, match="no such file or folder of trusted public signing keys"):
        _run(root, "registry", "verify", "demo", "1", "--trusted-keys", str(root / "no-keys"))

    assert _run(root, "registry", "history", "demo") == 0
    assert "first release" in capsys.readouterr().out
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        _run(root, "registry", "rollback", "demo", "--reason", "x")
    with pytest.raises(SystemExit):
        _run(root, "registry", "promote", "demo", "2", "production")   # --reason is required
    with pytest.raises(RegistryError, match=r"model 'other': no such model .*models there: demo"):
        cli_list(registry, "other")


def test_summary_and_listing_of_a_malformed_manifest_show_what_can_be_read(registry, unpublished):
    [ref] = _publish_versions(registry, unpublished, 1)
    manifest = registry.manifest(ref)
    columns, outlier = manifest.columns, manifest.models.outlier
    edited = _published_manifest(registry, ref)
    edited["lineage"] = "lost"
    edited["features"][1] = 7
    del edited["models"]["yield"]
    _overwrite(registry.package_dir(ref) / MANIFEST_FILE, json.dumps(edited).encode())
    summary = cli_show(registry, "demo", "1")
    # Problems: lineage, features[1], the index of each later feature, input.shape, models.yield, and the PAT
    # limit and drift bins of the lost feature's column.
    problems = 2 + (len(columns) - 2) + 4
    for expected in (f"verified  FAILED, {problems} problem(s), first: manifest.lineage: expected object, got str",
                     f"created   {manifest.created_at}", "rows      n/a (train n/a, held out n/a)",
                     f"features  {len(columns) - 1}: {columns[0]}, {columns[2]}, {columns[3]}",
                     f"outlier   isolation_forest, threshold {outlier.threshold:.4g}",
                     "yield     n/a, threshold n/a, label n/a",
                     f"roc_auc {manifest.metrics.yield_model['roc_auc']:.4g}", SAMPLE_ROWS_FILE):
        assert expected in summary, expected
    assert cli_list(registry).splitlines()[2].split()[:3] == ["1", "candidate", manifest.created_at]

    _overwrite(registry.package_dir(ref) / MANIFEST_FILE, b"{not json")
    summary = cli_show(registry, "demo", "1")
    assert f"first: {MANIFEST_FILE}: not valid JSON" in summary and SAMPLE_ROWS_FILE in summary
    assert "unreadable manifest" in cli_list(registry)
