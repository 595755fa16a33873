"""What mlx-lm needs changed in a config.json that transformers 5 wrote."""

from __future__ import annotations

from typing import Any


def rope_fixes(config: dict[str, Any]) -> dict[str, Any]:
    """Lift transformers-5 ``rope_parameters`` to the top-level keys mlx-lm's models read.

    transformers 5 saves ``rope_theta`` (and any scaling) only inside
    ``rope_parameters``; most mlx-lm models read the top-level keys and would
    silently fall back to their own default theta (1e6 for qwen2).
    """
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:  # absent, or nested per layer type
        return {}
    fixes: dict[str, Any] = {}
    if "rope_theta" not in config:
        fixes["rope_theta"] = rope["rope_theta"]
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default" and config.get("rope_scaling") is None:
        fixes["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return fixes
