"""Paths that arrive over the network may only point inside configured roots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tunelab.config.schema import RunConfig
from tunelab.errors import ConfigError


def is_under(path: Path, roots: Sequence[Path]) -> bool:
    """True when ``path`` (symlinks and ``..`` resolved) lies inside one of ``roots``."""
    real = path.expanduser().resolve()
    return any(real == r or r in real.parents for r in (root.expanduser().resolve() for root in roots))


def check_path(value: str, key: str, roots: Sequence[Path]) -> None:
    """Raise a ConfigError naming ``key`` unless ``value`` lies inside ``roots``."""
    if not is_under(Path(value), roots):
        allowed = ", ".join(str(r) for r in roots) or "(none configured)"
        raise ConfigError(
            f"{key}: {value} is outside the folders this server may read or write",
            hint=f"use a path under {allowed} (set TUNELAB_API_ROOTS to change them), or upload data to /v1/datasets",
        )


def check_config_paths(cfg: RunConfig, roots: Sequence[Path]) -> None:
    """Every path in a config submitted over the API must lie inside ``roots`` (hub ids included: no downloads)."""
    check_path(cfg.model.path, "model.path", roots)
    check_path(cfg.data.train, "data.train", roots)
    if cfg.data.valid:
        check_path(cfg.data.valid, "data.valid", roots)
    if cfg.output_dir:
        check_path(cfg.output_dir, "output_dir", roots)
