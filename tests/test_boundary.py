"""The boundary between the three programs and their roles (install extras), held by tests.

- `pip install .` without extras is the agent and its client: run where the libraries of the [trainer] and
  [collector] extras cannot be imported (tests/without_roles: a meta-path finder installed at interpreter
  start-up refuses them), the daemon serves a real package to the client, and the collector (matplotlib allowed:
  its report needs it) stores what a real agent ships.
- There, a console script of a role that is not installed stops with one line naming the extra to install.
- `edge-train --help` and `edge-train registry list` import none of the trainer's heavy libraries.
- No module under edge_agent/ imports trainer, and the collector reaches none of the daemon's modules.
"""
from __future__ import annotations

import ast
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import EXTRA_OF_MODULE
from edge_agent.processes import free_tcp_endpoint, start_agent, start_collector, stop

REPO = Path(__file__).resolve().parents[1]
WITHOUT_ROLES = Path(__file__).with_name("without_roles")
DISTRIBUTION = "edge-inference"
# Top-level modules of the [trainer] and [collector] extras (and scipy, which scikit-learn brings): the table the
# agent's "install the extra" hint uses, checked below against setup.py and against what the agent imports.
ROLE_MODULES = EXTRA_OF_MODULE
SCORE_ROWS = 120
CLIENT = """
import json, sys
import numpy as np
from edge_agent.client import AgentClient
try:
    import sklearn
    absent = False
except ModuleNotFoundError:
    absent = True
rows = np.load(sys.argv[2])
with AgentClient(sys.argv[1], timeout_ms=10_000) as client:
    health = client.health(timeout_ms=10_000)
    results = [client.score(row, {"lot": "boundary", "site": 1 + i % 2}) for i, row in enumerate(rows)]
print(json.dumps({"sklearn_absent": absent, "status": health["status"], "model": health["model"],
                  "results": [[r.decided, r.outlier_score, r.pass_probability, r.error_message] for r in results]}))
"""


