"""A run killed with SIGKILL (or stopped with Ctrl-C) resumes to the same final adapter."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
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
    _assert_every_step_once(tmp_path / "out", home)


def test_sigkill_at_a_random_step_logs_every_step_once(
    reference: Path, e2e_model: Path, chat_data: Path, tmp_path: Path
) -> None:
    """Metrics are buffered between checkpoints: a kill anywhere loses only steps the resume redoes and logs."""
    home = tmp_path / "home"
    cfg = _write_cfg(tmp_path / "cfg.yaml", e2e_model, chat_data, tmp_path / "out")
    rng = random.Random()
    checkpoint = rng.choice(range(5, 40, 5))
    proc = start_cli("train", str(cfg), home=home)
    wait_for(tmp_path / "out" / "checkpoints" / f"step-{checkpoint}", proc)
    time.sleep(rng.uniform(0.0, 0.5))  # somewhere between this checkpoint and a later step
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (tmp_path / "out" / "adapter").exists(), "the run finished before it could be killed"

    resumed = start_cli("train", "--resume", only_run_id(home), home=home)
    _out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert adapter_diff(reference, tmp_path / "out" / "adapter") <= 1e-5, f"killed after step-{checkpoint}"
    _assert_every_step_once(tmp_path / "out", home)


def _assert_every_step_once(out: Path, home: Path) -> None:
    """metrics.jsonl and the registry hold each training step once, and each validation once (every 20 steps)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    file_train = Counter(r["step"] for r in rows if "train_loss" in r)
    file_val = Counter(r["step"] for r in rows if "val_loss" in r)
    db = sqlite3.connect(home / "tunelab.db")
    try:
        db_train = Counter(s for (s,) in db.execute("SELECT step FROM metrics WHERE name = 'train_loss'"))
        db_val = Counter(s for (s,) in db.execute("SELECT step FROM metrics WHERE name = 'val_loss'"))
    finally:
        db.close()
    every = Counter(range(1, STEPS + 1))
    assert file_train == every and db_train == every, "each step logged exactly once"
    assert file_val == db_val == Counter([20, 40, 60])


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
