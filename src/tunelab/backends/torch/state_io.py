"""Optimizer and RNG state on disk without pickle: tensors in safetensors, everything else in JSON.

``torch.save``/``torch.load`` of a state dict is a pickle, and unpickling runs
whatever a file asks for: a ``rng.pt`` planted in a run folder would run code on
``--resume``.  Checkpoints therefore hold ``optimizer.safetensors`` +
``optimizer.json`` and ``rng.safetensors``.  Checkpoints of earlier versions
(``optimizer.pt``, ``rng.pt``) are still read, but only with
``weights_only=True``, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
RNG_FILE = "rng.safetensors"
_LEGACY_OPTIMIZER = "optimizer.pt"
_LEGACY_RNG = "rng.pt"


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """``state.<param index>.<name>`` tensors in safetensors; param groups and non-tensor state in JSON."""
    saved = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for index, entries in saved["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                values.setdefault(str(index), {})[name] = value
    save_file(tensors, str(folder / OPTIMIZER_TENSORS))
    meta = {"param_groups": saved["param_groups"], "values": values}
    (folder / OPTIMIZER_META).write_text(json.dumps(meta), encoding="utf-8")


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path, device: torch.device) -> None:
    """Restore what :func:`save_optimizer` wrote (or a legacy ``optimizer.pt``, weights only)."""
    if not (folder / OPTIMIZER_TENSORS).is_file():
        optimizer.load_state_dict(torch.load(folder / _LEGACY_OPTIMIZER, map_location=device, weights_only=True))
        return
    meta = json.loads((folder / OPTIMIZER_META).read_text(encoding="utf-8"))
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["values"].items()}
    for key, tensor in load_file(str(folder / OPTIMIZER_TENSORS)).items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor  # the optimizer moves them to its parameters' device
    # A different number of groups is refused by load_state_dict itself, with its own message.
    groups = [_as_current(g, c) for g, c in zip(meta["param_groups"], optimizer.param_groups, strict=False)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _as_current(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """JSON turned tuples (``betas``) into lists; give them back the type the optimizer uses."""
    return {k: tuple(v) if isinstance(current.get(k), tuple) and isinstance(v, list) else v for k, v in saved.items()}


def save_rng(folder: Path) -> None:
    """The CPU generator's state and every CUDA device's."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states |= {f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
    save_file(states, str(folder / RNG_FILE))


def load_rng(folder: Path) -> None:
    """Restore :func:`save_rng`'s states (or a legacy ``rng.pt``, weights only)."""
    if (folder / RNG_FILE).is_file():
        states = load_file(str(folder / RNG_FILE))
        cuda = [states[f"cuda.{i}"] for i in range(len(states) - 1) if f"cuda.{i}" in states]
    else:
        legacy = torch.load(folder / _LEGACY_RNG, weights_only=True)
        states, cuda = {"cpu": legacy["cpu"]}, list(legacy.get("cuda", []))
    torch.set_rng_state(states["cpu"])
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
