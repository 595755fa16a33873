"""The README and the docs pages show only what exists: every `tunelab ...` command they show names a real
subcommand and real flags (read from that command's --help, through the real CLI), and the cheap ones run
(issue 22 item 13; the docs site, issue 21).
Help screens show flags without a `<bool>` placeholder (item 21).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from functools import cache
from pathlib import Path
from subprocess import CompletedProcess

import pytest
from tests.conftest import run_cli

Cli = Callable[..., CompletedProcess]
ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# Commands that need nothing but a registry, so the test runs them as the README shows them.
CHEAP = {("runs", "list"), ("jobs", "list"), ("data", "cache"), ("doctor",)}


def readme_commands() -> list[str]:
    """The text after ``tunelab`` of every command shown in a shell code block or an inline code span."""
    shown: list[str] = []
    fence: str | None = None  # the open code block's language, None outside one
    lines = [line for page in PAGES for line in page.read_text(encoding="utf-8").splitlines()]
    for line in lines:
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
        elif fence in ("bash", "sh", ""):
            shown.append(line)
        elif fence is None:
            shown += re.findall(r"`([^`]+)`", line)
    found = []
    for item in shown:
        match = re.search(r"(?:^|\s|-m )tunelab ([^#\n]*)", item)
        if match and match.group(1).strip():
            found.append(match.group(1).strip().rstrip("\\").strip())
    return list(dict.fromkeys(found))


@cache
def help_of(path: tuple[str, ...]) -> str:
    result = run_cli(*path, "--help", env={"COLUMNS": "200"})
    assert result.returncode == 0, f"tunelab {' '.join(path)} --help: {result.stderr}"
    return result.stdout


def command_path(tokens: list[str]) -> tuple[str, ...]:
    """The subcommand (and sub-subcommand) that ``tokens`` start with."""
    path = (tokens[0],)
    if "Commands" in help_of(path) and len(tokens) > 1 and not tokens[1].startswith("-"):
        path += (tokens[1],)
    return path


def test_the_readme_shows_tunelab_commands() -> None:
    commands = readme_commands()
    assert len(commands) > 20 and any(c.startswith("chat ") for c in commands)


@pytest.mark.parametrize("shown", readme_commands())
def test_every_command_the_readme_shows_exists_with_its_flags(shown: str) -> None:
    tokens = shlex.split(shown.replace("…", ""))
    path = command_path(tokens)
    screen = help_of(path)
    for token in tokens[len(path) :]:
        if token.startswith("-") and token not in ("-", "--"):
            flag = token.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", screen), f"tunelab {shown}: no {flag}"
    assert "<bool>" not in screen


@pytest.mark.parametrize("path", sorted(CHEAP))
def test_the_cheap_readme_commands_run(path: tuple[str, ...]) -> None:
    assert any(c.split()[: len(path)] == list(path) for c in readme_commands()), f"neither README nor docs show {path}"
    result = run_cli(*path, env={"COLUMNS": "120"})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr


def test_no_help_screen_shows_a_bool_placeholder(cli: Cli) -> None:
    root = help_of(())
    names = re.findall(r"^│ (\w[\w-]*) ", root, flags=re.M)
    assert {"train", "chat", "runs", "data"} <= set(names)
    for name in names:
        screen = help_of((name,))
        assert "<bool>" not in screen, name
        for sub in re.findall(r"^│ (\w[\w-]*) ", screen, flags=re.M) if "Commands" in screen else []:
            assert "<bool>" not in help_of((name, sub)), (name, sub)
