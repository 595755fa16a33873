"""A torch training checkpoint on disk: the trainable weights, the optimizer and the RNG, whole or sharded.

Two layouts.  A single process (or DDP, where every rank holds the same
weights) writes ``trainable.safetensors`` plus the optimizer's and the RNG's
pickle-free files (:mod:`state_io`).  ``train.parallel: fsdp`` writes DCP's
sharded format instead, collectively, and rank 0 adds the RNG file.  Loading
reads whichever layout the folder holds, so a sharded checkpoint resumes on any
process count.  Only the parameters that train are saved: the frozen base is
loaded again from its own files on resume.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunelab.backends.torch import fsdp, state_io
from tunelab.errors import StateError

TRAINABLE_FILE = "trainable.safetensors"


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that train, by name (what a whole checkpoint holds)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, sharded: bool) -> None:
    """Write a checkpoint into ``path``; with ``sharded`` every rank must call it (DCP is collective)."""
    path.mkdir(parents=True, exist_ok=True)
    if sharded:
        fsdp.save(path, model, optimizer)
        if fsdp.rank() != 0:
            return
    else:
        tensors = {name: p.detach().to("cpu").contiguous() for name, p in trainable_parameters(model).items()}
        save_file(tensors, str(path / TRAINABLE_FILE))
        state_io.save_optimizer(optimizer, path)
    state_io.save_rng(path)  # no pickles: a planted file must not run code on --resume


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, *, collective: bool
) -> None:
    """Restore the weights, optimizer and RNG from ``path`` (``collective``: this run's saves are DCP's)."""
    if fsdp.is_sharded_checkpoint(path) or collective:
        fsdp.load(path, model, optimizer)  # resharded onto this run's processes
    else:
        _load_whole(path, model, optimizer, device)
    state_io.load_rng(path)


def _load_whole(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    saved = load_file(str(path / TRAINABLE_FILE))
    names = trainable_parameters(model)
    if set(saved) != set(names):
        raise StateError(
            f"checkpoint {path} does not match this model/method (different trainable weights)",
            hint="resume with the config the run was started with",
        )
    with torch.no_grad():
        for name, param in names.items():
            param.copy_(saved[name].to(param.device, param.dtype))
    state_io.load_optimizer(optimizer, path, device)
