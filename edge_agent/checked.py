"""Checked configuration for every program: declared constraints checked before any work starts, one TOML loader.

A configuration object is a dataclass deriving from ``Checked``. Like scikit-learn's ``_parameter_constraints``,
it declares what each field accepts (``CONSTRAINTS``: field -> the accepted forms, any one will do; ``None`` accepts
None) and the rules between fields (``RULES``). ``problems()`` lists everything wrong, one message per problem naming
the field, what was expected and what it got; ``check()`` raises the program's configuration error listing all of
them, so a bad value stops a command before it reads data or binds a socket, not deep inside a library. ``load``
turns the tables of a TOML file (and command-line overrides) into a checked object, for every program.

>>> @dataclass
... class Window(Checked):
...     SCOPE = "window"
...     CONSTRAINTS = {"parts": [Interval(int, 1, None)], "seconds": [Interval(float, 0, None, closed="neither")],
...                    "unit": [OneOf("parts", "seconds")]}
...     RULES = (Rule(("parts", "unit"), lambda w: ["parts: must be 1 when unit is seconds"]
...                                                if w.unit == "seconds" and w.parts != 1 else []),)
...     parts: int = 100
...     seconds: float = 60.0
...     unit: str = "parts"
>>> for problem in Window(parts=0, seconds="soon", unit="lots").problems():
...     print(problem)
window.parts: expected a positive number, got 0
window.seconds: expected a number, got 'soon'
window.unit: expected one of ('parts', 'seconds'), got 'lots'
>>> Window(parts=5, unit="seconds").problems()
['window.parts: must be 1 when unit is seconds']

stdlib only: every program imports this module.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, TypeVar

from .errors import EdgeError

KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "an array",
              dict: "a table"}          # as TOML calls them: the files are where most values come from
_BOUNDS = {"both": "[]", "left": "[)", "right": "(]", "neither": "()"}


def read_toml(path: str | Path, error: type[EdgeError]) -> dict:
    """The TOML document at ``path``; ``error`` names the file and what is wrong with it."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise error(f"{path}: configuration file not found") from None
    except OSError as failure:
        raise error(f"{path}: cannot be read ({failure.strerror})") from None
    except tomllib.TOMLDecodeError as failure:
        raise error(f"{path}: not valid TOML ({failure})") from None


def unusable(error: type[EdgeError], source: str, problems: list[str]) -> EdgeError:
    """The error that lists every problem of the configuration from ``source``, one line each (the command line
    prints it as it is)."""
    return error(f"configuration ({source}) is not usable:\n" + "\n".join(f"  - {problem}" for problem in problems))


# ---- constraints: what one field accepts --------------------------------------------------------------------------

def _is_kind(value: Any, kind: type) -> bool:
    """``isinstance`` as a configuration means it: a bool is no number, an int is a float, numpy scalars count."""
    if kind in (int, float):
        return (isinstance(value, numbers.Integral if kind is int else numbers.Real)
                and not isinstance(value, bool))
    return isinstance(value, kind)


def _with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


@dataclass(frozen=True)
class Interval:
    """A finite int or float between ``low`` and ``high`` (None: unbounded); ``closed`` says which bounds belong."""

    kind: type
    low: int | float | None
    high: int | float | None
    closed: str = "both"           # "both", "left", "right" or "neither"

    def accepts(self, value: Any) -> bool:
        return (_is_kind(value, self.kind) and (self.kind is int or math.isfinite(value))   # ints are finite
                and self._inside(value))

    def describe(self) -> str:
        return _with_article(self._range("integer" if self.kind is int else "number"))

    def problem(self, value: Any) -> str:
        """The type when that is wrong, else the range (the type is right, so "number" says enough)."""
        if not _is_kind(value, self.kind):
            return f"expected {KIND_NAMES[self.kind]}, got {value!r}"
        return f"expected {_with_article(self._range('number'))}, got {value!r}"

    def _inside(self, value: int | float) -> bool:
        left, right = _BOUNDS[self.closed]
        return ((self.low is None or (value >= self.low if left == "[" else value > self.low))
                and (self.high is None or (value <= self.high if right == "]" else value < self.high)))

    def _range(self, noun: str) -> str:
        left, right = _BOUNDS[self.closed]
        if self.low is None and self.high is None:
            return f"finite {noun}"
        if self.high is None:
            if (self.low, left) == (0, "(") or (self.kind is int and (self.low, left) == (1, "[")):
                return f"positive {noun}"
            return f"{noun} {'>=' if left == '[' else '>'} {self.low}"
        if self.low is None:
            return f"{noun} {'<=' if right == ']' else '<'} {self.high}"
        return f"{noun} in {left}{self.low}, {self.high}{right}"


