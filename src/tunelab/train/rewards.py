"""GRPO's reward functions: the built-ins, the user's own (``module:function``), and calling them safely.

A reward function takes the completion's text and the example it answers (the data record's fields:
``prompt`` or ``messages``, and whatever else it holds, e.g. ``answer``) and returns a number::

    def correct(completion: str, example: dict) -> float: ...

A function that can't be imported is a config error before the model loads; one that raises or returns
something other than a finite number is a clear error naming the function and the example (file and
line), raised between steps, so the run keeps its last checkpoint instead of crashing mid-step.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.config.schema import RewardCfg
from tunelab.errors import ConfigError, DataError

RewardFn = Callable[[str, Mapping[str, Any]], Any]


@dataclass(frozen=True)
class Reward:
    """A resolved reward function, its weight and the name its metrics use (``reward/<label>``)."""

    name: str
    label: str
    weight: float
    fn: RewardFn


def resolve_rewards(configs: Sequence[RewardCfg]) -> list[Reward]:
    """Each reward's function, imported now (before the model loads); labels made unique for the metrics."""
    out: list[Reward] = []
    seen: dict[str, int] = {}
    for cfg in configs:
        fn = _builtin(cfg) if ":" not in cfg.name else _import(cfg.name)
        seen[cfg.label] = seen.get(cfg.label, 0) + 1
        label = cfg.label if seen[cfg.label] == 1 else f"{cfg.label}_{seen[cfg.label]}"
        out.append(Reward(cfg.name, label, cfg.weight, fn))
    return out


def _import(spec: str) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    here = str(Path.cwd())
    if here not in sys.path:  # a rewards file beside the config, as `python -m` would find it
        sys.path.append(here)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of the user's module is theirs to fix
        raise ConfigError(
            f"objective.rewards: could not import {module_name!r} for reward {spec} ({type(exc).__name__}: {exc})",
            hint="the module must be importable from the current folder, PYTHONPATH or an installed package",
        ) from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ConfigError(
            f"objective.rewards: {module_name} has no function {attr!r} (reward {spec})",
            hint="name a function defined in that module: def reward(completion: str, example: dict) -> float",
        )
    return function  # type: ignore[no-any-return]


def score(rewards: Sequence[Reward], completions: Sequence[str], examples: Sequence[Mapping[str, Any]],
          where: Sequence[str]) -> np.ndarray:  # fmt: skip
    """Every reward of every completion, ``(rows, rewards)`` float64; ``where[i]`` names example ``i`` (file:line)."""
    out = np.zeros((len(completions), len(rewards)), dtype=np.float64)
    for j, reward in enumerate(rewards):
        for i, (text, example) in enumerate(zip(completions, examples, strict=True)):
            out[i, j] = _call(reward, text, example, where[i])
    return out


def _call(reward: Reward, text: str, example: Mapping[str, Any], where: str) -> float:
    try:
        value = reward.fn(text, example)
    except Exception as exc:
        raise DataError(
            f"reward function {reward.name} raised {type(exc).__name__}: {exc} on the example at {where} "
            f"(completion {_short(text)})",
            hint="fix the function (it must return a number for any completion) or the example's fields",
        ) from exc
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise DataError(
            f"reward function {reward.name} returned {_clip(repr(value))} ({type(value).__name__}), not a number, "
            f"on the example at {where}",
            hint="a reward function returns an int or a float for every completion",
        )
    if not math.isfinite(float(value)):
        raise DataError(f"reward function {reward.name} returned {value} on the example at {where}",
                        hint="a reward must be a finite number")  # fmt: skip
    return float(value)


def _short(text: str) -> str:
    return repr(_clip(text))


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


# --- built-ins --------------------------------------------------------------------------------------------------


def _builtin(cfg: RewardCfg) -> RewardFn:
    """The built-in named by ``cfg`` with its options bound (the schema has checked the name)."""
    if cfg.name == "exact_match":
        return lambda text, example: float(text.strip() == _field(example, cfg.field).strip())
    if cfg.name == "regex_match":
        fixed = re.compile(cfg.pattern) if cfg.pattern is not None else None

        def regex(text: str, example: Mapping[str, Any]) -> float:
            pattern = fixed if fixed is not None else re.compile(_field(example, cfg.field))
            return float(pattern.fullmatch(text.strip()) is not None)

        return regex
    if cfg.name == "json_valid":
        return lambda text, example: float(_is_json(text))
    # length_penalty: -1 at `limit` characters and beyond, 0 for an empty completion.
    return lambda text, example: -min(len(text), cfg.limit) / cfg.limit


def _field(example: Mapping[str, Any], key: str) -> str:
    if key not in example:
        raise KeyError(f'the example has no field "{key}" (set the reward\'s field: to the one it has)')
    return str(example[key])


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
