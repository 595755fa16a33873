"""LoRA trains and saves on the architecture families people fine-tune, and on sharded checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tests.integration.conftest import base_config, tiny_model_from

from tunelab import services
from tunelab.config.load import load_config


@pytest.mark.parametrize(
    ("arch", "tokenizer", "shard"),
    [
        ("qwen2", "bpe", None),
        ("mistral", "sentencepiece", None),
        ("gemma", "bpe", None),
        ("phi3", "tiktoken", None),
        ("qwen3", "bpe", "60KB"),
    ],
)
def test_lora_on_architecture(arch: str, tokenizer: str, shard: str | None, chat_data: Path, tmp_path: Path) -> None:
    model = tiny_model_from(chat_data, tmp_path / "model", arch=arch, tokenizer=tokenizer, max_shard_size=shard)
    if shard:
        assert (model / "model.safetensors.index.json").is_file()
    cfg = load_config(base_config(model, chat_data, tmp_path / "out", steps=3))
    outcome = services.start_run(cfg)
    assert outcome.status == "completed"
    val = outcome.metrics["val_loss"]
    assert val is not None and math.isfinite(val)
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["base_model_name_or_path"] == str(model)
