"""Each switch of bench/gpu_env.sh changes the line it names: a switch that matches nothing would run an A/B of
the tree against itself on the GPU, and report "no gain" for a change that never ran."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_ENV = ROOT / "bench" / "gpu_env.sh"


def _switch_on_function() -> str:
    text = GPU_ENV.read_text()
    match = re.search(r"^switch_on\(\) \{\n.*?^\}\n", text, re.S | re.M)
    assert match, "bench/gpu_env.sh has no switch_on function"
    return match.group(0)


def _switches() -> list[tuple[str, str]]:
    """(switch name, the file under src/ its sed edits), from switch_on's case arms."""
    arms = re.findall(r"^\s+([a-z0-9_]+)\) sed -i '[^']*' \"\$src/([^\"]+)\" ;;$", _switch_on_function(), re.M)
    return arms


def test_every_switch_is_found() -> None:
    names = [name for name, _ in _switches()]
    assert len(names) >= 15 and len(set(names)) == len(names)
    assert {"joined_a_off", "joined_b_off", "fa4", "held_4bit", "autotune_gemm"} <= set(names)


@pytest.mark.parametrize(("name", "target"), _switches())
def test_a_switch_changes_its_file(name: str, target: str, tmp_path: Path) -> None:
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "src", copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = (copy / target).read_text()
    script = f"{_switch_on_function()}\nswitch_on {copy} {name}\n"
    subprocess.run(["bash", "-c", script], check=True)
    after = (copy / target).read_text()
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert len(changed) == 1, f"switch {name} changed {len(changed)} lines of {target}, not one"


def test_an_unknown_switch_is_refused(tmp_path: Path) -> None:
    script = f"{_switch_on_function()}\nswitch_on {tmp_path} no_such_switch\n"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert done.returncode == 2 and "no switch named no_such_switch" in done.stderr