@dataclass(frozen=True)
class OneOf:
    """One of a few values (strings compared without case when ``ignore_case``)."""

    options: tuple
    ignore_case: bool = False

    def __init__(self, *options: Any, ignore_case: bool = False):
        object.__setattr__(self, "options", options)
        object.__setattr__(self, "ignore_case", ignore_case)

    def accepts(self, value: Any) -> bool:
        if self.ignore_case and isinstance(value, str):
            return value.upper() in (option.upper() for option in self.options)
        return any(value == option and type(value) is type(option) for option in self.options)

    def describe(self) -> str:
        return repr(self.options[0]) if len(self.options) == 1 else f"one of {self.options!r}"

    def problem(self, value: Any) -> str:
        return f"expected {self.describe()}, got {value!r}"


@dataclass(frozen=True)
class Instance:
    """Any value of one TOML type (``bool``, ``int``, ``float``, ``str``, ``list`` or ``dict``)."""

    kind: type

    def accepts(self, value: Any) -> bool:
        return _is_kind(value, self.kind)

    def describe(self) -> str:
        return KIND_NAMES[self.kind]

    def problem(self, value: Any) -> str:
        return f"expected {self.describe()}, got {value!r}"


@dataclass(frozen=True)
class Satisfies:
    """A value of ``kind`` for which ``test`` holds, described to people as ``description``."""

    kind: type
    test: Callable[[Any], bool]
    description: str

    def accepts(self, value: Any) -> bool:
        return _is_kind(value, self.kind) and bool(self.test(value))

    def describe(self) -> str:
        return self.description

    def problem(self, value: Any) -> str:
        if not _is_kind(value, self.kind):
            return f"expected {KIND_NAMES[self.kind]}, got {value!r}"
        return f"expected {self.description}, got {value!r}"


@dataclass(frozen=True)
class DistinctNames:
    """An array of names, each one of ``choices`` and none twice."""

    choices: tuple[str, ...]

    def accepts(self, value: Any) -> bool:
        return (isinstance(value, (list, tuple)) and all(name in self.choices for name in value)
                and len(set(value)) == len(value))

    def describe(self) -> str:
        return f"distinct names among {self.choices!r}"

    def problem(self, value: Any) -> str:
        if not isinstance(value, (list, tuple)) or not all(isinstance(name, str) for name in value):
            return f"expected an array of names among {self.choices!r}, got {value!r}"
        unknown = [name for name in value if name not in self.choices]
        if unknown:
            return f"expected names among {self.choices!r}, got unknown {unknown}"
        return f"expected each name once, got {list(value)}"


NON_EMPTY = Satisfies(str, bool, "a non-empty string")


def field_problem(value: Any, accepted: list) -> str | None:
    """What is wrong with ``value`` given the accepted forms (None when one of them accepts it)."""
    if any(value is None if form is None else form.accepts(value) for form in accepted):
        return None
    if len(accepted) == 1:
        return accepted[0].problem(value)
    return f"expected {_either(['None' if form is None else form.describe() for form in accepted])}, got {value!r}"


def _either(choices: list[str]) -> str:
    return choices[0] if len(choices) == 1 else f"{', '.join(choices[:-1])} or {choices[-1]}"


@dataclass(frozen=True)
class Rule:
    """A constraint between fields. ``problems`` gets the config and returns messages that start with the field
    they blame; it runs only when each of ``fields`` met its own constraints, so it can compare them safely.
    ``scope``: the table of the blamed field when it is a section's (default: the config's own ``SCOPE``)."""

    fields: tuple[str, ...]
    problems: Callable[[Any], list[str]]
    scope: str | None = None


# ---- the configuration object ---------------------------------------------------------------------------------------

