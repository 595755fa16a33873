"""``objective.name: grpo``: its knobs and defaults, what it refuses, and the grpo data format's records."""

from __future__ import annotations

import pytest

from tunelab.config.load import load_config
from tunelab.data.formats import detect_format, to_sample
from tunelab.data.sources import Record
from tunelab.errors import ConfigError, DataError

BASE = {"model": {"path": "some/model"}, "data": {"train": "train.jsonl"}}
GRPO = ["objective.name=grpo"]


def _grpo(**objective: object) -> dict:
    return {**BASE, "objective": {"name": "grpo", "rewards": ["exact_match"], **objective}}


def _error(raw: dict, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(raw, list(overrides))
    return str(info.value)


def test_grpo_defaults_and_the_short_form_of_rewards() -> None:
    o = load_config(_grpo(rewards=["exact_match", {"name": "my_rewards:correct", "weight": 2}])).objective
    assert (o.beta, o.num_generations, o.max_new_tokens, o.temperature, o.epsilon) == (0.04, 8, 64, 1.0, 0.2)
    assert [(r.name, r.weight, r.label) for r in o.rewards or []] == [
        ("exact_match", 1.0, "exact_match"),
        ("my_rewards:correct", 2.0, "correct"),
    ]
    assert load_config(_grpo(beta=0)).objective.beta == 0  # no KL, no reference forward
    stored = load_config(_grpo())
    assert load_config(stored.to_dict()) == stored  # what the registry stores loads back


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ({**BASE, "objective": {"name": "grpo"}}, "objective grpo needs objective.rewards"),
        (_grpo(rewards=["exact match"]), "reward 'exact match' is neither a built-in"),
        (_grpo(rewards=[{"name": "regex_match", "pattern": "(("}]), "is not a regular expression"),
        ({**BASE, "objective": {"name": "dpo", "num_generations": 4}}, "num_generations is for objective.name grpo"),
        ({**BASE, "objective": {"name": "sft", "rewards": ["json_valid"]}}, "rewards is for objective.name grpo"),
        ({**BASE, "objective": {"name": "dpo", "beta": 0}}, "objective.beta must be greater than 0 for dpo"),
        ({**_grpo(), "method": {"name": "prefix"}}, "objective grpo can't train method prefix"),
        ({**_grpo(), "train": {"batch_size": "auto"}}, "objective grpo takes a fixed train.batch_size"),
        ({**_grpo(), "data": {"train": "t.jsonl", "format": "chat"}}, "objective grpo trains on data format grpo"),
        ({**BASE, "data": {"train": "t.jsonl", "format": "grpo"}}, "data format grpo trains with objective.name grpo"),
        (_grpo(num_generations=1), "objective.num_generations"),
    ],
)
def test_what_grpo_refuses(raw: dict, says: str) -> None:
    assert says in _error(raw)


def _record(data: dict, line: int = 7) -> Record:
    return Record(data, "prompts.jsonl", line)


def test_grpo_records() -> None:
    assert detect_format(_record({"prompt": "2+2=", "answer": "4"})) == "grpo"
    assert to_sample(_record({"prompt": "2+2=", "answer": "4"}), "grpo").prompt == "2+2="
    chat = to_sample(_record({"messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "2+2?"}]}), "grpo")  # fmt: skip
    assert chat.kind == "prompt" and [m["role"] for m in chat.messages] == ["system", "user"]


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"prompt": "   ", "answer": "4"}, 'field "prompt" is empty'),
        ({"answer": "4", "messages": "hi"}, 'missing field "prompt" (text or messages) or "messages"'),
        (
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
            '"messages" ends with an assistant message; grpo samples the assistant\'s reply',
        ),
        ({"prompt": [{"role": "robot", "content": "x"}]}, "prompt[0]: role 'robot' is not one of"),
    ],
)
def test_bad_grpo_records_name_their_line(data: dict, says: str) -> None:
    with pytest.raises(DataError) as info:
        to_sample(_record(data), "grpo")
    assert says in str(info.value) and "prompts.jsonl:7" in str(info.value)


def test_the_editor_schema_takes_the_example_and_the_short_form() -> None:
    from pathlib import Path

    import jsonschema
    import yaml

    from tunelab.config.editor import json_schema

    raw = yaml.safe_load((Path(__file__).parents[2] / "examples" / "grpo-sums.yaml").read_text(encoding="utf-8"))
    raw["objective"]["rewards"].append("my_rewards:correct")
    jsonschema.validate(raw, json_schema())
    raw["objective"]["rewards"].append({"name": "exact_match", "wieght": 2})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(raw, json_schema())
