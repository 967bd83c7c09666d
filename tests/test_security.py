"""Security with real processes and real keys: signed packages, CURVE sockets, authorized control, the bind guard.

Keys come from the product's own key files (tests/conftest.py, ``keys``): the test trainer's signing key, which the
agents trust, another signing key nobody trusts, and CURVE pairs. Tampered packages are made the way the issue
found them: a manifest edited after signing, a modified graph with its sample rows re-scored and every file
re-hashed, an unsigned package, and one signed by an untrusted key. The collector's side (forged agent ids) is in
tests/test_collector.py.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import stat
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge_agent.daemon import cli as agent_cli
from edge_agent.client import TIMEOUT, AgentClient, AgentUnavailable
from edge_agent.collector import cli as collector_cli
from edge_agent.daemon.config import ConfigError, load_config
from edge_agent.keys import KeyFileError, load_curve_pair, load_signing_key
from edge_agent.package.manifest import MANIFEST_FILE, OUTLIER_FILE, SAMPLE_ROWS_FILE, SIGNATURE_FILE
from edge_agent.package.registry import PackageRef, Registry
from edge_agent.processes import free_tcp_endpoint, start_agent, stop
from edge_agent.wire.links import listen_problems
from edge_agent.wire.score import Code
from trainer.cli import main as edge_train
from test_agent import REPLY_S, control_client, security_table, wait_for

NO_ANSWER_MS = 2_000   # a refused CURVE client never gets a reply; waiting longer proves nothing more


# ---- tampered packages, made as an attacker with write access to the registry would --------------------------------

def _writable(folder: Path) -> None:
    os.chmod(folder, 0o755)
    for file in folder.iterdir():
        os.chmod(file, 0o644)


def _republish(registry: Registry, model: str, version: str, signer) -> PackageRef:
    """A copy of ``version`` published as a new version, signed by ``signer`` (None: unsigned)."""
    source = registry.package_dir(PackageRef(model, version))
    files = {p.name: p.read_bytes() for p in source.iterdir() if p.name not in (MANIFEST_FILE, SIGNATURE_FILE)}
    return registry.publish(model, files, registry.manifest(PackageRef(model, version)),
                            reason="test: a copy to tamper with", signer=signer)


def _edit_manifest(folder: Path, change) -> None:
    document = json.loads((folder / MANIFEST_FILE).read_bytes())
    change(document)
    (folder / MANIFEST_FILE).write_text(json.dumps(document, indent=2))


def _threshold_edited(registry: Registry, model: str, keys) -> PackageRef:
    """Signed, then one digit of the outlier threshold changed: outliers it should flag would pass."""
    ref = _republish(registry, model, "2", keys.signer)
    folder = registry.package_dir(ref)
    _writable(folder)

    def lower(document):
        document["models"]["outlier"]["threshold"] -= 0.5
    _edit_manifest(folder, lower)
    return ref


def _graph_replaced(registry: Registry, model: str, keys, graph: bytes) -> PackageRef:
    """Signed, then another outlier graph put in, the sample rows re-scored with it and every file re-hashed: the
    package is consistent again, only the signature can tell."""
    ref = _republish(registry, model, "2", keys.signer)
    folder = registry.package_dir(ref)
    _writable(folder)
    (folder / OUTLIER_FILE).write_bytes(graph)
    with np.load(folder / SAMPLE_ROWS_FILE) as sample:
        arrays = dict(sample)
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    arrays["score"] = session.run(["score"], {"readings": arrays["readings"]})[0].reshape(-1).astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    (folder / SAMPLE_ROWS_FILE).write_bytes(buffer.getvalue())

    def rehash(document):
        for name in (OUTLIER_FILE, SAMPLE_ROWS_FILE):
            document["files"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    _edit_manifest(folder, rehash)
    return ref


@pytest.fixture(scope="module")
def tampered(packages, tmp_path_factory):
    """A registry copy: m/1 production, m/2 candidate (both signed and trusted), then the four bad versions."""
    root = packages.copy(tmp_path_factory.mktemp("tampered") / "models")
    registry, keys, model = Registry(root), packages.keys, packages.model
    graph = (registry.package_dir(PackageRef(model, "1")) / OUTLIER_FILE).read_bytes()
    bad = {
        "threshold edited after signing": (_threshold_edited(registry, model, keys),
                                           "manifest.json changed after signing"),
        "graph replaced, rows re-scored, files re-hashed": (_graph_replaced(registry, model, keys, graph),
                                                            "manifest.json changed after signing"),
        "unsigned": (_republish(registry, model, "2", None), f"{SIGNATURE_FILE}: missing: the package is unsigned"),
        "signed by an untrusted key": (_republish(registry, model, "2", keys.untrusted),
                                       f"signed by key {keys.untrusted.key_id}"),
    }
    return root, bad


def test_each_tampered_package_passes_the_checksums_alone_but_registry_verify_refuses_it_naming_why(
        tampered, packages, capsys):
    root, bad = tampered
    for what, (ref, why) in bad.items():
        assert Registry(root).verify(ref).ok, f"{what}: consistent without the signature check"
        status = edge_train(["registry", "verify", ref.name, ref.version, "--registry", str(root),
                             "--trusted-keys", str(packages.keys.trusted)])
        report = capsys.readouterr().out
        assert status == 1 and f"{ref}: FAILED" in report and why in report, (what, report)
    assert edge_train(["registry", "verify", packages.model, "1", "--registry", str(root), "--trusted-keys",
                       str(packages.keys.trusted)]) == 0
    assert f"trusted (accepted): key {packages.keys.signer.key_id}" in capsys.readouterr().out


def test_the_agent_refuses_each_tampered_package_and_keeps_serving_the_old_model(tampered, packages, tmp_path):
    root, bad = tampered
    endpoint, control = free_tcp_endpoint(), free_tcp_endpoint()
    config = tmp_path / "agent.toml"
    config.write_text(security_table(packages.keys, control, tmp_path))
    process = start_agent(root, packages.model, endpoint, "--config", str(config), "--no-drift",
                          log_path=tmp_path / "agent.log")
    row = packages.stream[:1]
    expected = float(packages.offline("1", row)[0][0])
    try:
        with AgentClient(endpoint, timeout_ms=REPLY_S * 1000) as client, \
                control_client(packages.keys, control) as operator:
            for number, (what, (ref, why)) in enumerate(bad.items(), 1):
                assert operator.reload(ref.version)["accepted"] is True, what
                outcome = wait_for(lambda: (h := client.health())["last_reload"] and
                                   h["last_reload"]["number"] == number and h["last_reload"], f"{what}: outcome")
                assert outcome["outcome"] == "refused" and any(why in p for p in outcome["problems"]), (what, outcome)
                result = client.score(row[0])
                assert result.decided and result.model["version"] == "1", what
                assert result.outlier_score == pytest.approx(expected, abs=1e-6), what
            health = client.health()
    finally:
        assert stop(process) == 0
    assert health["reloads"] == {"refused": len(bad)} and health["model"]["signature"]["status"] == "trusted"
    assert health["security"]["packages"]["development_mode"] is False
    assert "reload refused" in (tmp_path / "agent.log").read_text()


def test_development_mode_serves_an_unsigned_package_says_so_and_still_refuses_a_tampered_one(
        tampered, packages, tmp_path):
    root, bad = tampered
    unsigned, _ = bad["unsigned"]
    edited, why = bad["threshold edited after signing"]
    endpoint, control = free_tcp_endpoint(), free_tcp_endpoint()
    config = tmp_path / "agent.toml"
    config.write_text(security_table(packages.keys, control, tmp_path) + "allow_unsigned = true\n")
    log = tmp_path / "agent.log"
    process = start_agent(root, packages.model, endpoint, "--config", str(config), "--no-drift", log_path=log)
    try:
        with AgentClient(endpoint, timeout_ms=REPLY_S * 1000) as client, \
                control_client(packages.keys, control) as operator:
            assert client.health()["security"]["packages"]["development_mode"] is True
            operator.reload(unsigned.version)
            loaded = wait_for(lambda: client.health()["last_reload"], "the unsigned package's outcome")
            assert loaded["outcome"] == "loaded"
            assert client.health()["model"]["signature"]["status"] == "unsigned"
            operator.reload(edited.version)
            refused = wait_for(lambda: (h := client.health())["last_reload"]["number"] == 2 and h["last_reload"],
                               "the edited package's outcome")
            assert refused["outcome"] == "refused" and any(why in p for p in refused["problems"])
            assert client.score(packages.stream[0]).model["version"] == unsigned.version
    finally:
        assert stop(process) == 0
    text = log.read_text()
    assert "DEVELOPMENT MODE ([security] allow_unsigned)" in text
    assert f"development mode): loading {unsigned}, signature unsigned" in text


# ---- CURVE sockets and authorized control ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def curve_agent(packages, tmp_path_factory):
    """An agent whose score socket is a CURVE server on every interface (allowed: the ``program`` key) with a control
    socket (allowed: the ``control`` key)."""
    folder = tmp_path_factory.mktemp("curve-agent")
    port = free_tcp_endpoint().rsplit(":", 1)[1]
    control = free_tcp_endpoint()
    config = folder / "agent.toml"
    config.write_text(security_table(packages.keys, control, folder)
                      + f'score_keys = "{packages.keys.allow(folder / "score-keys", "program")}"\n')
    program = packages.keys.client("program", "agent-a")
    process = start_agent(packages.root, packages.model, f"tcp://0.0.0.0:{port}", "--config", str(config),
                          "--no-drift", log_path=folder / "agent.log", curve=program)
    yield {"endpoint": f"tcp://127.0.0.1:{port}", "control": control, "program": program}
    assert stop(process) == 0


def test_a_curve_score_socket_answers_an_allowed_key_and_no_one_else(curve_agent, packages):
    rows = packages.stream[:20]
    expected, _ = packages.offline("1", rows)
    with AgentClient(curve_agent["endpoint"], timeout_ms=REPLY_S * 1000, curve=curve_agent["program"]) as client:
        scores = [client.score(row).outlier_score for row in rows]
        before = client.health()["security"]["refused_handshakes"].get("score", 0)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    for who, curve in (("a plain client", None), ("an unknown key", packages.keys.client("stranger", "agent-a")),
                       ("a control key", packages.keys.client("control", "agent-a"))):
        with AgentClient(curve_agent["endpoint"], timeout_ms=NO_ANSWER_MS, curve=curve) as client:
            result = client.score(rows[0])
        assert (result.decided, result.error_code) == (False, TIMEOUT), who
    with AgentClient(curve_agent["endpoint"], timeout_ms=REPLY_S * 1000, curve=curve_agent["program"]) as client:
        refused = client.health()["security"]["refused_handshakes"]["score"]
    assert refused >= before + 2   # the unknown and the control key (a plain client never reaches ZAP)


def test_control_from_an_unauthorized_key_is_refused_and_the_served_model_does_not_change(curve_agent, packages):
    row = packages.stream[:1]
    expected = float(packages.offline("1", row)[0][0])
    for who in ("stranger", "program"):
        with AgentClient(curve_agent["control"], curve=packages.keys.client(who, "agent-a")) as intruder:
            with pytest.raises(AgentUnavailable):
                intruder.reload("2", timeout_ms=NO_ANSWER_MS)
            with pytest.raises(AgentUnavailable):
                intruder.rollback(timeout_ms=NO_ANSWER_MS)
    with AgentClient(curve_agent["endpoint"], timeout_ms=REPLY_S * 1000, curve=curve_agent["program"]) as client:
        for request in (lambda: client.reload("2"), client.rollback):
            reply = request()
            assert reply["code"] == Code.NOT_AUTHORIZED and curve_agent["control"] in reply["message"]
        health = client.health()
        result = client.score(row[0])
    assert health["model"]["version"] == "1" and health["previous_model"] is None and health["reloads"] == {}
    assert health["last_reload"] is None and health["rollbacks"] == 0
    assert result.model["version"] == "1" and result.outlier_score == pytest.approx(expected, abs=1e-6)
    with control_client(packages.keys, curve_agent["control"]) as operator:   # the right key is answered
        assert operator.health()["security"]["control_socket"] == curve_agent["control"]


# ---- the bind guard -----------------------------------------------------------------------------------------------

def _unsafe_endpoints() -> dict[str, str]:
    port = free_tcp_endpoint().rsplit(":", 1)[1]
    interface = next((name for _, name in socket.if_nameindex() if name != "lo"), "eth0")
    return {"tcp://0": f"tcp://0:{port}", "tcp://*": f"tcp://*:{port}", "tcp://[::]": f"tcp://[::]:{port}",
            "an interface name": f"tcp://{interface}:{port}", "a non-loopback address": f"tcp://192.0.2.10:{port}"}


def test_agent_and_collector_refuse_to_listen_beyond_loopback_without_curve(packages, tmp_path, capsys):
    for what, endpoint in _unsafe_endpoints().items():
        status = agent_cli.main(["run", "--registry", str(packages.root), "--model", packages.model, "--bind",
                                 endpoint, *packages.keys.trust_args, "--metrics-port", "0"])
        assert status == 2 and "without CURVE only a loopback address" in capsys.readouterr().err, what
        status = collector_cli.main(["run", "--bind", endpoint, "--db", str(tmp_path / "stats.sqlite"),
                                     "--metrics-port", "0"])
        assert status == 2 and "without CURVE only a loopback address" in capsys.readouterr().err, what
        assert listen_problems("bind", endpoint, curve=True) == [], what
    assert not (tmp_path / "stats.sqlite").exists()   # refused before the database was opened
    for safe in ("tcp://127.0.0.1:5555", "tcp://127.0.0.9:5555", "tcp://[::1]:5555", "ipc:///tmp/agent.sock"):
        assert listen_problems("bind", safe, curve=False) == [], safe


def test_drift_windows_that_leave_the_controller_need_curve_keys():
    remote = {"model": "m", "security.trusted_keys": "trusted", "drift.collector": "tcp://stats.fab.example:5560"}
    with pytest.raises(ConfigError, match=r"drift.collector: tcp://stats.fab.example:5560 is not on this controller"):
        load_config(None, remote)
    with pytest.raises(ConfigError, match=r"security.key: expected this agent's CURVE secret certificate"):
        load_config(None, {**remote, "security.collector_key": "collector.key"})
    assert load_config(None, {**remote, "security.collector_key": "collector.key", "security.key": "a.key_secret"})


# ---- key files ------------------------------------------------------------------------------------------------------

def test_keys_are_created_owner_only_listed_never_overwritten_and_refused_when_others_can_read_them(
        tmp_path, capsys):
    folder = tmp_path / "keys"
    assert edge_train(["keys", "create", "trainer", "--kind", "signing", "--dir", str(folder)]) == 0
    assert agent_cli.main(["keys", "create", "tester-07-agent", "--kind", "curve", "--dir", str(folder)]) == 0
    created = capsys.readouterr().out
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert mode == {"trainer.ed25519": 0o600, "trainer.ed25519.pub": 0o644, "tester-07-agent.key_secret": 0o600,
                    "tester-07-agent.key": 0o644}
    key = load_signing_key(folder / "trainer.ed25519")
    pair = load_curve_pair(folder / "tester-07-agent.key_secret")
    assert f"id {key.key_id}" in created and pair.public.decode() in created

    assert collector_cli.main(["keys", "list", "--dir", str(folder)]) == 0
    listing = capsys.readouterr().out
    assert listing.count(key.key_id) == 2 and listing.count(pair.public.decode()) == 2

    assert edge_train(["keys", "create", "trainer", "--kind", "signing", "--dir", str(folder)]) == 2
    assert "exists already" in capsys.readouterr().err
    assert load_signing_key(folder / "trainer.ed25519").key_id == key.key_id   # still the same key

    os.chmod(folder / "trainer.ed25519", 0o644)
    with pytest.raises(KeyFileError, match="others can read or write .*chmod 600"):
        load_signing_key(folder / "trainer.ed25519")
    os.chmod(folder / "tester-07-agent.key_secret", 0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_curve_pair(folder / "tester-07-agent.key_secret")


# ---- signing after the fact, rotation, signed history ---------------------------------------------------------------

def test_a_package_signed_later_then_rotated_to_a_new_key_verifies_only_against_the_keys_trusted(
        packages, tmp_path, capsys):
    root = packages.copy(tmp_path / "models")
    registry, keys = Registry(root), packages.keys
    ref = _republish(registry, packages.model, "2", None)
    checksum = registry.checksum(ref)

    def verify(trusted: Path) -> tuple[int, str]:
        status = edge_train(["registry", "verify", ref.name, ref.version, "--registry", str(root),
                             "--trusted-keys", str(trusted)])
        return status, capsys.readouterr().out

    assert verify(keys.trusted)[0] == 1
    assert edge_train(["registry", "sign", ref.name, ref.version, "--registry", str(root), "--signing-key",
                       str(keys.folder / "trainer.ed25519"), "--reason", "signed after an unsigned publish"]) == 0
    assert verify(keys.trusted)[0] == 0
    # Rotation: the new key signs; agents that trust only the old key refuse until the new one is trusted too.
    assert edge_train(["registry", "sign", ref.name, ref.version, "--registry", str(root), "--signing-key",
                       str(keys.folder / "nobody.ed25519"), "--reason", "key rotation"]) == 0
    status, report = verify(keys.trusted)
    assert status == 1 and f"signed by key {keys.untrusted.key_id}" in report
    both = tmp_path / "trusted"
    both.mkdir()
    for name in ("trainer.ed25519.pub", "nobody.ed25519.pub"):
        (both / name).write_bytes((keys.folder / name).read_bytes())
    assert verify(both)[0] == 0
    assert registry.checksum(ref) == checksum   # signing changes no package identity
    assert [e["action"] for e in registry.history(ref.name)][-2:] == ["sign", "sign"]


def test_a_stage_change_made_with_a_signing_key_records_its_key_id_and_an_altered_line_shows(
        packages, tmp_path, capsys):
    root = packages.copy(tmp_path / "models")
    keys = packages.keys
    assert edge_train(["registry", "promote", packages.model, "2", "production", "--reason", "lot A qualified",
                       "--registry", str(root), "--signing-key", str(keys.folder / "trainer.ed25519")]) == 0
    capsys.readouterr()
    line = Registry(root).history(packages.model)[-1]
    assert line["action"] == "promote" and line["key_id"] == keys.signer.key_id and line["signature"]

    def history() -> str:
        assert edge_train(["registry", "history", packages.model, "--registry", str(root), "--trusted-keys",
                           str(keys.trusted)]) == 0
        return capsys.readouterr().out.splitlines()[-1]

    assert history().endswith(f"[signed by key {keys.signer.key_id} (ok)]")
    path = root / packages.model / "history.jsonl"
    os.chmod(path, 0o644)
    path.write_text(path.read_text().replace("lot A qualified", "lot B qualified"))
    assert history().endswith("(signature NOT VALID: the line was altered)]")
