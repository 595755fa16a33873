"""GRPO's bad inputs: a reward function that can't be imported, returns a non-number or raises."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tunelab import services
from tunelab.config.load import load_config
from tunelab.errors import DataError

REWARDS = """
def verdict(completion, example):
    return "yes"  # not a number


def needs_answer(completion, example):
    return float(completion.strip() == example["answer"])  # a record without "answer" raises KeyError
"""


def _config(tmp_path: Path, model: Path, rewards: list[Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return {
        "model": {"path": str(model)},
        "data": {"train": str(data), "max_seq_len": 32},
        "objective": {"name": "grpo", "rewards": rewards, "num_generations": 2, "max_new_tokens": 3},
        "train": {"steps": 2, "batch_size": 2},
        "output_dir": str(tmp_path / "out"),
        "backend": "torch",
        "device": "cpu",
        "tensorboard": False,
    }


SUMS = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]


@pytest.mark.parametrize(
    ("reward", "says"),
    [
        ("no_such_module:score", "could not import 'no_such_module' for reward no_such_module:score"),
        ("rewards_here:missing", "rewards_here has no function 'missing' (reward rewards_here:missing)"),
    ],
)
def test_an_unimportable_reward_is_refused_before_the_model_loads(
    reward: str, says: str, tokenizer_only_model_dir: Path, tmp_path: Path, cli: Callable[..., Any]
) -> None:
    (tmp_path / "rewards_here.py").write_text("def other(completion, example):\n    return 1.0\n", encoding="utf-8")
    config = tmp_path / "grpo.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path, tokenizer_only_model_dir, [reward], SUMS)), encoding="utf-8")
    done = cli("train", config, cwd=tmp_path)  # the model folder has no weights: loading it would fail otherwise
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert says in out and "Traceback" not in out


def test_a_reward_that_returns_a_non_number_names_itself_and_the_example(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rewards_bad.py").write_text(REWARDS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(_config(tmp_path, tiny_model_dir, ["exact_match", "rewards_bad:verdict"], SUMS))
    with pytest.raises(DataError) as info:
        services.start_run(cfg)
    message = str(info.value)
    assert "reward function rewards_bad:verdict returned 'yes' (str), not a number" in message
    assert re.search(r"on the example at \S+train\.jsonl:[12]\b", message), message


def test_a_reward_that_raises_is_a_clear_error_not_a_crash(
    tiny_model_dir: Path, tmp_path: Path, cli: Callable[..., Any]
) -> None:
    (tmp_path / "rewards_bad.py").write_text(REWARDS, encoding="utf-8")
    records = [SUMS[0], {"prompt": "3+3="}]  # line 2 has no answer
    config = tmp_path / "grpo.yaml"
    raw = _config(tmp_path, tiny_model_dir, [{"name": "rewards_bad:needs_answer", "weight": 2}], records)
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    done = cli("train", config, cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 3, out  # a DataError's exit code
    assert "reward function rewards_bad:needs_answer raised KeyError: 'answer'" in out
    assert "train.jsonl:2" in out and "Traceback" not in out


def test_the_api_refuses_rewards_that_import_code(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tunelab.errors import ConfigError

    raw = _config(tmp_path, tiny_model_dir, ["exact_match", "os:system"], SUMS)
    raw.pop("output_dir")
    with pytest.raises(ConfigError, match="module:function rewards run only from the CLI"):
        services.submit_job(load_config(raw), allowed_roots=[tmp_path, tiny_model_dir])
    raw["objective"]["rewards"] = ["exact_match"]
    assert services.submit_job(load_config(raw), allowed_roots=[tmp_path, tiny_model_dir]).status == "queued"