@pytest.fixture
def without_roles(monkeypatch):
    """Pythons started after this cannot import the role libraries; ``without_roles("matplotlib")`` lets the
    next ones import matplotlib."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(WITHOUT_ROLES),
                                                                    os.environ.get("PYTHONPATH")])))

    def absent(*allowed: str) -> None:
        monkeypatch.setenv("EDGE_TEST_ABSENT_MODULES", ",".join(m for m in ROLE_MODULES if m not in allowed))
    absent()
    return absent


def _score_in_a_client_process(endpoint: str, rows: np.ndarray, folder: Path) -> dict:
    np.save(folder / "rows.npy", rows)
    done = subprocess.run([sys.executable, "-c", CLIENT, endpoint, str(folder / "rows.npy")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["sklearn_absent"], "the client process could import scikit-learn"
    return reply


# ---- the base install serves ------------------------------------------------------------------------------------

def test_the_agent_and_its_client_serve_a_real_package_without_the_trainer_and_collector_libraries(
        packages, tmp_path, without_roles):
    endpoint = free_tcp_endpoint()
    agent = start_agent(packages.root, packages.model, endpoint, "--no-drift", *packages.keys.trust_args,
                        log_path=tmp_path / "agent.log")
    rows = packages.stream[:SCORE_ROWS]
    try:
        reply = _score_in_a_client_process(endpoint, rows, tmp_path)
    finally:
        assert stop(agent) == 0
    assert reply["status"] == "serving" and reply["model"]["version"] == "1"
    decided, scores, probabilities, errors = zip(*reply["results"])
    assert all(decided), [e for e in errors if e][:3]
    expected_scores, expected_probabilities = packages.offline("1", rows)
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-6)
    np.testing.assert_allclose(probabilities, expected_probabilities, rtol=0, atol=1e-6)


def test_the_collector_stores_a_window_a_real_agent_shipped_without_the_trainer_libraries(
        packages, tmp_path, without_roles):
    without_roles("matplotlib")
    db, collector_endpoint = tmp_path / "stats.sqlite", free_tcp_endpoint()
    collector = start_collector(db, collector_endpoint, log_path=tmp_path / "collector.log")
    without_roles()
    config = tmp_path / "agent.toml"
    config.write_text(f'[drift]\nagent_id = "agent-b"\ntester = "tester-b"\ncollector = "{collector_endpoint}"\n'
                      f'window_parts = 50\nspool_dir = "{tmp_path / "spool"}"\n')
    endpoint = free_tcp_endpoint()
    agent = start_agent(packages.root, packages.model, endpoint, "--config", str(config), *packages.keys.trust_args,
                        log_path=tmp_path / "agent.log")
    try:
        try:
            reply = _score_in_a_client_process(endpoint, packages.stream[:SCORE_ROWS], tmp_path)
        finally:
            assert stop(agent) == 0   # ships the window still open
        assert all(decided for decided, *_ in reply["results"])
        deadline = time.monotonic() + 30
        while len(_stored_windows(db)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        assert stop(collector) == 0
    assert _stored_windows(db) == [("agent-b", 1, "parts", 50), ("agent-b", 2, "parts", 50),
                                   ("agent-b", 3, "shutdown", SCORE_ROWS - 100)]


def _stored_windows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT agent_id, seq, closed_by, parts FROM windows ORDER BY seq").fetchall()


# ---- roles that are not installed ---------------------------------------------------------------------------------

def _console_scripts() -> dict[str, str]:
    """Console script name -> entry point ("module:function"), as installed from setup.py."""
    return {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")
            if ep.dist is not None and ep.dist.name == DISTRIBUTION}


def _run_console_script(name: str, *argv: str) -> subprocess.CompletedProcess:
    """Run console script ``name`` as its installed wrapper does: ``sys.exit(function())`` with argv."""
    module, function = _console_scripts()[name].split(":")
    wrapper = f"import sys; from {module} import {function}; sys.exit({function}())"
    return subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True, timeout=300)


def _role_commands(tmp_path: Path, packages) -> dict[str, tuple[list[str], str]]:
    """Console script -> (a command that needs a role, the extra that installs it); edge-agent is the base."""
    stdf = str(REPO / "tests" / "data" / "stdf" / "a595.stdf.gz")
    out = tmp_path / "out"
    return {
        "edge-train": (["fit", "--data", stdf, "--registry", str(tmp_path / "models")], "trainer"),
        "edge-replay": ([stdf, "--registry", str(packages.root), "--model", packages.model, "--dump",
                         str(out / "messages.jsonl")], "trainer"),
        "edge-collector": (["report", "--db", str(tmp_path / "stats.sqlite"), "--out", str(out / "report.html")],
                           "collector"),
        "edge-bench": (["--quick", "--json", str(out / "bench.json"), "--markdown", str(out / "bench.md"),
                        "--plots", str(out)], "trainer"),
    }


def test_every_console_script_but_the_agent_is_of_a_role(tmp_path, packages):
    assert set(_console_scripts()) == {"edge-agent", *_role_commands(tmp_path, packages)}


@pytest.mark.parametrize("script", ["edge-train", "edge-replay", "edge-collector", "edge-bench"])
def test_a_console_script_of_a_missing_role_names_the_extra_in_one_line(script, tmp_path, packages, without_roles):
    argv, extra = _role_commands(tmp_path, packages)[script]
    done = _run_console_script(script, *argv)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"{script}: error: ") and f"pip install '{DISTRIBUTION}[{extra}]'" in done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "models").exists(), "work started before the check"


def test_the_absent_modules_are_those_of_the_trainer_and_collector_extras():
    """Every library the two extras install is made absent, under the extra that installs it."""
    def normal(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()
    modules_of = {}
    for module, distributions in metadata.packages_distributions().items():
        for distribution in distributions:
            modules_of.setdefault(normal(distribution), set()).add(module)
    for requirement in metadata.requires(DISTRIBUTION):
        extra = re.search(r'extra == "(\w+)"', requirement)
        if extra and extra[1] in ("trainer", "collector"):
            library = normal(re.match(r"[A-Za-z0-9._-]+", requirement)[0])
            assert extra[1] in {ROLE_MODULES.get(m) for m in modules_of[library]}, (requirement, modules_of[library])


# ---- fast command start -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--help"], ["registry", "list"]])
def test_edge_train_help_and_registry_list_import_no_trainer_library(argv, packages):
    module, function = _console_scripts()["edge-train"].split(":")
    code = (f"import contextlib, io, json, sys\nfrom {module} import {function}\n"
            f"with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    try:\n        {function}(sys.argv[1:])\n    except SystemExit:\n        pass\n"
            f"print(json.dumps(sorted({{m.partition('.')[0] for m in sys.modules}} & set({sorted(ROLE_MODULES)}))))")
    registry = ["--registry", str(packages.root)] if argv[0] == "registry" else []
    done = subprocess.run([sys.executable, "-c", code, *argv, *registry], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


# ---- imports between the programs -----------------------------------------------------------------------------------

def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import anywhere in the file, at top level or inside a function: import
    statements (relative ones resolved; ``from a import b`` gives a and a.b, b may be a module), and names
    passed to importlib.import_module or __import__ ("<computed>" when not a literal, which no scan can read)."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func):
            literal = node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
            found.append((node.lineno, node.args[0].value if literal else "<computed>"))
    return found


def _with_parents(module: str) -> list[str]:
    """What importing ``module`` runs: its packages' __init__ modules, then the module."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _is_dynamic_import(function: ast.expr) -> bool:
    return ((isinstance(function, ast.Name) and function.id in ("__import__", "import_module"))
            or (isinstance(function, ast.Attribute) and function.attr == "import_module"))


