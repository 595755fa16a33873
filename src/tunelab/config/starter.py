"""The commented starter config `tunelab init` writes (a template is data, not code)."""

from __future__ import annotations

from importlib.resources import files


def render_starter(*, model: str, data: str, method: str, steps: int | None) -> str:
    """Fill the shipped template; quoting is YAML-safe via json-style strings."""
    import json

    template = files("tunelab.assets").joinpath("starter.yaml").read_text(encoding="utf-8")
    length = f"steps: {steps}" if steps else "epochs: 1"
    return template.format(model=json.dumps(model), data=json.dumps(data), method=method, length=length)
