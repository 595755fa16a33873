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

from collections.abc import Callable
from typing import Any

import torch

from tunelab.backends.torch.loading import decoder_layers
from tunelab.backends.torch.lora_parts import active_adapter

# True: everywhere; "cuda": on CUDA GPUs only, where it was measured (a CPU's products are its cost, not
# memory traffic); False: nowhere.  bench/gpu_env.sh's switch joined_b_off sets False, for another A/B.
ON: bool | str = "cuda"
BUFFER = "joined_weight"
# The shared groups (shared_lora_a.GROUPS) whose B's join, by the layer's child that holds them.  q/k/v's
# join is off until an A/B on a GPU measures it (bench/gpu_env.sh's switch joined_qkv).
GROUPS: tuple[str, ...] = ("mlp",)


def applies_on(device: torch.device) -> bool:
    """Whether :data:`ON` joins B for a model on ``device``."""
    return ON is True or device.type == ON


def join(model: Any) -> Refresher | None:
    """Give each decoder layer's shared groups named in :data:`GROUPS` joined weights; returns their refresher.

    None when nothing joined.

    Runs after :func:`shared_lora_a.share` (it joins only shared groups) and
    with the model on its device.  The caller marks the joined weights stale
    after each optimizer step (:meth:`Refresher.stale`): a fused optimizer
    changes B without moving its version counter.
    """
    joined_members: list[Any] = []
    for layer in decoder_layers(model):
        for parent_name in GROUPS:
            joined_members += _join_group(getattr(layer, parent_name, None))
    if not joined_members:
        return None
    refresher = Refresher(joined_members)
    stack_owner(model).register_forward_pre_hook(refresher)
    refresh(joined_members)
    return refresher


def _join_group(parent: Any) -> list[Any]:
    """Join the B's of the shared group whose first projection is ``parent``'s first child (none: [])."""
    first = next((m for m in getattr(parent, "children", list)() if hasattr(m, "_shared_rest")), None)
    members = (first, *getattr(first, "_shared_rest", ()))
    if first is None or len(members) < 2 or any(why_not(m) is not None for m in members):
        return []
    ranks: tuple[int, ...] = first._shared_ranks
    width = sum(ranks)
    offset = 0
    for member, rank in zip(members, ranks, strict=True):
        columns = member.base_layer.weight.shape[1]
        widen(member, BUFFER, cols=width)
        # (B's first column in the joined weight, its first column in the group's x A^T, the rank)
        object.__setattr__(member, "_joined_cols", (columns + offset, offset, rank))
        offset += rank
    return list(members)


def widen(member: Any, buffer: str, *, rows: int = 0, cols: int = 0) -> torch.Tensor:
    """Keep ``member``'s base weight W in the top-left corner of a zeroed ``rows`` + ``cols`` larger buffer.

    The buffer is registered on ``member`` as ``buffer`` (not saved), and the base weight becomes a view of
    it, so W is held once; the caller fills the rest (B's columns here, A's rows in :mod:`joined_a`).
    """
    base = member.base_layer
    weight = base.weight
    joined = weight.new_zeros(weight.shape[0] + rows, weight.shape[1] + cols)
    with torch.no_grad():
        joined[: weight.shape[0], : weight.shape[1]].copy_(weight)
    base.weight = torch.nn.Parameter(joined[: weight.shape[0], : weight.shape[1]], requires_grad=False)
    member.register_buffer(buffer, joined, persistent=False)
    return joined


