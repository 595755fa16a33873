"""The package's shape, checked: the layering and the one vocabulary.

The contracts live in pyproject.toml ([tool.importlinter]): interfaces (cli, api, ui) reach the
core only through ``tunelab.services``; services sit above the domain packages, which sit above
the backends; no two top-level packages import each other.  import-linter follows imports made
inside functions too, which is where package cycles used to hide.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab import vocab

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "tunelab"


def test_import_contracts_are_kept() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("lint-imports is missing: install the dev extra (pip install -e '.[dev]')")
    proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _module_level_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def test_each_shared_word_is_defined_once() -> None:
    """Method lists, states, formats and the ignore index live in tunelab.vocab and nowhere else."""
    shared = {name for name in vars(vocab) if name.isupper()}
    assert {"IGNORE", "ADAPTER_METHODS", "FINAL_STATUSES", "DATA_FORMATS"} <= shared
    copies = {
        f"{path.relative_to(SRC)}: {name}"
        for path in SRC.rglob("*.py")
        if path.name != "vocab.py"
        for name in _module_level_names(path) & shared
    }
    assert not copies, f"redefined outside tunelab/vocab.py: {sorted(copies)}"
