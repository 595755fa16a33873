"""Choosing a backend for a config, and what each backend can do here (for `doctor`)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from tunelab.backends.base import Backend
from tunelab.errors import BackendError

TORCH_METHODS = ("lora", "dora", "full", "freeze", "prefix", "ia3")


@dataclass(frozen=True)
class Choice:
    """The backend picked and, in one line, why."""

    name: str
    reason: str


def choose_backend(requested: str, method: str) -> Choice:
    """Resolve ``backend: auto|torch|mlx`` to one that can run ``method`` on this machine.

    MLX support arrives with its own backend; until then ``auto`` means torch and
    an explicit ``mlx`` is refused with a message that says what to use instead.
    """
    if requested == "mlx":
        raise BackendError(
            "backend: mlx is not available in this version of tunelab",
            hint="set backend: torch (or auto)",
        )
    if importlib.util.find_spec("torch") is None:
        raise BackendError(
            "the torch backend needs PyTorch, which is not installed",
            hint='install it with: pip install "tunelab[torch]"',
        )
    if method not in TORCH_METHODS:
        raise BackendError(f"method {method} is not supported by the torch backend")
    reason = "requested" if requested == "torch" else "auto: torch is the only backend available here"
    return Choice("torch", reason)


def make_backend(choice: Choice) -> Backend:
    """Instantiate the chosen backend (imports its framework only now)."""
    if choice.name == "torch":
        from tunelab.backends.torch.backend import TorchBackend

        return TorchBackend()
    raise BackendError(f"unknown backend {choice.name}")
