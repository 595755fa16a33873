"""`tunelab doctor` tells a user what this machine can do; MLX on Linux gets a fast BLAS (or a warning).

Everything runs in subprocesses: the BLAS is chosen once per process, before
the first ``import mlx.core``, so each case needs a fresh interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import pytest

Cli = Callable[..., CompletedProcess]

DEBIAN_OPENBLAS = Path(f"/usr/lib/{os.uname().machine}-linux-gnu/openblas-pthread/libopenblas.so.0")
needs_linux_mlx = pytest.mark.skipif(
    not sys.platform.startswith("linux") or importlib.util.find_spec("mlx") is None,
    reason="the BLAS choice only matters for mlx[cpu] on Linux",
)


def _python(code: str, **env: str) -> Any:
    """Run ``code`` in a fresh interpreter (``env`` added to ours) and return the JSON it prints last."""
    child_env = {k: v for k, v in os.environ.items() if k != "TUNELAB_BLAS"} | env
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_doctor_json_reports_machine_choice_and_capabilities(cli: Cli) -> None:
    result = cli("doctor", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"hardware", "installed", "auto", "capabilities", "mlx_blas"} <= report.keys()
    assert report["hardware"]["cores"] >= 1 and report["hardware"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert "torch" in report["installed"] and "mlx-lm" in report["installed"]
    assert [row["backend"] for row in report["capabilities"]] == ["torch", "mlx"]
    if sys.platform.startswith("linux") and not report["hardware"]["gpus"]:
        assert report["auto"]["backend"] == "torch"  # mlx[cpu] is installed here, yet auto stays on torch
        assert report["auto"]["reason"].endswith("using torch on cpu")


def test_doctor_prints_the_capability_table(cli: Cli) -> None:
    result = cli("doctor", env={"COLUMNS": "120"})
    assert result.returncode == 0, result.stderr
    assert "Capabilities" in result.stdout
    assert "lora, dora, qlora, full, freeze, prefix, ia3" in result.stdout
    assert "backend: auto →" in result.stdout
    assert "Extras" in result.stdout and "  gguf" in result.stdout  # each extra: installed, or the command to add it


@needs_linux_mlx
def test_doctor_warns_and_gives_the_fix_on_the_reference_blas(cli: Cli) -> None:
    result = cli("doctor", env={"TUNELAB_BLAS": "reference", "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stdout and "apt-get install libopenblas0-pthread" in result.stdout


@needs_linux_mlx
def test_a_bad_blas_path_is_reported_not_a_crash(cli: Cli) -> None:
    result = cli("doctor", "--json", env={"TUNELAB_BLAS": "/nonexistent/libblas.so"})
    assert result.returncode == 0, result.stderr
    blas = json.loads(result.stdout)["mlx_blas"]
    assert "/nonexistent/libblas.so" in blas["why"] and "TUNELAB_BLAS" in blas["warning"]


_INFO_TWICE = """
import json
from tunelab.backends.mlx.blas import ensure_fast_blas
first = ensure_fast_blas()
import mlx.core
print(json.dumps({"same": ensure_fast_blas() is first, **first.to_dict()}))
"""


@needs_linux_mlx
def test_ensure_fast_blas_is_idempotent() -> None:
    info = _python(_INFO_TWICE)
    assert info["same"]
    if DEBIAN_OPENBLAS.is_file():
        assert info["name"] == "openblas" and info["loaded"]


@needs_linux_mlx
def test_reference_setting_keeps_the_bundled_blas() -> None:
    info = _python(_INFO_TWICE, TUNELAB_BLAS="reference")
    assert info["same"] and info["name"] == "reference" and not info["loaded"]


@needs_linux_mlx
def test_mlx_imported_first_is_reported_as_it_is() -> None:
    info = _python("import mlx.core\n" + _INFO_TWICE)
    assert info["name"] == "reference" and "imported before" in info["why"]


_PROVIDER = """
import json
from tunelab.backends.mlx.blas import ensure_fast_blas, _global_cblas_path
ensure_fast_blas()
import mlx.core as mx
mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)))
print(json.dumps(_global_cblas_path()))
"""


@needs_linux_mlx
@pytest.mark.skipif(not DEBIAN_OPENBLAS.is_file(), reason="Debian's libopenblas0-pthread is not installed")
def test_mlx_matmuls_are_served_by_openblas_unless_told_otherwise() -> None:
    """Which library answers MLX's cblas calls (the speed itself is measured by doctor and bench/)."""
    assert "openblas" in (_python(_PROVIDER) or "")
    assert "openblas" not in (_python(_PROVIDER, TUNELAB_BLAS="reference") or "")


@needs_linux_mlx
@pytest.mark.skipif(not DEBIAN_OPENBLAS.is_file(), reason="Debian's libopenblas0-pthread is not installed")
def test_doctor_under_load_judges_the_blas_by_the_library_not_the_speed(cli: Cli) -> None:
    """Busy cores slow OpenBLAS down; doctor still names it and gives no reference-BLAS warning (issue 22 item 16)."""
    spin = "import time\nend = time.time() + 60\nwhile time.time() < end: pass"
    load = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2)]
    try:
        result = cli("doctor", "--json", env={"OPENBLAS_NUM_THREADS": "1"})
    finally:
        for proc in load:
            proc.kill()
            proc.wait()
    assert result.returncode == 0, result.stderr
    blas = json.loads(result.stdout)["mlx_blas"]
    assert "openblas" in blas["served_by"] and blas["warning"] is None, blas
    assert blas["gflops"] > 0  # reported as a figure only


@needs_linux_mlx
def test_doctor_names_the_bundled_blas_that_serves_mlx_when_told_to_keep_it(cli: Cli) -> None:
    blas = json.loads(cli("doctor", "--json", env={"TUNELAB_BLAS": "reference"}).stdout)["mlx_blas"]
    assert "libblas" in blas["served_by"] and "mlx" in blas["served_by"] and "apt-get install" in blas["warning"]
