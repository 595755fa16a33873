"""`tunelab doctor` lists tunelab's extras, which are installed, and the one command that adds a missing one."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import pytest
import tomllib

Cli = Callable[..., CompletedProcess]
ROOT = Path(__file__).resolve().parents[2]


def declared_extras() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return set(project["optional-dependencies"]) - {"dev", "all"}


def test_doctor_reports_every_extra_with_its_install_command(cli: Cli) -> None:
    result = cli("doctor", "--json")
    assert result.returncode == 0, result.stderr
    extras = {extra["name"]: extra for extra in json.loads(result.stdout)["extras"]}
    assert set(extras) == declared_extras() and {"torch", "gguf", "ui", "serve", "docs"} <= set(extras)
    for name, extra in extras.items():
        assert extra["command"] == f'pip install -e "{ROOT}[{name}]"'  # this checkout is where tunelab runs from
        assert extra["present"] == (not extra["missing"])


def _without_llama_cpp(tmp_path: Path) -> dict[str, str]:
    """The environment of a real interpreter without llama-cpp-python: this one's site-packages, minus that package."""
    packages = Path(next(p for p in site.getsitepackages() if p.endswith("site-packages")))
    if not (packages / "llama_cpp").is_dir():
        pytest.skip("llama-cpp-python is not installed here, so there is nothing to take away")
    mirror = tmp_path / "site-packages"
    mirror.mkdir()
    for entry in packages.iterdir():
        if not entry.name.lower().startswith(("llama_cpp", "__editable__", "tunelab")):
            (mirror / entry.name).symlink_to(entry)
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{mirror}", "TUNELAB_HOME": str(tmp_path / "home")}


def _tunelab(env: dict[str, str], *args: str) -> CompletedProcess:
    return subprocess.run([sys.executable, "-S", "-m", "tunelab", *args], env=env, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip


def test_a_missing_package_is_named_with_the_command_that_adds_it(tmp_path: Path) -> None:
    done = _tunelab(_without_llama_cpp(tmp_path), "doctor", "--json")
    assert done.returncode == 0, done.stderr
    extras = {extra["name"]: extra for extra in json.loads(done.stdout)["extras"]}
    for name in ("gguf", "export"):
        assert not extras[name]["present"] and extras[name]["missing"] == ["llama-cpp-python"], extras[name]
        assert extras[name]["command"] == f'pip install -e "{ROOT}[{name}]"'
    assert extras["torch"]["present"] and extras["ui"]["present"]


def test_an_export_whose_checker_is_missing_is_refused_before_any_work(tmp_path: Path) -> None:
    # A fresh install exported a whole merged model first and only then said llama-cpp-python was missing.
    env = _without_llama_cpp(tmp_path)
    refused = _tunelab(env, "export", "nosuchrun", "--to", "gguf", "--out", str(tmp_path / "m.gguf"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "verifying --to gguf needs llama-cpp-python" in refused.stderr
    assert f'pip install -e "{ROOT}[gguf]", or --no-verify' in " ".join(refused.stderr.split())
    out = str(tmp_path / "m.gguf")
    quantized = _tunelab(
        env, "export", "nosuchrun", "--to", "gguf", "--out", out, "--quantize", "q4_k_m", "--no-verify"
    )
    assert quantized.returncode == 2 and "writing --to gguf needs llama-cpp-python" in quantized.stderr
    unchecked = _tunelab(env, "export", "nosuchrun", "--to", "gguf", "--no-verify", "--out", out)
    assert unchecked.returncode != 0 and "llama-cpp-python" not in unchecked.stderr  # on to the run: none such
    assert "nosuchrun" in unchecked.stderr and not (tmp_path / "m.gguf").exists()
