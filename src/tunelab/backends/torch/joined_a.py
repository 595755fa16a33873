"""The output and down projections' adapter A joined into their base products: ``x @ [W; A]^T``.

:mod:`joined_b` joins B where a projection's output is the wide side (gate and
up: 14,336 columns at 8B against 4,096 in).  The down projection is the other
way round: its input, SiLU·up's output, is the wide one (4,096 tokens × 14,336
at 8B, 117 MB in bf16), and PEFT reads it twice in the forward, once for
``x W^T`` and once more for the rank-16 ``x A^T``.  In backward the input's
gradient comes in two products, ``g W`` and ``(s g B) A``, each as wide as the
input, then added: one more write and one more read of 117 MB.  With A's rows
appended to W (``J = [W; A]``, kept, W a view of it), one product
``x J^T = [x W^T, x A^T]`` reads x once, and one product
``[g, s g B] @ J = g W + s (g B) A`` gives the whole input gradient.  The cost
is r more output columns forward and r more inner columns backward (0.4% at
8B).  The output projection (4,096 wide both ways) gets the same.

Only for bases the product can read directly (floating-point, frozen, without
bias) under one plain adapter pair without dropout.  A's rows are copied into
``J`` before the first forward after A changes (:class:`joined_b.Refresher`).
Adapters switched off or merged, and per-row ``adapter_names``, take PEFT's path
on W's view.

On a checkpoint's replay the down projection's output is unread (:mod:`lean_replay`):
:func:`replayed` then computes only ``x A^T`` forward and the same joined backward.

On CUDA GPUs (:data:`ON`), where ``tunelab train`` measured it on an H100
(session 43, Unsloth's benchmark rows): 1B LoRA 8×2048 2.9% more tokens a
second at 0.24 GiB less peak, 8B LoRA 2×2048 0.5% and with checkpointing 0.3%,
the same losses to the third decimal.  ``bench/gpu_env.sh``'s switch
``joined_a_off`` turns it off for an A/B.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.backends.torch import joined_b, shared_lora_a
from tunelab.backends.torch.loading import decoder_layers
from tunelab.backends.torch.lora_parts import active_adapter
from tunelab.backends.torch.retype import retype

# As joined_b.ON: True everywhere, "cuda" on CUDA GPUs only (a CPU's products are its cost, not memory
# traffic, so one product r columns wider gains nothing there), False nowhere.
ON: bool | str = "cuda"
BUFFER = "joined_a_weight"
# (the layer's child, its projection): the projections whose A joins
TARGETS = (("self_attn", "o_proj"), ("mlp", "down_proj"))


def applies_on(device: torch.device) -> bool:
    """Whether :data:`ON` joins A for a model on ``device``."""
    return ON is True or device.type == ON


def join(model: Any) -> joined_b.Refresher | None:
    """Give each decoder layer's output and down projections ``[W; A]``; returns their refresher (None: none)."""
    members = []
    for layer in decoder_layers(model):
        for parent, name in TARGETS:
            module = getattr(getattr(layer, parent, None), name, None)
            if module is None or why_not(module) is not None:
                continue
            joined_b.widen(module, BUFFER, rows=_a(module).shape[0])  # W held once, as a view
            retype(module, _JoinedA)
            members.append(module)
    if not members:
        return None
    refresher = joined_b.Refresher(members, watched=_a, copy=refresh)
    joined_b.stack_owner(model).register_forward_pre_hook(refresher)
    refresh(members)
    return refresher


def why_not(module: Any) -> str | None:
    """Why a LoRA projection's A can't join its base weight (None when it can)."""
    return shared_lora_a.why_not(module) or joined_b.why_not(module)


@torch.no_grad()
def refresh(members: list[Any]) -> None:
    """Copy each member's A into the rows of its joined weight below W (A changes at every optimizer step)."""
    for member in members:
        a = _a(member)
        getattr(member, BUFFER)[-a.shape[0] :].copy_(a)


def _a(module: Any) -> torch.Tensor:
    weight: torch.Tensor = module.lora_A[active_adapter(module)].weight
    return weight


class _JoinedA:
    """Put in front of a LoRA projection's class: its base product and ``x A^T`` in one product."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not takes(self, kwargs):
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        return _product(self, x, unread=False)


def takes(module: Any, kwargs: dict[str, Any]) -> bool:
    """Whether this call of ``module`` runs joined: A joined, adapters on and unmerged, no per-row adapter names."""
    joined = getattr(module, BUFFER, None) is not None
    return joined and "adapter_names" not in kwargs and not (module.disable_adapters or module.merged)


def replayed(module: Any, x: torch.Tensor) -> torch.Tensor:
    """A replay's down projection (:mod:`lean_replay`), whose output nobody reads: zeros, and the gradients.

    Forward runs only ``x A^T`` (B's gradient reads it); backward is the joined one, so the input gradient
    is still one product, ``[g, s g B] @ [W; A]``.
    """
    return _product(module, x, unread=True)


def _product(module: Any, x: torch.Tensor, *, unread: bool) -> torch.Tensor:
    name = active_adapter(module)
    b = module.lora_B[name].weight
    out: torch.Tensor = _JoinedALinear.apply(x, getattr(module, BUFFER), _a(module), b, module.scaling[name], unread)
    return out


class _JoinedALinear(torch.autograd.Function):
    """``x W^T + s (x A^T) B^T`` from ``J = [W; A]``: gradients to x, A and B (``unread``: zeros forward)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        joined: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        scaling: float,
        unread: bool = False,
    ) -> torch.Tensor:
        width = joined.shape[0] - a.shape[0]
        if unread:
            xa = torch.nn.functional.linear(x, joined[width:])
            out = x.new_zeros(*x.shape[:-1], width, dtype=xa.dtype)
        else:
            both = torch.nn.functional.linear(x, joined)
            # x A^T alone, contiguous: keeping a view would keep the whole product alive until backward
            xa = both[..., width:].contiguous()
            lora = torch.nn.functional.linear(xa.to(b.dtype), b) * scaling  # under autocast: bf16 again
            # The sum is returned as made, never through a cast that can be a no-op: torch 2.11's dynamo
            # gave a forward's output that is also one of its intermediates (``(s + l).to(dtype)`` when
            # the dtype already matches, as under CUDA autocast) the wrong autograd slot, and every
            # gradient through the layer came back zero (bench/README.md, session 43).
            out = both[..., :width] + lora.to(both.dtype)
        ctx.save_for_backward(x, xa, joined, b)
        ctx.scaling, ctx.a_dtype, ctx.b_dtype = scaling, a.dtype, b.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, xa, joined, b = ctx.saved_tensors
        grad = grad.to(joined.dtype)
        g_xa = (grad @ b.to(grad.dtype)) * ctx.scaling  # the gradient of x A^T
        grad_x = torch.cat([grad, g_xa], dim=-1) @ joined if ctx.needs_input_grad[0] else None
        grad_a = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_a = (g_xa.reshape(-1, g_xa.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(grad.dtype)).to(ctx.a_dtype)
        if ctx.needs_input_grad[3]:
            rows = grad.reshape(-1, grad.shape[-1])
            grad_b = ((rows.t() @ xa.reshape(-1, xa.shape[-1]).to(grad.dtype)) * ctx.scaling).to(ctx.b_dtype)
        return grad_x, None, grad_a, grad_b, None, None
