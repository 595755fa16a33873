"""Fixtures for end-to-end tests: a small chat dataset and a tiny model trained on the spot."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

ITEMS = [
    "apples",
    "bread",
    "butter",
    "cheese",
    "coffee",
    "eggs",
    "flour",
    "honey",
    "jam",
    "milk",
    "oats",
    "pears",
    "rice",
    "salt",
    "sugar",
    "tea",
]


def _conversation(rng: random.Random) -> dict:
    xs = rng.sample(ITEMS, rng.randint(2, 4))
    return {
        "messages": [
            {"role": "system", "content": "You write lists."},
            {"role": "user", "content": f"List: {', '.join(xs)}"},
            {"role": "assistant", "content": "\n".join(f"- {x}" for x in xs)},
        ]
    }


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with train.jsonl (120) and valid.jsonl (24) chat examples."""
    root = tmp_path_factory.mktemp("chat-data")
    rng = random.Random(0)
    rows = [_conversation(rng) for _ in range(144)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:120]), encoding="utf-8")
    (root / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[120:]), encoding="utf-8")
    return root


def tiny_model_from(chat_data: Path, out: Path, **kwargs: object) -> Path:
    """A tiny checkpoint (any arch/tokenizer form) whose tokenizer is trained on the chat data."""
    from tunelab.tiny import make_tiny_checkpoint

    lines = (chat_data / "train.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [m["content"] for line in lines for m in json.loads(line)["messages"]] * 3
    sizes = {"vocab_size": 400, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1}
    return make_tiny_checkpoint(out, texts, **{**sizes, "intermediate_size": 64, **kwargs})  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def e2e_model(tmp_path_factory: pytest.TempPathFactory, chat_data: Path) -> Path:
    """A tiny Llama-shaped checkpoint whose BPE tokenizer was trained on the chat data."""
    from tunelab.tiny import make_tiny_checkpoint

    texts = []
    for line in (chat_data / "train.jsonl").read_text(encoding="utf-8").splitlines():
        texts.extend(m["content"] for m in json.loads(line)["messages"])
    out = tmp_path_factory.mktemp("e2e-model") / "model"
    return make_tiny_checkpoint(
        out,
        texts * 4,
        arch="llama",
        vocab_size=320,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        seed=0,
    )


def base_config(model: Path, data: Path, out: Path, **train: object) -> dict:
    """A small but real config; tests override what they exercise."""
    return {
        "model": {"path": str(model)},
        "data": {"train": str(data), "max_seq_len": 128},
        "method": {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.1},
        "train": {"steps": 12, "batch_size": 8, "lr": 5e-3, "warmup": 2, "seed": 3, **train},
        "output_dir": str(out),
        "tensorboard": False,
    }
