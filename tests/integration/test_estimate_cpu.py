"""`tunelab estimate` and `train.batch_size: auto` end to end on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tests.conftest import run_cli
from tests.integration.conftest import base_config

from tunelab.memory.plan import PLAN_FILE

pytestmark = pytest.mark.slow


def test_estimate_prints_the_breakdown_and_a_verdict(e2e_model: Path, chat_data: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base_config(e2e_model, chat_data, tmp_path / "out")))
    shown = run_cli("estimate", str(cfg), "train.gradient_checkpointing=true", home=tmp_path)
    assert shown.returncode == 0, shown.stderr
    for label in ("weights", "optimizer state", "activations", "logits & loss", "runtime", "total", "fits"):
        assert label in shown.stdout
    assert "gradient checkpointing" in shown.stdout

    report = json.loads(run_cli("estimate", str(cfg), "--json", home=tmp_path).stdout)
    lines = report["estimate"]["lines"]
    assert sum(line["bytes"] for line in lines) == report["estimate"]["total_bytes"]
    assert report["fits"] is True and report["budget"]["source"] == "system RAM"

    small = run_cli("estimate", str(cfg), "--memory", "100MB", home=tmp_path)
    assert small.returncode == 0 and "does not fit" in small.stdout and "gradient_checkpointing" in small.stdout
    wrong = run_cli("estimate", str(cfg), "method.targets=[query]", home=tmp_path)
    assert wrong.returncode == 2 and "method.targets" in wrong.stderr and "Traceback" not in wrong.stderr


def test_auto_batch_trains_with_the_effective_batch_and_records_the_estimate(
    e2e_model: Path, chat_data: Path, tmp_path: Path
) -> None:
    from tunelab import services
    from tunelab.config.load import load_config

    raw = base_config(e2e_model, chat_data, tmp_path / "out", steps=3)
    raw["train"].update(batch_size="auto", effective_batch_size=12)
    outcome = services.start_run(load_config(raw))
    assert outcome.status == "completed"

    plan = json.loads((tmp_path / "out" / PLAN_FILE).read_text())
    assert plan["auto"] and plan["batch_size"] * plan["grad_accum"] == 12
    assert plan["batch_size"] == 12  # a tiny model: the whole effective batch fits in one micro-batch
    from tunelab.registry import repo
    from tunelab.registry.db import open_registry, session_scope

    with session_scope(open_registry()) as s:
        row = repo.get_run(s, outcome.run_id)
        assert row.estimated_memory_bytes == plan["estimate"]["total_bytes"]
        assert row.peak_memory_bytes is not None
    shown = services.show_run(outcome.run_id)
    assert shown["estimated_memory_bytes"] == plan["estimate"]["total_bytes"]
    # One config per run: the registry holds the one it trained with (batch settled), and a resume
    # takes that one; the run folder keeps the config as written.
    trained = shown["config"]["train"]
    assert (trained["batch_size"], trained["grad_accum"], trained["effective_batch_size"]) == (12, 1, None)
    written = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert (written["train"]["batch_size"], written["train"]["effective_batch_size"]) == ("auto", 12)


def test_auto_batch_with_too_little_memory_says_what_to_change(tmp_path: Path) -> None:
    from tunelab.config.load import load_config
    from tunelab.errors import ConfigError
    from tunelab.memory.plan import estimate_config

    model = tmp_path / "m"
    model.mkdir()
    llama = {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    }
    (model / "config.json").write_text(json.dumps(llama))
    cfg = load_config(
        {"model": {"path": str(model)}, "data": {"train": "x", "max_seq_len": 2048}, "train": {"batch_size": "auto"}}
    )
    with pytest.raises(ConfigError, match="even one sequence needs about") as err:
        estimate_config(cfg, device="cuda", budget_bytes=24 * 2**30)
    assert "gradient_checkpointing" in str(err.value.hint)
    fits = estimate_config(cfg, device="cuda", budget_bytes=80 * 2**30)
    assert fits.batch_size * fits.grad_accum == 4 and fits.fits
