"""``objective:``: what the loss optimizes (SFT, a preference objective, or GRPO with its reward functions).

Part of the run config's public contract (see :mod:`tunelab.config.schema`).  Every knob belongs to some
objectives; a knob set for another objective is refused with a message, never ignored, and each knob's
default depends on the objective, so it is filled in after validation.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunelab.vocab import REWARD_BUILTINS, ObjectiveName


class Section(BaseModel):
    """A config section: unknown keys refused, frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# ``package.module:function`` (what a reward names when it is not a built-in).
_IMPORTABLE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


class RewardCfg(Section):
    """One GRPO reward function and its weight; written as a name alone or as a mapping."""

    name: str = Field(description=f"a built-in ({', '.join(REWARD_BUILTINS)}) or an importable module:function")
    weight: float = Field(1.0, ge=-1000, le=1000, description="its share of the reward: Σ weight × reward")
    field: str = Field("answer", min_length=1, description="exact_match, regex_match: the example field compared")
    pattern: str | None = Field(None, description="regex_match: the pattern (default: the example's field)")
    limit: int = Field(1000, ge=1, le=1_000_000, description="length_penalty: characters that cost the whole -1")

    @field_validator("name")
    @classmethod
    def _importable(cls, v: str) -> str:
        if v in REWARD_BUILTINS or _IMPORTABLE.match(v):
            return v
        raise ValueError(
            f"reward {v!r} is neither a built-in ({', '.join(REWARD_BUILTINS)}) nor a module:function name "
            "(e.g. my_rewards:correct)"
        )

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"pattern {v!r} is not a regular expression ({exc})") from None
        return v

    @property
    def label(self) -> str:
        """The name metrics use (``reward/<label>``): a built-in's name, or the function's."""
        return self.name.rsplit(":", 1)[-1]


class ObjectiveCfg(Section):
    """``objective:`` what the loss optimizes: SFT, a preference objective, or GRPO with reward functions."""

    name: ObjectiveName = Field(
        "sft",
        description="sft: token-weighted cross-entropy over the supervised (completion/assistant) tokens; "
        "dpo, ipo, orpo, simpo: prefer the chosen over the rejected response of each pair (data format "
        "preference); kto: raise desirable and lower undesirable completions (data format kto); grpo: sample "
        "num_generations completions per prompt and raise those the reward functions score above their "
        "group's mean (data format grpo)",
    )
    beta: float | None = Field(
        None,
        ge=0,
        le=100,
        description="dpo/ipo/kto: the temperature of the implicit reward against the reference model (default "
        "0.1); simpo: the reward scale (default 2.0); grpo: the weight of the KL penalty to the reference model "
        "(default 0.04; 0 = no reference model)",
    )
    gamma: float | None = Field(None, ge=0, le=100, description="simpo: the target reward margin (default 0.5)")
    alpha: float | None = Field(None, gt=0, le=100, description="orpo: the odds-ratio loss weight λ (default 0.1)")
    precompute_ref: bool = Field(
        False,
        description="dpo/ipo: the reference model's log-probs computed once before training instead of a "
        "reference forward every step (full and freeze then keep no frozen copy of the model)",
    )
    rewards: list[RewardCfg] | None = Field(
        None,
        max_length=16,
        description="grpo: the reward functions, each a built-in name or module:function, optionally "
        "{name, weight}; a completion's reward is Σ weight × reward",
        json_schema_extra=lambda schema: _names_too(schema),
    )
    num_generations: int | None = Field(
        None, ge=2, le=1024, description="grpo: completions sampled per prompt (a group; default 8)"
    )
    max_new_tokens: int | None = Field(None, ge=1, le=32_768, description="grpo: longest completion (default 64)")
    temperature: float | None = Field(None, gt=0, le=10, description="grpo: sampling temperature (default 1.0)")
    epsilon: float | None = Field(
        None, gt=0, lt=1, description="grpo: the policy ratio is clipped to [1 - epsilon, 1 + epsilon] (default 0.2)"
    )

    @field_validator("rewards", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        # `rewards: [exact_match, my_mod:fn]` is the short form of `[{name: exact_match}, …]`.
        if isinstance(v, list):
            return [{"name": item} if isinstance(item, str) else item for item in v]
        return v

    @model_validator(mode="after")
    def _knobs(self) -> ObjectiveCfg:
        # A knob another objective reads is almost surely a forgotten objective.name: said, never ignored.
        for knob, names in USES.items():
            if getattr(self, knob) is not None and self.name not in names:
                raise ValueError(
                    f"{knob} is for objective.name {_either(names)} (got name: {self.name}); "
                    f"remove objective.{knob} or change objective.name"
                )
        if self.beta == 0 and self.name != "grpo":
            raise ValueError(f"objective.beta must be greater than 0 for {self.name} (0 turns off grpo's KL only)")
        if self.precompute_ref and self.name not in ("dpo", "ipo"):
            why = "kto scores mismatched pairs formed per batch" if self.name == "kto" else "it has no reference"
            raise ValueError(f"precompute_ref is for dpo and ipo ({self.name}: {why}); remove it")
        if self.name == "grpo" and not self.rewards:
            raise ValueError(
                "objective grpo needs objective.rewards: at least one reward function "
                f"({', '.join(REWARD_BUILTINS)}, or module:function)"
            )
        defaults: dict[str, Any] = {**DEFAULTS, "beta": 2.0 if self.name == "simpo" else DEFAULTS["beta"]}
        if self.name == "grpo":
            defaults["beta"] = 0.04
        for knob, names in USES.items():
            if getattr(self, knob) is None and self.name in names and knob in defaults:
                object.__setattr__(self, knob, defaults[knob])  # name-dependent default; frozen after this
        return self


USES: dict[str, tuple[str, ...]] = {
    "beta": ("dpo", "ipo", "kto", "simpo", "grpo"),
    "gamma": ("simpo",),
    "alpha": ("orpo",),
    "rewards": ("grpo",),
    "num_generations": ("grpo",),
    "max_new_tokens": ("grpo",),
    "temperature": ("grpo",),
    "epsilon": ("grpo",),
}
"""Which objectives read each knob."""
DEFAULTS: dict[str, Any] = {
    "beta": 0.1,
    "gamma": 0.5,
    "alpha": 0.1,
    "num_generations": 8,
    "max_new_tokens": 64,
    "temperature": 1.0,
    "epsilon": 0.2,
}


def _names_too(schema: dict[str, Any]) -> None:
    """Editors' JSON Schema: a reward may be written as its name alone (the short form ``_names`` accepts)."""
    for branch in schema.get("anyOf", [schema]):
        items = branch.get("items")
        if isinstance(items, dict) and "$ref" in items:
            branch["items"] = {"anyOf": [{"type": "string"}, items]}


def _either(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
