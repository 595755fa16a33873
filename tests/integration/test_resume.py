"""A run killed with SIGKILL (or stopped with Ctrl-C) resumes to the same final adapter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.integration.conftest import base_config
from tests.integration.runs import adapter_diff, only_run_id, start_cli, wait_for

pytestmark = pytest.mark.slow

STEPS = 60


def _write_cfg(path: Path, model: Path, data: Path, out: Path) -> Path:
    raw = base_config(model, data, out, steps=STEPS, save_every=5, eval_every=20)
    raw["method"]["dropout"] = 0.2  # dropout makes the RNG state part of what must be restored
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, e2e_model: Path, chat_data: Path) -> Path:
    """The uninterrupted run's adapter."""
    root = tmp_path_factory.mktemp("reference")
    cfg = _write_cfg(root / "cfg.yaml", e2e_model, chat_data, root / "out")
    proc = start_cli("train", str(cfg), home=root / "home")
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return root / "out" / "adapter"


def test_sigkill_then_resume_matches_uninterrupted(
    reference: Path, e2e_model: Path, chat_data: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    cfg = _write_cfg(tmp_path / "cfg.yaml", e2e_model, chat_data, tmp_path / "out")
    proc = start_cli("train", str(cfg), home=home)
    wait_for(tmp_path / "out" / "checkpoints" / "step-15", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (tmp_path / "out" / "adapter").exists(), "the run finished before it could be killed"
    run_id = only_run_id(home)

    resumed = start_cli("train", "--resume", run_id, home=home)
    _out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming from step-" in err
    assert adapter_diff(reference, tmp_path / "out" / "adapter") <= 1e-5

    shown = json.loads(
        subprocess.run(
            [sys.executable, "-m", "tunelab", "runs", "show", run_id, "--json"],
            env={**os.environ, "TUNELAB_HOME": str(home)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert shown["status"] == "completed" and shown["step"] == STEPS
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [s for s in steps if s]
    assert sorted(set(train_steps)) == list(range(1, STEPS + 1)), "metrics after a resume have no gaps"


def test_ctrl_c_saves_checkpoint_and_resume_finishes(
    reference: Path, e2e_model: Path, chat_data: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    cfg = _write_cfg(tmp_path / "cfg.yaml", e2e_model, chat_data, tmp_path / "out")
    proc = start_cli("train", str(cfg), home=home)
    wait_for(tmp_path / "out" / "checkpoints" / "step-10", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "--resume" in out
    run_id = only_run_id(home)
    resumed = start_cli("train", "--resume", run_id, home=home)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert adapter_diff(reference, tmp_path / "out" / "adapter") <= 1e-5
