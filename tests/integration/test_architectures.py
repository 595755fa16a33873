"""LoRA trains and saves on the architecture families people fine-tune, and on sharded checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tests.integration.conftest import base_config

from tunelab import services
from tunelab.config.load import load_config


def _texts(chat_data: Path) -> list[str]:
    lines = (chat_data / "train.jsonl").read_text(encoding="utf-8").splitlines()
    return [m["content"] for line in lines for m in json.loads(line)["messages"]] * 3


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
    from tunelab.tiny import make_tiny_checkpoint

    model = make_tiny_checkpoint(
        tmp_path / "model",
        _texts(chat_data),
        arch=arch,
        tokenizer=tokenizer,
        vocab_size=400,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        max_shard_size=shard,
    )
    if shard:
        assert (model / "model.safetensors.index.json").is_file()
    cfg = load_config(base_config(model, chat_data, tmp_path / "out", steps=3))
    outcome = services.start_run(cfg)
    assert outcome.status == "completed"
    val = outcome.metrics["val_loss"]
    assert val is not None and math.isfinite(val)
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["base_model_name_or_path"] == str(model)
