"""Fixtures for the hardening tests: a small chat dataset and a config that trains on the tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "fast", "big", "red", "house", "tree", "river"]


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``train.jsonl`` with 64 short chat examples."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("hardening-data") / "train.jsonl"
    rows = []
    for _ in range(64):
        words = rng.sample(WORDS, 4)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": " ".join(words)},
                    {"role": "assistant", "content": " ".join(reversed(words))},
                ]
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def train_config(model: Path, data: Path, out: Path, **train: Any) -> dict[str, Any]:
    """A real config that trains in seconds on CPU; ``train`` overrides the ``train:`` section."""
    return {
        "model": {"path": str(model)},
        "data": {"train": str(data), "max_seq_len": 64, "num_proc": 1},
        "method": {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.1},
        "train": {"steps": 8, "batch_size": 4, "lr": 5e-3, "seed": 1, "compile": False, **train},
        "output_dir": str(out),
        "tensorboard": False,
    }


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path
