"""Which run of an offloaded checkpoint's layer is under way, and what the first run parked for the replay.

An offloaded checkpoint (:mod:`checkpointing`) runs each decoder layer twice:
once without gradients in the forward, and again in backward, only to be
differentiated.  Code inside the layer can do less on either run when it
knows which one it is in: the tiled MLP skips an output value the replay
never reads; the kept MLP (:mod:`kept_mlp`) parks its activations on the first
run, they travel to CPU memory and back with the layer's input, and the
replay reads them instead of computing them again.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_state = threading.local()
# The same "a replay is under way" as a plain module global, for code inside compiled layers:
# dynamo guards on a module global it reads (one graph for each value; the replay's graph is
# the grad-enabled one anyway), while reading a threading.local would break the graph.
REPLAYING = False
RECORDING = False  # likewise for a checkpointed layer's first run


@contextlib.contextmanager
def recording() -> Iterator[list[torch.Tensor]]:
    """Marks the first run of a checkpointed layer; yields the list of what code inside it parked."""
    global RECORDING
    parked: list[torch.Tensor] = []
    previous, flag = getattr(_state, "recording", None), RECORDING
    _state.recording, RECORDING = parked, True
    try:
        yield parked
    finally:
        _state.recording, RECORDING = previous, flag


@contextlib.contextmanager
def replaying(parked: tuple[torch.Tensor, ...] = ()) -> Iterator[None]:
    """Marks a checkpoint's replay: the layer's output is differentiated, its value never read."""
    global REPLAYING
    previous, flag = getattr(_state, "replaying", None), REPLAYING
    _state.replaying, REPLAYING = parked, True
    try:
        yield
    finally:
        _state.replaying, REPLAYING = previous, flag


def park(*tensors: torch.Tensor) -> bool:
    """Hand tensors to the checkpoint for the replay; False outside a checkpointed layer's first run."""
    parked = getattr(_state, "recording", None)
    if parked is None:
        return False
    parked.extend(tensors)
    return True


def differentiating() -> bool:
    """Whether this is a replay run to be differentiated (read inside compiled layers: :data:`REPLAYING`)."""
    return REPLAYING and torch.is_grad_enabled()


def is_replay() -> bool:
    """Whether a checkpoint's replay is under way."""
    return getattr(_state, "replaying", None) is not None


def parked() -> tuple[torch.Tensor, ...]:
    """What the layer's first run parked, during its replay (empty otherwise)."""
    return getattr(_state, "replaying", None) or ()
