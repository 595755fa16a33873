"""Which of the CUDA memory options a run takes: offloaded checkpoints, kept MLPs and host-held embeddings.

Each option is ``auto`` (on wherever it applies), ``true`` (on, or a refusal that
says why it can't be) or ``false``; a setting that can't take effect is never
ignored silently.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from tunelab.backends.base import MethodSpec, ModelSpec
from tunelab.backends.torch.host_embedding import host_embedding_applies
from tunelab.backends.torch.host_link import measure
from tunelab.backends.torch.kept_mlp import kept_mlp_applies, parked_layers
from tunelab.backends.torch.loading import decoder_layers
from tunelab.errors import ConfigError

log = logging.getLogger(__name__)


def offload_checkpoints(model: ModelSpec, method: MethodSpec, device: torch.device) -> bool:
    """Whether checkpointed layer inputs go to CPU memory: ``auto`` wherever that applies; ``true`` or a refusal."""
    applies = model.gradient_checkpointing and device.type == "cuda"
    applies = applies and model.parallel != "fsdp" and method.name != "prefix"
    if model.offload_checkpoints == "auto" or not model.offload_checkpoints:
        return bool(model.offload_checkpoints) and applies
    if applies:
        return True
    if not model.gradient_checkpointing:
        why, fix = "it offloads what gradient checkpointing keeps", "set train.gradient_checkpointing: true"
    elif device.type != "cuda":
        why, fix = f"it moves data off a CUDA GPU and this run is on {device}", "leave it at auto"
    else:
        why, fix = "it can't work with train.parallel: fsdp or method: prefix", "leave it at auto"
    raise ConfigError(f"train.offload_checkpoints: true: {why}", hint=f"{fix}, or set it to false")


def offload_embeddings(
    model: ModelSpec, method: MethodSpec, base: Any, device: torch.device, checkpoints_offloaded: bool
) -> bool:
    """Whether the input-embedding table stays in CPU memory: ``auto`` with offloaded checkpoints, or ``true``.

    ``auto`` follows the checkpoints' offload because the gather costs a few
    milliseconds of host time per step: worth it where memory is what the user
    asked to save, not otherwise.
    """
    setting = model.offload_embeddings
    if not setting:
        return False
    why = host_embedding_applies(base, trainable_embeddings=method.name in ("full", "prefix"))
    if device.type != "cuda":
        why = why or f"it moves the table off a CUDA GPU and this run is on {device}"
    elif model.parallel == "fsdp" and model.processes > 1:
        why = why or "FSDP shards the table over the processes instead"
    if setting == "auto":
        return checkpoints_offloaded and why is None
    if why is None:
        return True
    raise ConfigError(f"train.offload_embeddings: true: {why}", hint="set it to auto or false")


def offload_mlp(
    model: ModelSpec, method: MethodSpec, base: Any, device: torch.device, checkpoints_offloaded: bool
) -> int:
    """How many layers (from the first) park their MLP's activations in CPU memory; 0: none.

    ``auto``: as many as the GPU's link to CPU memory copies out while the
    forward computes (measured at start); ``true``: every layer; a number: that
    many.  Where it can't apply, ``auto`` is quietly 0 and the others a refusal.
    """
    setting = model.offload_mlp
    if setting is False or setting == 0:
        return 0
    why = None if checkpoints_offloaded else "it rides on offloaded checkpoints, which this run doesn't use"
    if model.tiled_mlp:
        why = why or "a tiled MLP keeps only its input, and this run tiles its MLPs"
    why = why or kept_mlp_applies(base, method.name, method.bits)
    if why is not None:
        if setting == "auto":
            return 0
        fix = "set train.tiled_mlp: false" if model.tiled_mlp and checkpoints_offloaded else "set it to auto or false"
        raise ConfigError(f"train.offload_mlp: {str(setting).lower()}: {why}", hint=fix)
    layers = len(decoder_layers(base))
    if setting != "auto":
        return layers if setting is True else min(int(setting), layers)
    if device.type != "cuda":
        return layers
    link = measure(device)
    count = parked_layers(base, link)
    log.info(
        "offload_mlp: auto: %d of %d layers park their MLP activations in CPU memory "
        "(this GPU: %.0f TFLOP/s, %.0f GB/s to CPU memory)",
        *(count, layers, link.flops / 1e12, link.bytes_per_s / 1e9),
    )
    return count
