"""What a sweep searches: Hydra's multirun grammar read by Hydra's own parser, checked before anything is queued.

``train.lr=1e-4,3e-4`` and ``method.rank=choice(8,16)`` are lists, ``range(8,33,8)`` a list of numbers
(stop excluded, as in Python), ``interval(1e-5,1e-2)`` a continuous range for ``--search optuna``
(``tag(log, interval(…))`` samples it on a log scale, ``int(interval(4,64))`` whole numbers).  Any
other ``key=value`` is an ordinary override applied to every trial.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from typing import Any

from tunelab.errors import ConfigError

SEARCHES = ("grid", "optuna")
DIRECTIONS = ("minimize", "maximize")
TRAIN_METRICS = ("train_loss", "lr", "grad_norm", "epoch", "tokens_per_sec", "step_tokens_per_sec")
VALID_METRICS = ("val_loss", "val_ppl")
_SWEEP_SIGNS = (",", "range(", "interval(", "choice(", "glob(", "tag(")

Space = dict[str, dict[str, Any]]
"""``{key: {"kind": "choice", "values": [...]}}`` or ``{key: {"kind": "interval", "low", "high", "log", "int"}}``."""


def parse_space(items: Sequence[str]) -> tuple[Space, list[str]]:
    """Split command-line items into the searched keys (the space) and fixed overrides."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.core.override_parser.types import IntervalSweep
        from hydra.errors import HydraException
    except ImportError:
        raise ConfigError("sweeps need Hydra's override parser", hint='pip install "tunelab[sweep]"') from None
    parser = OverridesParser.create()
    space: Space = {}
    fixed: list[str] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{item!r} is not of the form key=values (e.g. train.lr=1e-4,3e-4)")
        if not text.strip():
            raise ConfigError(f"{key}: the value list is empty; give values such as {key}=a,b or range(…)")
        try:
            override = parser.parse_override(item)
        except HydraException as exc:
            if any(sign in text for sign in _SWEEP_SIGNS):
                raise ConfigError(f"{item}: {str(exc).strip().splitlines()[0]}") from None
            fixed.append(item)  # a plain value Hydra's grammar can't read (a path with spaces): tunelab's own parser
            continue
        if not override.is_sweep_override():
            fixed.append(item)
            continue
        if key in space:
            raise ConfigError(f"{key} is swept twice; give all its values in one list")
        value = override.value()
        if isinstance(value, IntervalSweep):
            low, high = value.start, value.end
            if low is None or high is None or not low < high:
                raise ConfigError(f"{key}: interval(low, high) needs low < high (got {low}, {high})")
            whole = isinstance(low, int) and isinstance(high, int)
            space[key] = {"kind": "interval", "low": low, "high": high, "log": "log" in value.tags, "int": whole}
            continue
        values = list(override.sweep_iterator())
        if not values:
            raise ConfigError(f"{key}: the value list is empty ({text}); give at least one value")
        space[key] = {"kind": "choice", "values": values}
    if not space:
        raise ConfigError("nothing to sweep: give at least one key with several values, e.g. train.lr=1e-4,3e-4")
    return space, fixed


def check_search(space: Space, search: str, trials: int | None, direction: str) -> int:
    """How many trials the sweep has; a search, direction or count that can't work is a ConfigError."""
    if search not in SEARCHES:
        raise ConfigError(f"--search must be one of {', '.join(SEARCHES)} (got {search!r})")
    if direction not in DIRECTIONS:
        raise ConfigError(f"--direction must be minimize or maximize (got {direction!r})")
    if search == "grid":
        ranges = [k for k, dim in space.items() if dim["kind"] == "interval"]
        if ranges:
            raise ConfigError(
                f"{ranges[0]}: interval() is a continuous range, which a grid can't enumerate",
                hint="use --search optuna --trials N, or list values (a,b,c) or range(start,stop,step)",
            )
        if trials is not None:
            raise ConfigError("--trials is for --search optuna; a grid runs every combination")
        return len(grid(space))
    if trials is None or trials < 1:
        raise ConfigError("--search optuna needs --trials N (1 or more)")
    return trials


def grid(space: Space) -> list[dict[str, Any]]:
    """Every combination of the listed values, the last key varying fastest."""
    keys = list(space)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(space[k]["values"] for k in keys))]


def corners(space: Space) -> list[dict[str, Any]]:
    """Values that together touch every listed value and both ends of every interval (checked before queuing)."""
    columns = {
        key: dim["values"] if dim["kind"] == "choice" else [dim["low"], dim["high"]] for key, dim in space.items()
    }
    longest = max(len(v) for v in columns.values())
    return [{key: values[i % len(values)] for key, values in columns.items()} for i in range(longest)]


def as_overrides(params: dict[str, Any]) -> list[str]:
    """``{key: value}`` as ``key=value`` overrides tunelab's parser reads back exactly (JSON is YAML)."""
    return [f"{key}={json.dumps(value)}" for key, value in params.items()]


def check_metric(metric: str, *, has_valid: bool, objective: str) -> None:
    """Refuse a metric the trials will never report, before any of them is queued."""
    if metric in TRAIN_METRICS:
        return
    reported_valid = metric in VALID_METRICS or (metric.startswith("val_") and objective != "sft")
    if reported_valid and has_valid:
        return
    if reported_valid:
        raise ConfigError(
            f"--metric {metric} is computed on the validation set, and these runs have none",
            hint="give data.valid, a valid.jsonl in the data folder, or data.valid_split=0.1",
        )
    raise ConfigError(
        f"--metric {metric} is never reported by a run",
        hint=f"runs report {', '.join(TRAIN_METRICS)}, and with a validation set {', '.join(VALID_METRICS)}",
    )
