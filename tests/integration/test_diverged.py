"""A run whose loss or gradient stops being finite ends with the step and what to change, never with NaN weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file
from tests.conftest import run_cli
from tests.integration.conftest import base_config
from tests.integration.runs import only_run_id

pytestmark = pytest.mark.slow


def _train(tmp_path: Path, model: Path, data: Path, *overrides: str) -> tuple[int, str, Path]:
    out = tmp_path / "out"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base_config(model, data, out, steps=8, save_every=1, warmup=0)), encoding="utf-8")
    proc = run_cli("train", cfg, *overrides, home=tmp_path / "home")
    return proc.returncode, proc.stderr, out


def test_alpha_1e308_stops_at_step_1_with_a_hint(e2e_model: Path, chat_data: Path, tmp_path: Path) -> None:
    code, err, out = _train(tmp_path, e2e_model, chat_data, "method.alpha=1e308")
    assert code == 9, err
    assert "training diverged at step 1" in err and "Traceback" not in err
    assert "lower train.lr or method.alpha" in err and "check the data" in err
    assert not (out / "adapter").exists() and not list((out / "checkpoints").glob("step-*"))
    shown = json.loads(run_cli("runs", "show", only_run_id(tmp_path / "home"), "--json", home=tmp_path / "home").stdout)
    assert shown["status"] == "failed" and "diverged at step 1" in shown["error"]


def test_divergence_after_checkpoints_keeps_only_finite_ones(e2e_model: Path, chat_data: Path, tmp_path: Path) -> None:
    """Huge alpha and lr without clipping: a few finite steps (each checkpointed), then a non-finite loss or norm."""
    overrides = ("method.alpha=1e19", "train.lr=1.0", "train.max_grad_norm=0", "train.scheduler=constant")
    code, err, out = _train(tmp_path, e2e_model, chat_data, *overrides)
    assert code == 9, err
    step = int(err.split("training diverged at step ")[1].split(":")[0])
    kept = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert step > 1 and kept and kept[-1] == step - 1, (step, kept)
    for name in kept:
        weights = load_file(str(out / "checkpoints" / f"step-{name}" / "trainable.safetensors"))
        assert all(np.isfinite(w).all() for w in weights.values()), f"step-{name} holds non-finite weights"
    assert not (out / "adapter").exists()
