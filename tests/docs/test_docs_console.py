"""The docs' `console` blocks are real: each `$ command` runs and prints what the page shows after it. A page's
blocks run in order in one scratch folder with its own registry, as a reader following the page would run
them. The FAQ's error messages are among them, so they can't drift."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"


def console_blocks(pages: list[Path] | None = None) -> list[tuple[str, list[tuple[str, str]]]]:
    """Every ``console`` block as ``(page:line, [(command, the output shown after it), ...])``."""
    blocks = []
    for page in pages or sorted(DOCS.rglob("*.md")):
        lines = page.read_text(encoding="utf-8").splitlines()
        start = None
        for number, line in enumerate(lines, 1):
            if line.strip() == "```console":
                start, steps = number, []
            elif start is not None and line.strip() == "```":
                blocks.append((f"{page.relative_to(DOCS)}:{start}", steps))
                start = None
            elif start is not None and line.startswith("$ "):
                steps.append((line[2:], ""))
            elif start is not None and steps:
                steps[-1] = (steps[-1][0], steps[-1][1] + line + "\n")
    return blocks


def _words(text: str) -> str:
    """The text with every run of whitespace made one space: Rich wraps long lines at the terminal's width."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())


def test_the_docs_have_console_blocks() -> None:
    blocks = console_blocks()
    assert len(blocks) >= 4 and all(steps for _, steps in blocks)
    assert any("error:" in shown for _, steps in blocks for _, shown in steps)


PAGES = sorted({where.split(":")[0] for where, _ in console_blocks()})


@pytest.mark.parametrize("page", PAGES)
def test_a_pages_console_blocks_print_what_they_show(page: str, tmp_path: Path) -> None:
    # `tunelab` is the real CLI of this interpreter; a scratch TUNELAB_HOME keeps the user's registry out of it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tunelab").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tunelab "$@"\n', encoding="utf-8")
    (bin_dir / "tunelab").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TUNELAB_HOME": str(tmp_path / "home")}
    env.pop("TUNELAB_DB_URL", None)
    steps = [(where, *step) for where, block in console_blocks([DOCS / page]) for step in block]
    for where, command, shown in steps:
        done = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        output = done.stdout + done.stderr
        assert "Traceback" not in output, f"{where}: {command}\n{output}"
        assert _words(shown) in _words(output), f"{where}: `{command}` printed\n{output}\nthe page shows\n{shown}"
        if shown.lstrip().startswith("error:"):
            assert done.returncode != 0, f"{where}: `{command}` printed an error yet exited 0"
