"""Gradient checkpointing of decoder layers, optionally with the saved inputs offloaded to CPU memory.

Checkpointing keeps only each decoder layer's input for backward and runs the
layer again there.  tunelab wraps the layer's call from the outside — around
the compiled layer when the fast path compiles it — instead of relying on
transformers' own switch, for two reasons measured on the product path:
transformers skips checkpointing silently whenever the base is left in eval
mode (``from_pretrained`` leaves it there), and where transformers wraps a
layer's ``forward`` (5.2x) the checkpoint lands *inside* the compiled graph,
so what is kept depends on the compiler's partitioner rather than on the switch.

With offloading, even the kept inputs leave the GPU: each is copied into
pinned CPU memory on a side stream while the next layers compute, and in
backward the input of the layer before the one being recomputed is copied
back ahead of time, so the copies overlap compute.  GPU memory then grows with
sequence length by one or two layers' worth of activations rather than by one
input per layer (at 16k tokens on an 8B Llama, 32 x 128 MiB that stay off the GPU).
Without offloading (a CPU, Apple's MPS, or ``train.offload_checkpoints: false``)
the inputs stay where they are, and everything else is the same.

Either way the layer's second run is flagged as a replay (:mod:`replay`), made
only to be differentiated, so code inside it can skip what nothing reads: the
down projection's base product (:mod:`lean_replay`), a tiled MLP's output.
torch's own checkpoint can't say so, which is why it isn't used here.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from tunelab.backends.torch import kept_attention, random_state
from tunelab.backends.torch.host_stash import HostStash
from tunelab.backends.torch.replay import recording, replaying


def checkpoint_layers(layers: Iterable[torch.nn.Module], *, offload: bool) -> None:
    """Checkpoint every layer's call (compiled or not); with ``offload``, keep the inputs in CPU memory.

    Must run after the layers were compiled (``Module.compile`` stores the compiled
    call in ``_compiled_call_impl``, the slot ``Module.__call__`` runs; the wrapper
    takes that slot over so the checkpoint sits outside the compiled graph).
    """
    stash = HostStash(on_device=not offload)
    # Under frozen embeddings the first layer's input needs no gradient; the layer's output still must
    # carry one (its adapters train), and an autograd function's output does only if an input does.
    # This empty tensor is that input (nothing flows to it), in place of making the embeddings' output
    # require a gradient, so an eager first layer computes no input gradient. A compiled one still does
    # (and discards it): a graph of its own for that one layer would cost a compile for ~0.5% of a step.
    anchor = torch.empty(0, requires_grad=True)
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = False  # type: ignore[assignment]  # transformers' own: off, ours instead
        compiled = layer._compiled_call_impl is not None
        inner = layer._compiled_call_impl or layer._call_impl
        how = _How(compiled=compiled, index=index, draws=random_state.draws_random(layer))
        layer._compiled_call_impl = functools.partial(_checkpointed, inner, layer, stash, anchor, how)


@dataclass(frozen=True)
class _How:
    """What a layer's checkpoint knows of it: compiled or eager, its place, whether it draws random numbers."""

    compiled: bool
    index: int
    draws: bool


def _checkpointed(
    inner: Any,
    layer: torch.nn.Module,
    stash: HostStash,
    anchor: torch.Tensor,
    how: _How,
    *args: Any,
    **kwargs: Any,
) -> Any:
    if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
        return inner(*args, **kwargs)  # evaluation and generation: nothing to save
    extra: dict[str, Any] = {}
    hidden = _CheckpointedLayer.apply(args[0], anchor, inner, layer, args[1:], kwargs, stash, how, extra)
    return (hidden, *extra["rest"]) if extra.get("rest") is not None else hidden


class _CheckpointedLayer(torch.autograd.Function):
    """Run a layer saving only its input (in CPU memory when offloaded); in backward, run it again."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        anchor: torch.Tensor,
        inner: Any,
        layer: torch.nn.Module,
        rest: tuple[Any, ...],
        kwargs: dict[str, Any],
        stash: HostStash,
        how: _How,
        extra: dict[str, Any],
    ) -> torch.Tensor:
        ctx.inner, ctx.layer, ctx.rest, ctx.kwargs, ctx.stash, ctx.index = inner, layer, rest, kwargs, stash, how.index
        ctx.device, ctx.needs_input_grad_ = hidden.device, hidden.requires_grad
        ctx.differentiate_input = hidden.requires_grad or how.compiled
        ctx.autocast = _autocast_state(hidden.device.type)
        ctx.rng = random_state.saved(hidden.device) if how.draws else None  # a layer without dropout draws nothing
        # A compiled layer sees an input that needs no gradient here and one that does on the replay,
        # the same in every layer (the first one's included), so it keeps one graph for each run.
        with torch.no_grad(), recording() as parked:
            out = inner(hidden.detach(), *rest, **kwargs)
        first, extra["rest"] = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        attention = kept_attention.take(layer)  # what the attention left on its module (kept_attention)
        ctx.attention = len(attention)
        ctx.saved = stash.offload(
            how.index, hidden, *attention, *parked
        )  # what the layer parked travels with its input
        return first

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        hidden, *fetched = ctx.stash.fetch(ctx.saved, ctx.index, ctx.device)
        attention, parked = tuple(fetched[: ctx.attention]), tuple(fetched[ctx.attention :])
        hidden = hidden.detach().requires_grad_(ctx.differentiate_input)
        with (
            random_state.restored(ctx.rng, ctx.device),  # dropout draws what it drew in the forward
            torch.enable_grad(),
            torch.autocast(ctx.device.type, **ctx.autocast),
            replaying(parked),
            kept_attention.holding(ctx.layer, attention),
        ):
            out = ctx.inner(hidden, *ctx.rest, **ctx.kwargs)
        first = out[0] if isinstance(out, tuple) else out
        torch.autograd.backward(first, grad)
        return (hidden.grad if ctx.needs_input_grad_ else None, *[None] * 8)


def _autocast_state(device_type: str) -> dict[str, Any]:
    """The autocast the forward ran under, re-entered for the recompute (backward runs outside it)."""
    return {"enabled": torch.is_autocast_enabled(device_type), "dtype": torch.get_autocast_dtype(device_type)}
