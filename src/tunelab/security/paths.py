"""Paths that arrive over the network may only point inside configured roots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tunelab.config.schema import RunConfig
from tunelab.errors import ConfigError


def is_under(path: Path, roots: Sequence[Path]) -> bool:
    """True when ``path`` (symlinks and ``..`` resolved) lies inside one of ``roots``."""
    try:
        real = path.expanduser().resolve()
    except (OSError, ValueError):  # a name the OS refuses (too long, a NUL byte) lies nowhere
        return False
    return any(real == r or r in real.parents for r in (root.expanduser().resolve() for root in roots))


MAX_NAME_BYTES, MAX_PATH_BYTES = 255, 4096
"""What Linux and macOS accept for one file name and for a whole path."""


def check_shape(value: str, key: str) -> None:
    """Refuse, naming ``key``, a path no file system can hold: a NUL byte, or a name or path over the OS limits."""
    if "\x00" in value:
        raise ConfigError(f"{key}: a path may not contain a NUL byte (got {value[:80]!r})")
    longest = max((len(part.encode("utf-8", "surrogatepass")) for part in value.split("/")), default=0)
    if longest > MAX_NAME_BYTES or len(value.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise ConfigError(
            f"{key}: a path of at most {MAX_PATH_BYTES} bytes with names of at most {MAX_NAME_BYTES} bytes each "
            f"is needed (got {len(value):,} characters, the longest name {longest:,} bytes)"
        )


def check_path(value: str, key: str, roots: Sequence[Path]) -> None:
    """Raise a ConfigError naming ``key`` unless ``value`` lies inside ``roots``."""
    check_shape(value, key)
    if not is_under(Path(value), roots):
        allowed = ", ".join(str(r) for r in roots) or "(none configured)"
        raise ConfigError(
            f"{key}: {value} is outside the folders this server may read or write",
            hint=f"use a path under {allowed} (set TUNELAB_API_ROOTS to change them), or upload data to /v1/datasets",
        )


def check_config_paths(cfg: RunConfig, roots: Sequence[Path]) -> RunConfig:
    """Every path in a config submitted over the API must lie inside ``roots`` (hub ids included: no downloads).

    Returns the config with each path absolute: a relative one is taken inside the first root that holds
    it (or the first root), never against the server's or a worker's working directory, so the worker
    that runs the job reads exactly the file that was checked here.
    """
    model = anchor(cfg.model.path, roots, "model.path")
    train = anchor(cfg.data.train, roots, "data.train")
    valid = anchor(cfg.data.valid, roots, "data.valid") if cfg.data.valid else None
    out = anchor(cfg.output_dir, roots, "output_dir", existing=False) if cfg.output_dir else None
    check_path(model, "model.path", roots)
    check_path(train, "data.train", roots)
    if valid:
        check_path(valid, "data.valid", roots)
    if out:
        check_path(out, "output_dir", roots)
    data = cfg.data.model_copy(update={"train": train, "valid": valid})
    return cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"path": model}), "data": data, "output_dir": out}
    )


def anchor(value: str, roots: Sequence[Path], key: str, *, existing: bool = True) -> str:
    """``value`` as an absolute path: as given when absolute (``~`` expanded), else under the first root holding it.

    A relative input (``existing``) that no root holds is refused: it would otherwise be a path the
    worker resolves on its own, or a hub id, and the server downloads nothing.
    """
    check_shape(value, key)
    path = Path(value).expanduser()
    if path.is_absolute() or not roots:
        return str(path)
    candidates = [root.expanduser() / path for root in roots]
    found = next((c for c in candidates if c.exists()), None)
    if found is None and existing:
        allowed = ", ".join(str(r) for r in roots)
        raise ConfigError(
            f"{key}: {value} names nothing inside the folders this server may read (a hub id? it downloads nothing)",
            hint=f"give a path under {allowed} (set TUNELAB_API_ROOTS to change them), or upload data to /v1/datasets",
        )
    return str(found or candidates[0])


def recheck_config_paths(cfg: RunConfig, roots: Sequence[Path]) -> None:
    """At use: the paths a job was accepted with must still resolve inside ``roots``.

    A file accepted at submit can be replaced by a link to somewhere else before a worker reads it;
    resolving again just before reading catches that (and the error names the key, not the contents).
    """
    for key, value in (("model.path", cfg.model.path), ("data.train", cfg.data.train), ("data.valid", cfg.data.valid)):
        if value and not is_under(Path(value), roots):
            raise ConfigError(
                f"{key}: {value} now leads outside the folders this job was accepted for (changed since submit)",
                hint="submit the job again with the file itself inside the allowed folders, not a link out of them",
            )
