"""Every shipped example config is valid and trains (two steps, on a tiny model and matching data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunelab import services
from tunelab.config.load import load_config

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))

RECORDS = {
    "text": {"text": "Anna bought milk and bread at the market."},
    "completion": {"prompt": "List: milk, eggs\n", "completion": "- milk\n- eggs"},
    "instruction": {"instruction": "Make a list", "input": "milk, eggs", "output": "- milk\n- eggs"},
    "chat": {"messages": [{"role": "user", "content": "List: milk"}, {"role": "assistant", "content": "- milk"}]},
    "preference": {"prompt": "List: milk, eggs\n", "chosen": "- milk\n- eggs", "rejected": "eggs milk"},
    "grpo": {"prompt": "2+3=", "answer": "5"},
}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_trains(example: Path, e2e_model: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(example.read_text(encoding="utf-8"))
    fmt = raw["data"]["format"]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(RECORDS[fmt]) + "\n" for _ in range(8)), encoding="utf-8")
    raw["model"]["path"] = str(e2e_model)
    raw["data"].update(train=str(data), valid=None, max_seq_len=64)
    raw["train"].pop("epochs", None)
    raw["train"].update(steps=2, batch_size=2, grad_accum=1, save_every=0, eval_every=0)
    raw["output_dir"] = str(tmp_path / "out")
    if raw["method"]["name"] == "freeze":
        raw["method"]["layers"] = 1
    outcome = services.start_run(load_config(raw))
    assert outcome.status == "completed" and outcome.result_dir is not None and outcome.result_dir.is_dir()


def test_examples_exist() -> None:
    assert {p.stem for p in EXAMPLES} >= {"lora-chat", "dora-instruction", "full-completion", "freeze-text"}
    assert "dpo-preferences" in {p.stem for p in EXAMPLES}


def test_the_shipped_preference_data_is_valid() -> None:
    from tunelab.data.validate import validate_dataset

    report = validate_dataset(str(Path(__file__).parents[2] / "examples" / "data" / "preferences"))
    assert report["format"] == "preference"
    assert report["splits"]["train"]["records"] >= 32 and report["splits"]["valid"]["records"] >= 8
    assert report["splits"]["train"]["duplicates"]["count"] == 0
