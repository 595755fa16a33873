"""One down-projection for the adapters that read the same input: q/k/v, and gate/up.

In a Llama-style layer, q, k and v read the same normalised hidden state, and
so do the MLP's gate and up.  PEFT gives each adapter its own ``x @ A^T``, so the
layer reads that activation three times (twice for the MLP) for products of
only r columns each.  In backward it makes three input-gradient terms
``g_xa @ A`` of the activation's full width, which are then added together,
and three weight gradients, each reading the activation again.  With the A's stacked
(``[A_q; A_k; A_v]``, r rows each), one product ``x @ A^T`` serves the whole
group.  Its backward is one product for the input gradient and one for the
stacked weights' gradient.  Under autocast, the activation is also cast once
for the group, not once per adapter: PEFT casts it to the adapter's fp32 and
autocast casts it back.

The group's first projection (q, gate) computes the shared product and leaves
the other members' slices for them.  The next members called with that same
tensor take their slice instead of computing their own, eager or compiled.  Anything
else (another input, adapters switched off or merged, PEFT's per-row adapter_names)
takes PEFT's own path.  The hand-over goes through one module-level object that all layers share, because
the compiled layer's graph must see the same code and objects in every layer
(:mod:`retype`).

On (:data:`ON`) since an A/B through ``tunelab train`` on an H100 (one lease,
8B and 1B Llama shapes, LoRA r16 on the seven linears, 2048-token rows) measured
+2.0% tok/s with checkpointing (8B) and +3.2% without (1B), with the same
losses and peak memory.  ``bench/gpu_env.sh``'s switch ``shared_a_off`` makes a
tree without it for another A/B.  The hand-over object is shared by every model
in the process; a training process runs one model at a time (the service's chat
runs its model on one thread), and a caller with another input only takes
PEFT's own path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab.backends.torch import joined_b
from tunelab.backends.torch.loading import decoder_layers
from tunelab.backends.torch.lora_parts import active_adapter
from tunelab.backends.torch.retype import retype

ON = True
GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


@dataclass
class _Handover:
    """The group's input and the slices of ``x @ A^T`` its later members take, in call order."""

    x: torch.Tensor | None = None
    parts: list[torch.Tensor] = field(default_factory=list)
    xa: torch.Tensor | None = None  # joined B (joined_b.py): the group's x A^T, which B's gradients read


_HANDOVER = _Handover()


def share(model: Any) -> int:
    """Stack the A's of each decoder layer's q/k/v and gate/up adapters; returns how many groups."""
    count = 0
    for layer in decoder_layers(model):
        for parent_name, names in GROUPS:
            parent = getattr(layer, parent_name, None)
            members = [getattr(parent, n, None) for n in names]
            if parent is None or any(m is None or why_not(m) is not None for m in members):
                continue
            if len({active_adapter(m) for m in members}) != 1 or len({_a(m).dtype for m in members}) != 1:
                continue
            first, rest = members[0], tuple(members[1:])
            # Plain attributes (object.__setattr__): as nn.Module attributes the followers would be
            # registered as the first one's children, and saved and walked twice.
            object.__setattr__(first, "_shared_rest", rest)
            object.__setattr__(first, "_shared_ranks", tuple(_a(m).shape[0] for m in members))
            retype(first, _First)
            for member in rest:
                retype(member, _Later)
            count += 1
    return count


def why_not(module: Any) -> str | None:
    """Why ``module``'s adapter can't share its input product (None when it can)."""
    if not hasattr(module, "lora_A"):
        return "not a LoRA layer"
    names = [n for n in module.active_adapters if n in module.lora_A]
    if len(names) != 1:
        return "not exactly one active adapter"
    a, b = module.lora_A[names[0]], module.lora_B[names[0]]
    if names[0] in getattr(module, "lora_variant", {}):
        return "weight-decomposed adapters (DoRA) run their own forward"
    if type(a) is not torch.nn.Linear or a.bias is not None or type(b) is not torch.nn.Linear:
        return "not a plain low-rank pair"
    if not isinstance(module.lora_dropout[names[0]], torch.nn.Identity):
        return "dropout gives each adapter its own input"
    return None


def _a(module: Any) -> torch.Tensor:
    weight: torch.Tensor = module.lora_A[active_adapter(module)].weight
    return weight


def _plain(module: Any) -> bool:
    """Whether PEFT's own path must run: adapters switched off or merged into the base."""
    return bool(module.disable_adapters or module.merged)


def _finish(module: Any, x: torch.Tensor, xa: torch.Tensor, args: Any, kwargs: Any) -> torch.Tensor:
    """The base's output plus this adapter's ``B`` on its slice of ``x @ A^T``, as PEFT adds it."""
    result: torch.Tensor = module.base_layer(x, *args, **kwargs)
    name = active_adapter(module)
    return (result + module.lora_B[name](xa) * module.scaling[name]).to(result.dtype)


class _First:
    """The group's first projection: computes ``x @ [A_1; ...; A_n]^T`` and leaves the others' slices."""

    _shared_rest: tuple[Any, ...]
    _shared_ranks: tuple[int, ...]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        members = (self, *self._shared_rest)
        if "adapter_names" in kwargs or any(_plain(m) for m in members):
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        stacked = torch.cat([_a(m) for m in members])
        # Under autocast the product runs in the autocast dtype whatever x's; PEFT's cast of x to the
        # adapter's fp32 (undone by autocast) would only copy it.
        xin = x if torch.is_autocast_enabled(x.device.type) else self._cast_input_dtype(x, stacked.dtype)  # type: ignore[attr-defined]
        xa = torch.nn.functional.linear(xin, stacked)
        if getattr(self, "_joined_cols", None) is not None:  # B joined into the base products: one input for all
            both = joined_b.joined_input(x, xa, self)
            _HANDOVER.x, _HANDOVER.parts, _HANDOVER.xa = x, [both] * len(self._shared_rest), xa
            return joined_b.output(self, both, xa)
        parts = list(xa.split(self._shared_ranks, dim=-1))
        _HANDOVER.x, _HANDOVER.parts = x, parts[1:]
        return _finish(self, x, parts[0], args, kwargs)


class _Later:
    """A later projection of the group: takes its slice when called with the group's input."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if _HANDOVER.x is not x or not _HANDOVER.parts or "adapter_names" in kwargs or _plain(self):
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        xa, group_xa = _HANDOVER.parts.pop(0), _HANDOVER.xa
        if not _HANDOVER.parts:
            _HANDOVER.x = _HANDOVER.xa = None  # the last member: nothing stays referenced past the group
        if getattr(self, "_joined_cols", None) is not None and group_xa is not None:
            return joined_b.output(self, xa, group_xa)  # xa is the group's [x, x A^T]
        return _finish(self, x, xa, args, kwargs)
