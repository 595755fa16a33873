"""The user's path through the real CLI: train, find the run again, generate with it; and quickstart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tests.conftest import run_cli
from tests.integration.conftest import base_config

pytestmark = pytest.mark.slow


def test_train_then_runs_show_and_generate(e2e_model: Path, chat_data: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base_config(e2e_model, chat_data, tmp_path / "out", save_every=6, eval_every=6)))
    trained = run_cli("train", str(cfg), "train.steps=12", "method.rank=8", home=home)
    assert trained.returncode == 0, trained.stderr
    assert "completed" in trained.stdout

    runs = json.loads(run_cli("runs", "list", "--json", home=home).stdout)
    assert len(runs) == 1
    run = json.loads(run_cli("runs", "show", runs[0]["id"][:5], "--json", home=home).stdout)
    assert run["id"] == runs[0]["id"]
    assert run["status"] == "completed" and run["backend"] == "torch" and run["device"] == "cpu"
    assert run["config"]["method"]["rank"] == 8  # the override was recorded, not the file's value
    assert run["chat_template"] == "tokenizer"
    for key in ("train_loss", "val_loss", "tokens_per_sec"):
        assert isinstance(run["metrics"][key], float)
    assert run["artifacts"]["adapter"] == str(tmp_path / "out" / "adapter")
    assert run["artifacts"]["checkpoints"] == [str(tmp_path / "out" / "checkpoints" / "step-6")]
    assert (tmp_path / "out" / "metrics.jsonl").is_file()

    generated = run_cli("generate", "--run", run["id"], "List: tea, rice", "--max-new-tokens", "12", home=home)
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.strip()

    again = run_cli("train", str(cfg), home=home)
    assert again.returncode != 0 and "already holds a run" in again.stderr and "Traceback" not in again.stderr


def test_quickstart_runs_offline(tmp_path: Path) -> None:
    result = run_cli(
        "quickstart", "--model", "tiny", "--workdir", str(tmp_path / "qs"), "--steps", "12", home=tmp_path / "home"
    )
    assert result.returncode == 0, result.stderr
    assert "held-out prompt" in result.stdout and "after LoRA fine-tune" in result.stdout
    runs = json.loads(run_cli("runs", "list", "--json", home=tmp_path / "home").stdout)
    assert sorted(r["name"] for r in runs) == ["quickstart-base", "quickstart-lora"]
    assert all(r["status"] == "completed" for r in runs)
