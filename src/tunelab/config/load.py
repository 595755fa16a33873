"""YAML + ``key.sub=value`` overrides -> a validated :class:`RunConfig`.

Validation happens once, here, and every pydantic error is rewritten into a
message that names the dotted key and says what to change: the nearest valid
key for a typo, the allowed values or range for a bad value.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from tunelab.config.compose import compose_file, origin_of, resolve
from tunelab.config.schema import RunConfig
from tunelab.config.yaml_loader import ExpansionError, load_yaml
from tunelab.errors import ConfigError


def load_config(
    source: str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> RunConfig:
    """Load a config from a YAML path (or an already-parsed mapping), apply overrides, validate."""
    raw, origins = compose_config(source, overrides)
    return validate_config(raw, origins=origins)


def compose_config(
    source: str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str] = ()
) -> tuple[dict[str, Any], dict[str, str]]:
    """The plain mapping a config stands for, before validation, and where each key was written.

    A file's ``defaults:`` presets are merged (see :mod:`tunelab.config.compose`), then the overrides
    applied, then ``${…}`` interpolations resolved (so they see the overrides).  A mapping is taken
    as it is: composition is a property of files.
    """
    if source is None:
        return _with_overrides({}, overrides), {}
    if isinstance(source, Mapping):
        return _with_overrides(_deep_copy(source), overrides), {}
    composed = compose_file(Path(source))
    raw = _with_overrides(composed.raw, overrides)
    origins = dict(composed.origins)
    for key, _ in parse_overrides(overrides):  # an overridden key was last written on the command line
        for known in [k for k in origins if k == key or k.startswith(key + ".")]:
            del origins[known]
        origins[key] = "command line"
    return resolve(raw, origins), origins


def _with_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, value)
    return raw


def validate_config(raw: Mapping[str, Any], *, origins: Mapping[str, str] | None = None) -> RunConfig:
    """Validate a plain mapping; raise :class:`ConfigError` listing every problem.

    ``origins`` (dotted key -> ``file:line``) adds where each bad key was written.
    """
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        problems = _dedupe([_describe(err) for err in exc.errors()])
        if origins:
            problems = [_located(p, origins) for p in problems]
        raise ConfigError(
            "invalid config:\n" + "\n".join(f"  - {p}" for p in problems),
            hint="fix the YAML or pass an override such as train.lr=1e-4",
        ) from None


def _located(problem: str, origins: Mapping[str, str]) -> str:
    where = origin_of(problem.split(":", 1)[0], origins)
    return f"{problem} ({where})" if where else problem


def _dedupe(problems: list[str]) -> list[str]:
    """One line per key: a union type (e.g. 'all-linear' or a list) otherwise reports every branch."""
    by_key: dict[str, str] = {}
    for line in problems:
        key = line.split(":", 1)[0]
        if key not in by_key or "must be one of" in line:
            by_key[key] = line
    return list(by_key.values())


def parse_overrides(items: Sequence[str]) -> list[tuple[str, Any]]:
    """Turn ``["train.lr=1e-4", "method.targets=[q_proj,v_proj]"]`` into typed pairs.

    Values are parsed as YAML scalars/flow collections so numbers, booleans,
    null and lists need no extra quoting on the command line.
    """
    pairs: list[tuple[str, Any]] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value (e.g. train.lr=1e-4)")
        try:
            value = load_yaml(text) if text.strip() else ""
        except ExpansionError as exc:  # not a plain string either: say why it is refused
            raise ConfigError(f"override {key}: {exc.problem}") from None
        except yaml.YAMLError:
            value = text
        pairs.append((key, value))
    return pairs


def all_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts (used for suggestions and docs)."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        sub = _submodel(field.annotation)
        if sub is not None:
            keys.extend(all_keys(sub, dotted + "."))
    return keys


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _describe(err: Any) -> str:
    loc = _clean_loc(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{loc}: unknown key{_suggest(loc)}"
    if kind == "missing":
        return f"{loc}: required key is missing"
    if loc in _UNION_VALUES:
        return f"{loc}: must be {_UNION_VALUES[loc]} (got {err.get('input')!r})"
    allowed = _allowed(err)
    got = err.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    if allowed:
        return f"{loc}: must be one of {allowed}{got_text}"
    if kind in _BOUND_ERRORS:
        return f"{loc}: must be {_range_of(loc)}{got_text}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}{got_text}"


# Keys whose type is a union: pydantic reports each branch, users need one sentence.
_UNION_VALUES = {"method.targets": "all-linear or a list of module names such as [q_proj, v_proj]"}

_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _range_of(loc: str) -> str:
    """The whole allowed range of a numeric key, e.g. '>= 8 and <= 1048576'."""
    model: type[BaseModel] | None = RunConfig
    field = None
    for part in loc.split("."):
        if model is None or part not in model.model_fields:
            return "in range"
        field = model.model_fields[part]
        model = _submodel(field.annotation)
    bounds = []
    for meta in field.metadata if field is not None else []:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(meta, attr, None) is not None:
                bounds.append(f"{sign} {getattr(meta, attr)}")
    return " and ".join(bounds) or "in range"


def _clean_loc(loc: tuple[Any, ...]) -> str:
    # pydantic appends union/literal branch names (e.g. 'literal['all-linear']', 'list[str]') to
    # the location; users only know the dotted key, so those parts are dropped.
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in {"function-after"}))]
    return ".".join(parts) or "<config>"


def _allowed(err: Any) -> str:
    ctx = err.get("ctx") or {}
    if err["type"] == "literal_error" and "expected" in ctx:
        return str(ctx["expected"]).replace("'", "")
    return ""


def _suggest(loc: str) -> str:
    candidates = all_keys()
    parent, _, leaf = loc.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in candidates if k.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.5)
    if close:
        return f"; did you mean {(parent + '.' if parent else '') + close[0]}?"
    close = difflib.get_close_matches(loc, candidates, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]}?"
    if siblings:
        return f"; valid keys here: {', '.join(siblings)}"
    return ""


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            sub = _submodel(arg)
            if sub is not None:
                return sub
    return None


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
