"""Documentation that cannot go stale: every command line the README and docs/ show goes through its program's
real argument parser (sub-commands and flags must exist), and the README's figure table is what
``edge-bench --readme-table`` prints for the committed results file.

A command is a line in a fenced code block that starts with one of the programs (a trailing ``\\`` continues it,
a ``# comment`` ends it): it must parse whole. An inline code span that starts with a program and names a flag is
a fragment of a command ("`edge-agent reload --key`"): its sub-command and flags must exist, their values and the
required options may be left out. Optional parts written as ``[...]`` are left out before parsing; they are the
reader's choice, not the program's.
"""
from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import build_parser as bench_parser
from edge_agent.collector.cli import build_parser as collector_parser
from edge_agent.daemon.cli import build_parser as agent_parser
from trainer.cli import build_parser as train_parser
from trainer.replay import build_parser as replay_parser

REPO = Path(__file__).resolve().parents[1]
PARSERS = {"edge-train": train_parser, "edge-agent": agent_parser, "edge-collector": collector_parser,
           "edge-replay": replay_parser, "edge-bench": bench_parser}
PROGRAMS = "|".join(map(re.escape, PARSERS))
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FIGURES = re.compile(r"<!-- figures: edge-bench --readme-table (\S+) -->\n(.*?)\n<!-- /figures -->", re.S)


def shown_commands(text: str) -> list[tuple[int, str, bool]]:
    """(line number, command, whole) of every command line the Markdown text shows; whole is False for a
    fragment in running text."""
    commands, in_block, pending = [], False, None
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block, pending = not in_block, None
            continue
        if in_block:
            if pending is not None:
                start, sofar = pending
                pending = None
                line = sofar + " " + line.strip()
                number = start
            elif not re.match(rf"\s*(\$\s+)?({PROGRAMS})(\s+[-a-z'\"]|$)", line):
                continue
            command = re.sub(r"\s+#\s.*$", "", line.strip().removeprefix("$").strip())
            if command.endswith("\\"):
                pending = (number, command[:-1].strip())
                continue
            commands.append((number, command, True))
        else:
            commands += [(number, span, False) for span in re.findall(rf"`((?:{PROGRAMS})\s[^`]*--[^`]*)`", line)]
    return commands


def parse(command: str) -> str | None:
    """None when the program's parser takes the command; else what argparse said."""
    words = shlex.split(re.sub(r"\s*\[[^\]]*\]", "", command))
    parser = PARSERS[words[0]]()
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(words[1:])
    except SystemExit as stop:
        if stop.code not in (0, None):
            return errors.getvalue().strip().splitlines()[-1]
    return None


FRAGMENT_GAPS = ("expected one argument", "the following arguments are required")
ALL_COMMANDS = [(path, number, command, whole) for path in DOCUMENTS
                for number, command, whole in shown_commands(path.read_text())]


def test_the_documents_show_commands_of_every_program():
    assert {command.split()[0] for _, _, command, whole in ALL_COMMANDS if whole} == set(PARSERS)


@pytest.mark.parametrize("path, number, command, whole", ALL_COMMANDS,
                         ids=[f"{p.relative_to(REPO)}:{n}" for p, n, _, _ in ALL_COMMANDS])
def test_every_command_shown_parses(path, number, command, whole):
    problem = parse(command)
    if not whole and problem and any(gap in problem for gap in FRAGMENT_GAPS):
        problem = None
    assert problem is None, f"{path.relative_to(REPO)}:{number}: {command!r}: {problem}"


def test_a_misspelled_flag_is_caught():
    assert parse("edge-train fit --data lot.stdf --name prod-x") is None
    assert "unrecognized arguments: --nmae" in parse("edge-train fit --data lot.stdf --nmae prod-x")
    assert "invalid choice: 'fitt'" in parse("edge-train fitt --data lot.stdf")


def test_the_readme_figure_table_is_the_benchmarks_own_output():
    found = FIGURES.search((REPO / "README.md").read_text())
    assert found, "the README has no figure table between its markers"
    printed = subprocess.run([sys.executable, "-m", "bench.cli", "--readme-table", str(REPO / found[1])],
                             capture_output=True, text=True, check=True, cwd=REPO).stdout.strip()
    assert found[2].strip() == printed, "run `edge-bench --readme-table bench/results/latest.json` into the README"
