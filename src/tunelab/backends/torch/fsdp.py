"""FSDP2 for the torch backend: the frozen base and the adapters sharded over the processes.

``train.parallel: fsdp`` with several processes: after PEFT has wrapped the
model, :func:`shard` calls ``fully_shard`` on every decoder layer and on the
root, so each process keeps 1/N of every weight and gathers a layer's whole
weights only while that layer runs.  Gradients are reduce-scattered by FSDP
itself (the DDP all-reduce of :mod:`torch_sync` must not run on top), and
summed, not averaged: the loss is already scaled by the global token count,
exactly as under data parallel.

Checkpoints are written with ``torch.distributed.checkpoint`` (DCP): every
process writes its shards of the trainable weights and the optimizer state,
keyed by parameter name, and DCP reshards on load, so a checkpoint of N
processes resumes on M (on one process, without FSDP, into whole tensors).
The final adapter is gathered to whole tensors and written by rank 0 in PEFT's
own format, the same files a one-process run writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tunelab.backends.torch.loading import decoder_layers
from tunelab.errors import StateError

DCP_METADATA = ".metadata"  # the file DCP writes last; its presence marks a sharded checkpoint
_LOSS_METHOD = "tunelab_loss"  # the loss, as a forward of the root (see as_root_forward)


def shard(model: torch.nn.Module) -> None:
    """``fully_shard`` each decoder layer, then the root (embeddings, final norm, LM head)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # FSDP averages over processes by default; the loss is already divided by the
            # supervised tokens of the whole global batch, so the shares must be summed.
            module.set_gradient_divide_factor(1.0)
            # A factor of 1 would otherwise be sent as PREMUL_SUM, which gloo (CPU) lacks.
            module.set_force_sum_reduction_for_comms(True)


def as_root_forward(model: torch.nn.Module, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run as a forward of the root, so FSDP gathers the root's weights around it.

    The loss calls the decoder and then the LM head's weight directly (the chunked
    head + cross-entropy), not the root's ``forward``; outside a forward the head's
    weight is a shard, so the loss is registered as one of the root's forwards.
    """
    from torch.distributed.fsdp import register_fsdp_forward_method

    setattr(model, _LOSS_METHOD, fn)  # registration wraps an attribute of the module
    register_fsdp_forward_method(model, _LOSS_METHOD)
    hooked: Callable[..., Any] = getattr(model, _LOSS_METHOD)
    return hooked


def is_sharded_checkpoint(path: Path) -> bool:
    """True for a checkpoint folder DCP wrote (what :func:`save` writes)."""
    return (path / DCP_METADATA).is_file()


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Trainable weights and optimizer state keyed by name: DTensor shards under FSDP, whole tensors without."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": weights, "optim": optim}


def save(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write this process's shards into ``path`` (collective: every rank calls it with the same path)."""
    import torch.distributed.checkpoint as dcp

    with _unwrapped():  # a full disk reaches the checkpoint writer as the OSError it is
        dcp.save(_state(model, optimizer), checkpoint_id=str(path))


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Fill the model's trainable weights and the optimizer from a DCP checkpoint, resharding as needed.

    With one process (no process group) DCP reads every shard into whole tensors.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from tunelab.backends.torch import dcp_safe  # with DCP itself: a one-process run never imports either

    hint = "resume with the config the run was started with"
    if not is_sharded_checkpoint(path):
        raise StateError(f"checkpoint {path} was written without train.parallel: fsdp and can't be sharded", hint=hint)
    state = _state(model, optimizer)  # the layout wanted here; DCP fills it in place
    try:
        with _unwrapped():
            dcp.load(state, storage_reader=dcp_safe.SafeReader(path))  # its .metadata is read without pickle's reach
    except (RuntimeError, ValueError) as exc:  # DCP's complaint names the weights it lacks
        raise StateError(f"checkpoint {path} does not match this model/method: {exc}", hint=hint) from exc
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        # Not strict: the frozen weights are not in the checkpoint (dcp.load above has already
        # refused a checkpoint that lacks any trainable weight this model has).
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )


@contextmanager
def _unwrapped() -> Iterator[None]:
    """DCP wraps every failure in a ``CheckpointException``, a ``BaseException`` that ``except Exception`` misses:
    re-raise the first process's own exception, so callers see a full disk or a refused file as such."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exc:
        failures = [failure[0] for failure in exc.failures.values() if isinstance(failure, tuple)]
        if not failures:
            raise
        raise failures[0] from exc


def full_weights(model: torch.nn.Module, *, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The weights gathered to whole CPU tensors, keyed as ``model.state_dict()`` (collective).

    An adapter needs only the trainable ones; a whole model (``method: freeze``) all.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, ignore_frozen_params=trainable_only)
    full = get_model_state_dict(model, options=options)
    return {name: t.detach().cpu() for name, t in full.items() if isinstance(t, torch.Tensor)}


def total_norm(norm: torch.Tensor) -> torch.Tensor:
    """``clip_grad_norm_``'s result as a plain tensor (under FSDP a DTensor, replicated once reduced)."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
