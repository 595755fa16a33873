"""Config composition: ``defaults:`` presets and ``${…}`` interpolation, through OmegaConf.

A config file may start with a defaults list, as in Hydra::

    defaults:
      - model: qwen2.5-0.5b     # <group>/<name>.yaml, placed under the key `model:`
      - method: qlora
      - base                    # <name>.yaml at the top level (a whole shared config)
      - _self_                  # where this file's own keys go (last when left out: the file wins)

Presets are searched in the config's own folder, then ``$TUNELAB_HOME/presets``, then the presets
shipped in the package.  A preset may have defaults of its own (a bare name there means a preset of
its own group).  Values may refer to others (``${train.lr}``) or to the environment
(``${oc.env:DATA_DIR}``); command-line overrides are applied before interpolation is resolved, so a
reference sees the overridden value.

The result is a plain mapping, validated once by the pydantic schema like any config, plus where each
dotted key was written (``file:line``), so an error inside a preset names the preset's file and line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from tunelab.config.yaml_loader import DuplicateKeyError, ExpansionError, load_yaml_lines
from tunelab.errors import ConfigError

GROUPS = ("model", "data", "method", "objective", "train")
"""The sections a preset can fill (``- method: qlora`` reads ``method/qlora.yaml``)."""

SELF = "_self_"


@dataclass
class Composed:
    """A merged, not yet interpolated, config and the ``file:line`` each dotted key came from."""

    raw: dict[str, Any]
    origins: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Part:
    prefix: str  # "" for the top level, else the group the part fills
    data: dict[str, Any]
    lines: dict[str, int]
    path: Path


def shipped_presets() -> Path:
    """The folder of presets that come with tunelab (package data)."""
    return Path(str(files("tunelab.assets").joinpath("presets")))


def preset_dirs(config_dir: Path | None) -> list[Path]:
    """Where presets are looked up, first match wins: the config's folder, the user's, tunelab's."""
    from tunelab.settings import get_settings

    dirs = [config_dir] if config_dir is not None else []
    return [*dirs, get_settings().home / "presets", shipped_presets()]


def available_presets(config_dir: Path | None = None) -> dict[str, list[str]]:
    """``{group: [names]}`` of every preset found (group ``""``: top-level presets)."""
    found: dict[str, set[str]] = {}
    for folder in preset_dirs(config_dir):
        for group in ("", *GROUPS):
            sub = folder / group if group else folder
            if sub.is_dir():
                found.setdefault(group, set()).update(p.stem for p in sub.glob("*.yaml"))
    return {group: sorted(names) for group, names in found.items() if names}