def test_no_module_under_edge_agent_imports_trainer():
    assert "trainer.synth" in {m for _, m in _imports(REPO / "trainer" / "cli.py")}, "the scan reads lazy imports"
    offending = [f"{path.relative_to(REPO)}:{line}: {module}" for path in sorted((REPO / "edge_agent").rglob("*.py"))
                 for line, module in _imports(path) if module.partition(".")[0] in ("trainer", "<computed>")]
    assert offending == []


def test_the_package_contract_never_imports_the_key_files_module():
    """keys.py reads key files into package.signing.SigningKey, above the contract: package/ never imports it, so
    the two cannot import each other."""
    assert "edge_agent.package.signing" in {m for _, m in _imports(REPO / "edge_agent" / "keys.py")}
    offending = [f"{path.relative_to(REPO)}:{line}: {module}"
                 for path in sorted((REPO / "edge_agent" / "package").rglob("*.py"))
                 for line, module in _imports(path) if module.split(".")[:2] == ["edge_agent", "keys"]]
    assert offending == []


def test_the_collector_reaches_none_of_the_daemons_modules():
    """Follows imports from module to module (function-level ones too), so a contract module that pulled in
    a daemon module would be caught as well."""
    modules = {_module_name(path): path for path in (REPO / "edge_agent").rglob("*.py")}
    imports = {name: {package for _, m in _imports(path) for package in _with_parents(m) if package in modules}
               for name, path in modules.items()}

    def reached(start: list[str]) -> dict[str, list[str]]:
        chains, stack = {}, [[name] for name in start]
        while stack:
            chain = stack.pop()
            if chain[-1] not in chains:
                chains[chain[-1]] = chain
                stack += [chain + [m] for m in imports[chain[-1]]]
        return chains

    daemon = {name for name in modules if name.startswith("edge_agent.daemon")}
    assert "edge_agent.daemon.server" in daemon
    assert "edge_agent.daemon.drift" in reached(["edge_agent.daemon.upstream"]), "the scan follows the daemon's own imports"
    collector = reached([name for name in modules if name.startswith("edge_agent.collector")])
    assert [" -> ".join(collector[m]) for m in sorted(daemon & collector.keys())] == []
