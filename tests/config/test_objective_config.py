"""``objective:`` for preference fine-tuning: names, knobs with their defaults and ranges, and the data it needs."""

from __future__ import annotations

import pytest

from tunelab.config.load import load_config
from tunelab.errors import ConfigError

BASE = {"model": {"path": "some/model"}, "data": {"train": "train.jsonl"}}


def _error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(BASE, list(overrides))
    return str(info.value)


@pytest.mark.parametrize(
    ("name", "beta", "gamma", "alpha"),
    [
        ("sft", None, None, None),
        ("dpo", 0.1, None, None),
        ("ipo", 0.1, None, None),
        ("kto", 0.1, None, None),
        ("simpo", 2.0, 0.5, None),
        ("orpo", None, None, 0.1),
    ],
)
def test_each_objective_gets_the_defaults_of_the_knobs_it_reads(
    name: str, beta: float | None, gamma: float | None, alpha: float | None
) -> None:
    objective = load_config(BASE, [f"objective.name={name}"]).objective
    assert (objective.beta, objective.gamma, objective.alpha) == (beta, gamma, alpha)
    # What the registry stores loads back to the same config.
    assert load_config(load_config(BASE, [f"objective.name={name}"]).to_dict()).objective == objective


def test_knobs_are_set_and_bounded() -> None:
    objective = load_config(BASE, ["objective.name=simpo", "objective.beta=2.5", "objective.gamma=1.2"]).objective
    assert (objective.beta, objective.gamma) == (2.5, 1.2)
    assert "objective.beta" in _error("objective.name=dpo", "objective.beta=0")
    assert "objective.gamma" in _error("objective.name=simpo", "objective.gamma=-1")
    assert "objective.alpha" in _error("objective.name=orpo", "objective.alpha=1000")


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["objective.beta=0.2"], "beta is for objective.name dpo, ipo, kto, simpo or grpo (got name: sft)"),
        (["objective.name=dpo", "objective.alpha=0.5"], "alpha is for objective.name orpo"),
        (["objective.name=dpo", "objective.gamma=0.5"], "gamma is for objective.name simpo"),
        (["objective.name=kto", "objective.precompute_ref=true"], "precompute_ref is for dpo and ipo"),
        (["objective.name=simpo", "objective.precompute_ref=true"], "precompute_ref is for dpo and ipo"),
    ],
)
def test_a_knob_the_objective_does_not_read_is_refused(overrides: list[str], says: str) -> None:
    assert says in _error(*overrides)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["objective.name=dpo", "data.format=chat"], "objective dpo trains on data format preference (got chat)"),
        (["objective.name=kto", "data.format=preference"], "objective kto trains on data format kto"),
        (["data.format=preference"], "data format preference trains with objective.name dpo, ipo, orpo, simpo"),
        (["data.format=kto"], "data format kto trains with objective.name kto (got sft)"),
        (["objective.name=orpo", "data.mask_prompt=false"], "scores only the responses"),
        (["objective.name=ipo", "data.train_on=everything"], "scores only the responses"),
    ],
)
def test_the_objective_and_the_data_format_must_agree(overrides: list[str], says: str) -> None:
    assert says in _error(*overrides)


def test_a_preference_objective_with_auto_or_its_own_format_loads() -> None:
    assert load_config(BASE, ["objective.name=dpo"]).data.format == "auto"
    assert load_config(BASE, ["objective.name=dpo", "data.format=preference"]).objective.name == "dpo"
    assert load_config(BASE, ["objective.name=kto", "data.format=kto"]).objective.name == "kto"
    assert load_config(BASE, ["objective.name=dpo", "objective.precompute_ref=true"]).objective.precompute_ref