def read_config_file(path: Path, what: str = "config") -> tuple[dict[str, Any], dict[str, int]]:
    """A YAML file's top-level mapping and each key's line; a :class:`ConfigError` saying what is wrong."""
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give the YAML file inside it")
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist", hint="`tunelab init` writes one to start from")
    try:
        data, lines = load_yaml_lines(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        kind = "" if isinstance(exc, DuplicateKeyError | ExpansionError) else "YAML syntax error: "
        raise ConfigError(f"{where}: {kind}{problem}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, …)")
    return data, lines


def compose_file(path: Path) -> Composed:
    """Read ``path`` and every preset its defaults name, merged in order (interpolation not yet resolved)."""
    data, lines = read_config_file(path)
    parts = _expand(_Part("", data, lines, path), path.parent, chain=(path.resolve(),))
    if len(parts) == 1:  # no defaults: the file as it is, with its lines
        return Composed(parts[0].data, _origins(parts))
    from omegaconf import OmegaConf

    try:
        merged = OmegaConf.merge(*[OmegaConf.create(_wrapped(p)) for p in parts])
        raw = OmegaConf.to_container(merged, resolve=False)
    except Exception as exc:  # OmegaConf's own errors: a key or value it can't hold
        raise ConfigError(f"{path}: can't merge its presets: {_first_line(exc)}") from None
    assert isinstance(raw, dict)
    return Composed({str(k): v for k, v in raw.items()}, _origins(parts))


def resolve(raw: dict[str, Any], origins: Mapping[str, str]) -> dict[str, Any]:
    """Resolve ``${…}`` interpolations (a config without any is returned as it is)."""
    if not _has_interpolation(raw):
        return raw
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        resolved = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    except OmegaConfBaseException as exc:
        key = str(getattr(exc, "full_key", "") or "")
        where = origin_of(key, origins)
        raise ConfigError(
            f"{key or 'config'}: {_first_line(exc)}{f' ({where})' if where else ''}",
            hint="a reference is written ${section.key} and must name a key the config sets; "
            "write \\${ for a literal ${",
        ) from None
    assert isinstance(resolved, dict)
    return {str(k): v for k, v in resolved.items()}


def origin_of(loc: str, origins: Mapping[str, str]) -> str | None:
    """Where the key ``loc`` (or the nearest section above it) was written, if known."""
    parts = loc.split(".") if loc else []
    while parts:
        found = origins.get(".".join(parts))
        if found is not None:
            return found
        parts.pop()
    return None


def _expand(part: _Part, config_dir: Path, chain: tuple[Path, ...]) -> list[_Part]:
    """``part`` with its defaults expanded into the parts to merge, in order."""
    defaults = part.data.get("defaults")
    if defaults is None:
        return [part]
    where = f"{part.path}:{part.lines.get('defaults', 1)}"
    if not isinstance(defaults, list):
        raise ConfigError(f"{where}: defaults must be a list such as [model: NAME, method: NAME, _self_]")
    own = _Part(part.prefix, {k: v for k, v in part.data.items() if k != "defaults"}, part.lines, part.path)
    parts: list[_Part] = []
    placed = False
    for entry in defaults:
        if entry == SELF:
            parts.append(own)
            placed = True
            continue
        group, name = _entry(entry, part.prefix, where)
        if name is None:  # `- method: null` removes a preset a shared default would add
            continue
        path = _find(group, name, config_dir, where)
        if path.resolve() in chain:
            raise ConfigError(f"{where}: preset {path} includes itself through its defaults")
        data, lines = read_config_file(path, what="preset")
        parts.extend(_expand(_Part(group, data, lines, path), config_dir, (*chain, path.resolve())))
    if not placed:
        parts.append(own)
    return parts


def _entry(entry: Any, group: str, where: str) -> tuple[str, str | None]:
    """One defaults entry as ``(group, name)``; a bare name is a preset of the current group."""
    if isinstance(entry, str) and entry.strip():
        return group, entry.strip()
    if isinstance(entry, dict) and len(entry) == 1:
        ((key, name),) = entry.items()
        if key not in GROUPS:
            raise ConfigError(f"{where}: defaults: {key!r} is not a preset group; the groups are {', '.join(GROUPS)}")
        if name is None or (isinstance(name, str) and name.strip()):
            return str(key), name.strip() if name else None
    raise ConfigError(f"{where}: defaults entry {entry!r} must be `GROUP: NAME`, a preset name or _self_")


def _find(group: str, name: str, config_dir: Path, where: str) -> Path:
    if "/" in name or "\\" in name or name.startswith("."):
        raise ConfigError(f"{where}: preset name {name!r} must be a plain name (presets are found by name)")
    for folder in preset_dirs(config_dir):
        path = (folder / group if group else folder) / f"{name}.yaml"
        if path.is_file():
            return path
    names = available_presets(config_dir).get(group, [])
    label = f"{group}: {name}" if group else name
    raise ConfigError(
        f"{where}: no preset {label} ({group + '/' if group else ''}{name}.yaml)",
        hint=(f"presets of {group or 'the top level'}: {', '.join(names)}; " if names else "")
        + f"add your own under {config_dir} or $TUNELAB_HOME/presets",
    )


def _wrapped(part: _Part) -> dict[str, Any]:
    return {part.prefix: part.data} if part.prefix else part.data


def _origins(parts: list[_Part]) -> dict[str, str]:
    origins: dict[str, str] = {}
    for part in parts:
        prefix = f"{part.prefix}." if part.prefix else ""
        for key, line in part.lines.items():
            if key != "defaults" and not key.startswith("defaults."):
                origins[prefix + key] = f"{part.path}:{line}"
    return origins


def _has_interpolation(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, Mapping):
        return any(_has_interpolation(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_interpolation(v) for v in value)
    return False


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
