"""The commented starter config `tunelab init` writes (a template is data, not code), and its checks."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from tunelab.errors import ConfigError
from tunelab.vocab import METHODS


def render_starter(*, model: str, data: str, method: str, steps: int | None) -> str:
    """Fill the shipped template; quoting is YAML-safe via json-style strings."""
    import json

    template = files("tunelab.assets").joinpath("starter.yaml").read_text(encoding="utf-8")
    length = f"steps: {steps}" if steps else "epochs: 1"
    return template.format(
        model=json.dumps(model), data=json.dumps(data), method=method, length=length, methods=" | ".join(METHODS)
    )


def path_problem(value: str, what: str) -> str | None:
    """Why ``value`` can't be the ``what`` (model or data) a starter names, or None when it can.

    A path that exists is fine, and so is a hub id (``owner/name``); anything that looks like a
    local path (``./x``, ``/x``, ``~/x``, ``x/``, ``x.jsonl``) must exist, so a typo is caught now
    rather than at the first ``tunelab train``.
    """
    text = value.strip()
    if not text:
        return f"give the {what}"
    local = Path(text).expanduser()
    if local.exists():
        return None
    looks_local = text.startswith((".", "/", "~")) or text.endswith("/") or bool(local.suffix) or text.count("/") != 1
    if looks_local:
        return f"{text} does not exist (give an existing {what} folder or file, or a hub id such as owner/name)"
    return None


def check_starter_paths(*, model: str, data: str) -> None:
    """Raise :class:`ConfigError` naming the option when ``--model`` or ``--data`` can't be found."""
    for option, value, what in (("--model", model, "model"), ("--data", data, "data")):
        problem = path_problem(value, what)
        if problem is not None:
            raise ConfigError(f"{option}: {problem}", hint="fix the path, or create it first")


__all__ = ["check_starter_paths", "path_problem", "render_starter"]