class Checked:
    """Base of every configuration dataclass: ``CONSTRAINTS`` for every field that is not itself a ``Checked``
    section, ``RULES`` between fields, ``SCOPE`` naming the TOML table (and prefixing messages), ``ERROR`` the
    program's configuration error."""

    SCOPE: ClassVar[str] = ""
    CONSTRAINTS: ClassVar[dict[str, list]] = {}
    RULES: ClassVar[tuple[Rule, ...]] = ()
    ERROR: ClassVar[type[EdgeError]] = EdgeError

    def problems(self, names: Mapping[str, str] | None = None, also: tuple[Rule, ...] = ()) -> list[str]:
        """Every problem, one message each: fields, then rules (the declared ones and ``also``), then sections.

        ``names`` shows some fields under another name (a command-line option, say); ``also`` adds rules that
        one use needs (a daemon needs a model name, a command that only talks to the daemon does not).
        """
        names = names or {}
        problems, failed, sections = [], set(), []
        for name in (f.name for f in dataclasses.fields(self)):
            value = getattr(self, name)
            if isinstance(value, Checked):
                sections.append(value)
                continue
            problem = field_problem(value, self.CONSTRAINTS[name])
            if problem is not None:
                problems.append(f"{names.get(name) or self._label(name)}: {problem}")
                failed.add(name)
        prefix = f"{self.SCOPE}." if self.SCOPE else ""
        for rule in (*self.RULES, *also):
            if failed.isdisjoint(rule.fields):
                scope = prefix if rule.scope is None else f"{rule.scope}."
                problems += [f"{scope}{problem}" for problem in rule.problems(self)]
        for section in sections:
            problems += section.problems()
        return problems

    def check(self, source: str | None = None, names: Mapping[str, str] | None = None, also: tuple[Rule, ...] = ()):
        """This object, if it has no problem; else the program's configuration error listing every one (``source``
        says where the values came from; default: the class name)."""
        problems = self.problems(names, also)
        if problems:
            raise unusable(self.ERROR, source or type(self).__name__, problems)
        return self

    def _label(self, name: str) -> str:
        return f"{self.SCOPE}.{name}" if self.SCOPE else name


C = TypeVar("C", bound=Checked)


def load(config: C, path: str | Path | None = None, overrides: Mapping[str, Any] | None = None, *,
         also: tuple[Rule, ...] = ()) -> C:
    """``config`` (its defaults), then the TOML file at ``path``, then ``overrides`` ({"bind": ..., "metrics.port":
    ...}; None means not given), checked: one error lists every unknown table or key and every problem.

    The file's tables are the object's ``SCOPE`` and those of its sections ([agent], [metrics], ... or [alerts]).
    A value's type is checked with the rest, so a wrong type is one more line in the same error.
    """
    source = "defaults" if path is None else str(path)
    tables = {config.SCOPE: config, **{value.SCOPE: value for value in _sections(config)}}
    problems = [] if path is None else _apply_document(tables, read_toml(path, config.ERROR), source)
    given = {dotted: value for dotted, value in (overrides or {}).items() if value is not None}
    for dotted, value in given.items():
        table, _, key = dotted.rpartition(".")
        problems += _set(tables[table or config.SCOPE], key, value,
                         f"command line --{dotted.replace('.', '-').replace('_', '-')}")
    problems += config.problems(also=also)
    if problems:
        raise unusable(config.ERROR, f"{source} and the command line" if given else source, problems)
    return config


def _sections(config: Checked) -> list[Checked]:
    return [value for value in (getattr(config, f.name) for f in dataclasses.fields(config))
            if isinstance(value, Checked)]


def _apply_document(tables: dict[str, Checked], document: dict, source: str) -> list[str]:
    problems = []
    for name, table in document.items():
        if name not in tables:
            problems.append(f"{source}: unknown table [{name}]; expected {_either([f'[{t}]' for t in tables])}")
        elif not isinstance(table, dict):
            problems.append(f"{source}: {name}: expected a table [{name}], got {table!r}")
        else:
            for key, value in table.items():
                problems += _set(tables[name], key, value, f"{source}: [{name}] {key}")
    return problems


def _set(target: Checked, key: str, value: Any, where: str) -> list[str]:
    """Set one key (its type is checked with the other constraints); a problem only when the key is unknown."""
    known = [f.name for f in dataclasses.fields(target) if not isinstance(getattr(target, f.name), Checked)]
    if key not in known:
        return [f"{where}: unknown key; expected one of {', '.join(sorted(known))}"]
    default = getattr(target, key)
    if isinstance(default, float) and _is_kind(value, int):
        value = float(value)                    # TOML writes 300 for 300.0
    # A partial table (such as [binning.bins]) changes the keys it names only.
    setattr(target, key, {**default, **value} if isinstance(default, dict) and isinstance(value, dict) else value)
    return []
