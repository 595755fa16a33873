"""The MLP's gate and up adapters' B joined into their base products: ``[x, x A^T] @ [W, s B]^T``.

In a LoRA step on a GPU, past the big matrix products, time goes to memory
traffic.  PEFT computes ``gate = x W^T + s (x A^T) B^T`` as two products whose
outputs (an 8B Llama's gate is 4,096 × 14,336 values for 4,096 tokens, 117 MB
in bf16) are written out and read back to be added, then read again by
SiLU·up; up likewise.  Backward reads the output's gradient once more for
``g B`` alone.  Joining B into the base product (the rank columns appended to
the inner dimension) writes each output once, with ~0.8% more multiply-adds
(r columns beside 4,096), and one backward product gives both ``g W`` and
``g B s``.

The joined weight ``[W, s B_gate, s B_up]`` (one per projection, B slices
that aren't its own left zero) is kept, so no per-call concatenation copies the
weight: the base layer's own weight becomes a view of its first K columns (no
second copy), and the B columns are refreshed from the adapters before each
forward through the decoder stack that follows a change of B (:func:`refresh`,
from a pre-hook), since the optimizer changes B between steps.  The input side ``[x, x A^T]`` is the
group's one shared input product (:mod:`shared_lora_a`) concatenated to x.
Backward gives B its gradient ``s g^T (x A^T)`` itself (:class:`_JoinedLinear`);
the joined weight has none.

Only for bases the product can read directly: floating-point, frozen,
without bias.  Adapters switched off or merged take PEFT's own path on the base
weight's view, which still holds W.

On for CUDA (:data:`ON`) since an A/B through ``tunelab train`` on an H100 (one
lease, 1B Llama shape, LoRA r16 on the seven linears, 8x2048 tokens, no
checkpointing) measured 75,289 -> 79,375 tok/s (+5.4%) at 16.90 -> 17.43 GiB
(Unsloth beside it: 72,892 at 19.25), with the same losses to the third
decimal.  In bf16 its gradients are no further from an fp32 run's than PEFT's
own bf16 gradients (tests).
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.backends.torch.loading import decoder_layers
from tunelab.backends.torch.lora_parts import active_adapter

# True: everywhere; "cuda": on CUDA GPUs only, where it was measured (a CPU's products are its cost, not
# memory traffic); False: nowhere.  bench/gpu_env.sh's switch joined_b_off sets False, for another A/B.
ON: bool | str = "cuda"
BUFFER = "joined_weight"


def applies_on(device: torch.device) -> bool:
    """Whether :data:`ON` joins B for a model on ``device``."""
    return ON is True or device.type == ON


def join(model: Any) -> Refresher | None:
    """Give each decoder layer's shared gate/up group joined weights; returns their refresher (None: none).

    Runs after :func:`shared_lora_a.share` (it joins only shared groups) and
    with the model on its device.  The caller marks the joined weights stale
    after each optimizer step (:meth:`Refresher.stale`): a fused optimizer
    changes B without moving its version counter.
    """
    joined_members: list[Any] = []
    for layer in decoder_layers(model):
        first = getattr(getattr(layer, "mlp", None), "gate_proj", None)
        members = (first, *getattr(first, "_shared_rest", ()))
        if first is None or len(members) < 2 or any(why_not(m) is not None for m in members):
            continue
        ranks: tuple[int, ...] = first._shared_ranks
        width = sum(ranks)
        start = 0
        for member, rank in zip(members, ranks, strict=True):
            base = member.base_layer
            weight = base.weight
            joined = weight.new_zeros(weight.shape[0], weight.shape[1] + width)
            with torch.no_grad():
                joined[:, : weight.shape[1]].copy_(weight)
            # The base weight becomes a view of the joined one: W is held once.
            base.weight = torch.nn.Parameter(joined[:, : weight.shape[1]], requires_grad=False)
            member.register_buffer(BUFFER, joined, persistent=False)
            object.__setattr__(member, "_joined_cols", (weight.shape[1] + start, rank))
            joined_members.append(member)
            start += rank
    if not joined_members:
        return None
    refresher = Refresher(joined_members)
    _stack_owner(model).register_forward_pre_hook(refresher)
    refresh(joined_members)
    return refresher


class Refresher:
    """The decoder stack's pre-hook: refreshes the joined weights when any B has changed since the last time.

    A tensor's version counter moves with in-place changes (a loaded state, a foreach optimizer), and a
    B replaced by a new tensor has another identity; generation, which runs the stack once a token, then
    copies nothing between optimizer steps.  torch's fused AdamW leaves version counters as they were,
    so the backend calls :meth:`stale` after every step.
    """

    def __init__(self, members: list[Any]) -> None:
        self.members = members
        self.seen: list[tuple[int, int]] | None = _versions(members)

    def stale(self) -> None:
        """B may have changed in ways its version counter doesn't show: refresh before the next forward."""
        self.seen = None

    def __call__(self, *_: Any) -> None:
        now = _versions(self.members)
        if now != self.seen:
            refresh(self.members)
            self.seen = now


