"""Every hint is a command that works (issue 38): each `--flag` that a job's message, error or
help names is a flag of a job's own parser, and where the message names a value of a flag
with fixed choices (`--layout wnid-files`), that value is one of them."""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import pkgutil
import re
from pathlib import Path

import pytest

import jobs

ROOT = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]+)(?:[ =]([a-z0-9][a-z0-9._-]*))?")
# flags of other programs that messages quote (git status --porcelain, git describe --short)
FOREIGN = {"porcelain", "short", "untracked-files"}
# words after a flag that are prose, not its value ("--v2-variant said: ...")
PROSE = {"to", "and", "or", "is", "must", "above", "with", "said", "the", "a", "of", "for"}


def _job_flags() -> dict[str, dict[str, set | None]]:
    """{job: {flag: its choices, or None}} from each job's own `--help`."""
    out = {}
    for mod in pkgutil.iter_modules(jobs.__path__):
        if mod.name.startswith("_"):
            continue
        main = importlib.import_module(f"jobs.{mod.name}").main
        text = io.StringIO()
        with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
            main(["--help"])
        flags = {}
        for m in re.finditer(r"(?m)^\s+--([a-z][a-z0-9-]*)(?: \{([^}]*)\})?", text.getvalue()):
            flags[m.group(1)] = set(m.group(2).split(",")) if m.group(2) else None
        for name in list(flags):  # BooleanOptionalAction: --x/--no-x on one line
            flags.setdefault(f"no-{name}", None)
        out[mod.name] = flags
    return out


def _messages(path: Path):
    """(line, text) of every string literal of a module but its docstrings; an f-string's
    placeholders read as X."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            yield node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "X"
                                       for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docs:
            yield node.lineno, node.value


def test_every_flag_a_message_names_is_a_flag_a_job_has():
    parsers = _job_flags()
    known = {f: c for flags in parsers.values() for f, c in flags.items()}
    bad, checked = [], 0
    for path in sorted([*ROOT.glob("pipeline/*.py"), *ROOT.glob("jobs/*.py")]):
        for line, text in _messages(path):
            for m in FLAG.finditer(text):
                flag, value = m.groups()
                if flag in FOREIGN:
                    continue
                checked += 1
                where = f"{path.relative_to(ROOT)}:{line} --{flag}"
                if flag not in known:
                    bad.append(f"{where}: no job has this flag")
                    continue
                choices = set().union(*(flags[flag] or set() for flags in parsers.values()
                                        if flag in flags))
                if value and choices and value not in choices and value not in PROSE:
                    bad.append(f"{where} {value}: not one of {sorted(choices)}")
    assert checked > 50 and not bad, "\n".join(bad)
