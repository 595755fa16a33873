"""The random state a recomputation needs: whether a module can draw, the generators saved, and restored.

A checkpointed layer's replay, a tiled MLP's backward and a kept MLP's backward each run
code again that may draw dropout masks; those must be the masks the first run drew, so each
saves the CPU and CUDA generators when the first run starts and runs the second from them,
leaving the generators where they were afterwards.  Where nothing draws (:func:`draws_random`),
each skips both: in every layer of every step they cost host time, which a QLoRA
step on a GPU waits on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

# The CPU generator's state, and the CUDA one's on a GPU
State = tuple[torch.Tensor, torch.Tensor | None]


def saved(device: torch.device) -> State:
    """The generators' states now, for :func:`restored` (the CUDA one of ``device`` where it is a GPU)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def restored(state: State | None, device: torch.device) -> Iterator[None]:
    """Inside the block the generators are at ``state``; after it, where they were (None: left as they are)."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


# Names of a module's (or its config's) numbers that make its run random when above 0: dropout rates
# (``attention_dropout``, ``resid_pdrop``, ``hidden_dropout``...), router noise (``router_jitter_noise``).
_RANDOM_NAMES = ("drop", "noise", "jitter")


def draws_random(layer: torch.nn.Module) -> bool:
    """Whether ``layer``'s run can draw random numbers, so its replay must start from the forward's random state.

    Saving and restoring that state (CPU and CUDA generators) costs host time in every layer of every step,
    and a QLoRA step on a GPU waits on its host (bench/README, session 49); a layer without dropout draws
    nothing, so it skips both.  Conservative: any dropout module above 0, any ``RReLU``, any router or
    mixture-of-experts block, or any number above 0 whose name says dropout or noise, on a module of the
    layer or its config, counts as drawing.  A rate written into a call (``F.dropout(x, 0.1)``) can't be
    seen: no model transformers ships does that inside a decoder layer.
    """
    for module in layer.modules():
        if (isinstance(module, _DROPOUTS) and module.p > 0) or isinstance(module, torch.nn.RReLU):
            return True
        if any(word in type(module).__name__.lower() for word in _RANDOM_CLASSES):
            return True  # mixture-of-experts routing may sample (PhiMoE's sparsemixer does while training)
        config = getattr(module, "config", None)
        for owner in (module, config) if config is not None else (module,):
            for name, value in getattr(owner, "__dict__", {}).items():
                if _random_rate(name, value):
                    return True
    return False


_DROPOUTS = (
    torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
)  # fmt: skip


# Modules whose run may draw whatever their numbers say: any router or mixture-of-experts block.
_RANDOM_CLASSES = ("moe", "router", "mixer")


def _random_rate(name: str, value: Any) -> bool:
    if not any(word in name.lower() for word in _RANDOM_NAMES) or isinstance(value, bool):
        return False
    if isinstance(value, torch.Tensor):  # a rate held as a 0-d tensor
        return value.numel() == 1 and bool(value.item() > 0)
    try:
        return float(value) > 0  # ints, floats, numpy scalars
    except (TypeError, ValueError):
        return False
