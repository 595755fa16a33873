"""The adapter tunelab saves is PEFT's format, and PEFT + transformers reproduce tunelab's val loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.integration.conftest import base_config, tiny_model_from
from tests.integration.runs import reference_val_loss

from tunelab import services
from tunelab.config.load import load_config


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prefix"])
def test_peft_reload_reproduces_val_loss(method: str, e2e_model: Path, chat_data: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    raw = base_config(e2e_model, chat_data, tmp_path / "run", eval_every=6)
    raw["method"]["name"] = method
    cfg = load_config(raw)
    outcome = services.start_run(cfg)
    adapter = outcome.result_dir
    assert outcome.status == "completed" and adapter is not None
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] in {"LORA", "IA3", "PREFIX_TUNING"}

    reported = services.show_run(outcome.run_id)["metrics"]["val_loss"]
    base = AutoModelForCausalLM.from_pretrained(str(e2e_model), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    measured = reference_val_loss(peft_model, adapter, cfg.data)
    assert abs(measured - reported) / reported < 1e-3, (measured, reported)


def test_full_finetune_saves_a_loadable_model(e2e_model: Path, chat_data: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    raw = base_config(e2e_model, chat_data, tmp_path / "run", steps=4)
    raw["method"] = {"name": "freeze", "layers": 1}
    outcome = services.start_run(load_config(raw))
    assert outcome.result_dir is not None and outcome.result_dir.name == "model"
    model = AutoModelForCausalLM.from_pretrained(str(outcome.result_dir))
    measured = reference_val_loss(model, outcome.result_dir, load_config(raw).data)
    reported = services.show_run(outcome.run_id)["metrics"]["val_loss"]
    assert abs(measured - reported) / reported < 1e-3


def test_softcapped_logits_match_transformers(chat_data: Path, tmp_path: Path) -> None:
    """Gemma-2 soft-caps its logits; the loss that skips unsupervised positions must do the same."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_from(chat_data, tmp_path / "gemma2", arch="gemma2")
    assert json.loads((model_dir / "config.json").read_text()).get("final_logit_softcapping")
    cfg = load_config(base_config(model_dir, chat_data, tmp_path / "run", steps=4))
    outcome = services.start_run(cfg)
    reported = services.show_run(outcome.run_id)["metrics"]["val_loss"]
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    measured = reference_val_loss(
        PeftModel.from_pretrained(base, str(outcome.result_dir)), outcome.result_dir, cfg.data
    )
    assert abs(measured - reported) / reported < 1e-3, (measured, reported)