class Refresher:
    """The decoder stack's pre-hook: refreshes joined weights when any of the adapter weights they copy changed.

    A tensor's version counter moves with in-place changes (a loaded state, a foreach optimizer), and a
    weight replaced by a new tensor has another identity; generation, which runs the stack once a token,
    then copies nothing between optimizer steps.  torch's fused AdamW leaves version counters as they
    were, so the backend calls :meth:`stale` after every step.  ``watched`` gives a member's copied
    weight (B here, A for :mod:`joined_a`), ``copy`` copies them all into their joined weights.
    """

    def __init__(
        self,
        members: list[Any],
        watched: Callable[[Any], torch.Tensor] | None = None,
        copy: Callable[[list[Any]], None] | None = None,
    ) -> None:
        self.members = members
        self.watched = watched or _b_of
        self.copy = copy or refresh
        self.seen: list[tuple[int, int]] | None = self._versions()

    def stale(self) -> None:
        """The weights may have changed in ways their version counters don't show: refresh before the next forward."""
        self.seen = None

    def __call__(self, *_: Any) -> None:
        now = self._versions()
        if now != self.seen:
            self.copy(self.members)
            self.seen = now

    def _versions(self) -> list[tuple[int, int]]:
        weights = [self.watched(m) for m in self.members]
        return [(id(w), w._version) for w in weights]


def _b_of(member: Any) -> torch.Tensor:
    weight: torch.Tensor = member.lora_B[active_adapter(member)].weight
    return weight


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
        start, _, rank = member._joined_cols
        name = active_adapter(member)
        getattr(member, BUFFER)[:, start : start + rank].copy_(member.lora_B[name].weight * member.scaling[name])


def output(module: Any, joined_input: torch.Tensor, xa: torch.Tensor) -> torch.Tensor:
    """``[x, x A^T] @ [W, s B]^T`` for one joined projection (its base output plus its adapter's).

    ``xa`` is the group's ``x A^T`` itself, the only activation B's gradient reads: backward keeps it,
    not the joined input, which is as wide as the layer (the compiled layer's partitioner kept that
    whole, measured on an H100 as 66 MB a layer at 1B 8x2048 without checkpointing).
    """
    name = active_adapter(module)
    _, offset, rank = module._joined_cols
    weight = getattr(module, BUFFER)
    out: torch.Tensor = _JoinedLinear.apply(
        joined_input, weight, xa, module.lora_B[name].weight, module.scaling[name], offset, rank
    )
    return out


def joined_input(x: torch.Tensor, xa: torch.Tensor, module: Any) -> torch.Tensor:
    """``[x, x A^T]`` in the joined weight's dtype."""
    dtype = getattr(module, BUFFER).dtype
    return torch.cat([x.to(dtype), xa.to(dtype)], dim=-1)


class _JoinedLinear(torch.autograd.Function):
    """``X @ J^T`` whose gradient goes to ``X`` and to the B that ``J`` holds beside W (``s g^T (x A^T)``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        joined: torch.Tensor,
        xa: torch.Tensor,
        b: torch.Tensor,
        scaling: float,
        offset: int,
        rank: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(xa, joined)
        ctx.scaling, ctx.offset, ctx.rank, ctx.b_dtype = scaling, offset, rank, b.dtype
        return torch.nn.functional.linear(x, joined)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        xa, joined = ctx.saved_tensors
        grad = grad.to(joined.dtype)
        grad_x = grad @ joined if ctx.needs_input_grad[0] else None
        grad_b = None
        if ctx.needs_input_grad[3]:
            rows = grad.reshape(-1, grad.shape[-1])
            # in the joined weight's dtype, as the joined input holds x A^T
            mine = xa.reshape(-1, xa.shape[-1])[:, ctx.offset : ctx.offset + ctx.rank].to(joined.dtype)
            grad_b = (rows.t() @ mine).to(ctx.b_dtype) * ctx.scaling
        # xa's own gradient flows through the joined input, which holds it too
        return grad_x, None, None, grad_b, None, None, None


def stack_owner(model: Any) -> torch.nn.Module:
    """The module that runs the decoder stack: every forward through the layers starts in it."""
    layers = decoder_layers(model)
    for module in model.modules():
        if any(child is layers for child in module.children()):
            return module  # type: ignore[no-any-return]
    raise ValueError("the decoder stack has no owning module")