def _versions(members: list[Any]) -> list[tuple[int, int]]:
    weights = [m.lora_B[active_adapter(m)].weight for m in members]
    return [(id(w), w._version) for w in weights]


def why_not(module: Any) -> str | None:
    """Why a (shared) LoRA projection's base can't be joined with its B (None when it can)."""
    base = getattr(module, "base_layer", None)
    weight = getattr(base, "weight", None)
    if not isinstance(base, torch.nn.Linear) or not isinstance(weight, torch.Tensor):
        return "not a plain linear base"
    if getattr(weight, "quant_state", None) is not None or not weight.is_floating_point():
        return "a quantized base has no weight to append to"
    if weight.requires_grad:
        return "the base weight trains"
    if base.bias is not None:
        return "a base with a bias"
    return None


@torch.no_grad()
def refresh(members: list[Any]) -> None:
    """Copy each joined projection's ``s B`` into its joined weight (B changes at every optimizer step)."""
    for member in members:
        start, rank = member._joined_cols
        name = active_adapter(member)
        getattr(member, BUFFER)[:, start : start + rank].copy_(member.lora_B[name].weight * member.scaling[name])


def output(module: Any, joined_input: torch.Tensor) -> torch.Tensor:
    """``[x, x A^T] @ [W, s B]^T`` for one joined projection (its base output plus its adapter's)."""
    name = active_adapter(module)
    start, rank = module._joined_cols
    weight = getattr(module, BUFFER)
    out: torch.Tensor = _JoinedLinear.apply(
        joined_input, weight, module.lora_B[name].weight, module.scaling[name], start, rank
    )
    return out


def joined_input(x: torch.Tensor, xa: torch.Tensor, module: Any) -> torch.Tensor:
    """``[x, x A^T]`` in the joined weight's dtype."""
    dtype = getattr(module, BUFFER).dtype
    return torch.cat([x.to(dtype), xa.to(dtype)], dim=-1)


class _JoinedLinear(torch.autograd.Function):
    """``X @ J^T`` whose gradient goes to ``X`` and to the B that ``J``'s columns ``start:start+rank`` hold."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, joined: torch.Tensor, b: torch.Tensor, scaling: float, start: int, rank: int
    ) -> torch.Tensor:
        ctx.save_for_backward(x, joined)
        ctx.scaling, ctx.start, ctx.rank, ctx.b_dtype = scaling, start, rank, b.dtype
        return torch.nn.functional.linear(x, joined)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, joined = ctx.saved_tensors
        grad = grad.to(joined.dtype)
        grad_x = grad @ joined if ctx.needs_input_grad[0] else None
        grad_b = None
        if ctx.needs_input_grad[2]:
            rows = grad.reshape(-1, grad.shape[-1])
            xa = x.reshape(-1, x.shape[-1])[:, ctx.start : ctx.start + ctx.rank]
            grad_b = (rows.t() @ xa).to(ctx.b_dtype) * ctx.scaling
        return grad_x, None, grad_b, None, None, None


def _stack_owner(model: Any) -> torch.nn.Module:
    """The module that runs the decoder stack: every forward through the layers starts in it."""
    layers = decoder_layers(model)
    for module in model.modules():
        if any(child is layers for child in module.children()):
            return module  # type: ignore[no-any-return]
    raise ValueError("the decoder stack has no owning module")
