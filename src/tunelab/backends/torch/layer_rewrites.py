"""The decoder layers rewritten for speed and memory, in the one order that works.

Each rewrite wraps or replaces parts of the layers that the next one then
wraps again, so the order is fixed:

1. shared A (one ``x @ A^T`` per q/k/v and gate/up group), then joined B
   (gate's and up's B inside their base products), which joins only shared groups;
2. kept attention (offloaded checkpoints' replays read the first run's output back);
3. the lean replay of the down projection, the innermost wrapper of what a
   checkpoint or a tile runs again;
4. tiled MLPs, or MLP activations parked in CPU memory: both stay outside the
   compiled layer, so they come before compiling;
5. compiling the layers (with NF4 dequantized inside the graph, where on);
6. our own checkpoints around the compiled layers.

:mod:`backend` calls :func:`rewrite_layers` once the method (PEFT) is applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.backends.base import MethodSpec, ModelSpec
from tunelab.backends.torch import held_4bit, joined_a, joined_b, kept_attention, nf4, nf4_kernels, shared_lora_a
from tunelab.backends.torch.checkpointing import checkpoint_layers
from tunelab.backends.torch.fast import FastPath, compile_decoder_layers
from tunelab.backends.torch.kept_mlp import host_budget, keep_mlps
from tunelab.backends.torch.lean_replay import lean_down_projections
from tunelab.backends.torch.loading import decoder_layers
from tunelab.backends.torch.offload import offload_mlp
from tunelab.backends.torch.tiled_mlp import tile_mlps


@dataclass(frozen=True)
class Rewritten:
    """What the training step needs to know about the rewritten layers."""

    joined: tuple[joined_b.Refresher, ...]  # the joined weights' refreshers, marked stale after each optimizer step
    attention: str | None  # the attention implementation the loss must name (None: the model's own)


def rewrite_layers(
    causal_lm: Any,
    base: Any,
    model: ModelSpec,
    method: MethodSpec,
    fast: FastPath,
    *,
    own_checkpoints: bool,
    offload: bool,
) -> Rewritten:
    """Apply every rewrite this run takes to ``causal_lm``'s decoder layers (``base``: the transformers model)."""
    device = next(base.parameters()).device
    if method.name == "qlora" and device.type == "cuda" and nf4.BNB_KERNELS:
        nf4_kernels.load()  # found now: the compiled layers' traces only read whether it is there
    refreshers = []
    if shared_lora_a.ON:
        shared_lora_a.share(causal_lm)
        if joined_b.applies_on(device) and model.parallel != "fsdp":  # FSDP shards the weights it views
            refreshers.append(joined_b.join(causal_lm))
    if joined_a.applies_on(device) and model.parallel != "fsdp":
        refreshers.append(joined_a.join(causal_lm))
    attention = None
    if kept_attention.ON and offload and kept_attention.keep_attention(base, host_budget()):
        attention = kept_attention.KEPT_SDPA
    if own_checkpoints or (model.tiled_mlp and model.parallel != "fsdp"):  # they replay layers or tiles
        lean_down_projections(causal_lm)
    if own_checkpoints and held_4bit.ON:
        held_4bit.hold_on_replay(causal_lm)  # 4-bit q/k/v/o: one dequantization for the replay and its backward
    if model.tiled_mlp:
        # The tiled call stays outside the layer's graph (its tiles get one of their own).
        tile_mlps(causal_lm, compile_backend="inductor" if fast.compile_layers else None)
    elif parked := offload_mlp(model, method, base, device, offload):
        keep_mlps(causal_lm, host_budget(), parked)
    if fast.compile_layers:
        if method.name == "qlora" and (method.bits or 4) == 4 and nf4.in_graph_on(device, model.longest_row):
            nf4.in_graph_4bit(causal_lm)  # the NF4 weights dequantized by the compiled graph itself
        compile_decoder_layers(causal_lm, fast.activation_budget)
    if own_checkpoints:
        checkpoint_layers(decoder_layers(causal_lm), offload=offload)
    return Rewritten(tuple(r for r in refreshers if r is not None), attention)
