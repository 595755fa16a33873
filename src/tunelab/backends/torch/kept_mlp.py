"""Each layer's MLP activations parked in CPU memory, so a checkpoint's replay runs no MLP matrix product.

An offloaded checkpoint (:mod:`checkpointing`) runs every decoder layer a
second time in backward, to differentiate it.  In an 8B Llama the MLP holds
four fifths of a layer's matrix work, and backward needs only two of its
tensors to differentiate it without running it: the gate and up projections
(SiLU(gate)·up follows from them elementwise).  So on the first run the MLP
parks gate and up, they travel to pinned CPU memory and back with the layer's
input (overlapped with compute, like it), and on the replay the MLP computes
nothing: its backward takes the frozen base weights' input gradient straight
from the weights (``dy @ W``; what a base layer's own backward does) and runs
only the adapters' small branches with autograd.  The step then does about
five units of matrix work instead of six.

The price is CPU memory (4 × tokens × intermediate_size bytes per layer in
bf16: 7.5 GB for an 8B Llama at 4,096 tokens) and the copies' bandwidth.  A
micro-batch whose parked tensors would pass the budget set at start runs the
MLP again on the replay instead, as it would without this.

It applies to adapters without a weight-decomposed variant (LoRA, QLoRA at
4 bits) on MLPs of the form ``down(act(gate(x)) · up(x))`` in layers that end
in ``residual + mlp(x)``, whose output value a replay never reads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from tunelab.backends.torch import random_state
from tunelab.backends.torch.host_link import HostLink
from tunelab.backends.torch.loading import decoder_layers
from tunelab.backends.torch.lora_parts import adapter_branch, input_grad
from tunelab.backends.torch.replay import is_replay, park, parked
from tunelab.backends.torch.retype import retype
from tunelab.backends.torch.tiled_mlp import RESIDUAL_MLP_MODELS

# Residual-MLP layers with separate gate/up/down projections (Phi-3 fuses gate and up into one).
KEPT_MLP_MODELS = RESIDUAL_MLP_MODELS - {"phi3"}
HOST_SHARE = 0.5  # of the CPU memory available at start, the most the parked activations may take


def kept_mlp_applies(model: Any, method: str, bits: int | None) -> str | None:
    """Why the MLPs of ``model`` can't be kept under ``method`` (None: they can)."""
    if method not in ("lora", "qlora"):
        return f"it needs a frozen base and plain adapters, and method: {method} trains other weights"
    if method == "qlora" and bits == 8:
        return "it reads 4-bit bases' weights back for the gradient, and this base is 8-bit"
    kind = str(getattr(model.config, "model_type", ""))
    if kind not in KEPT_MLP_MODELS:
        return (
            f"it needs an MLP of the form down(act(gate(x))·up(x)) after a residual, and {kind or 'this'} models differ"
        )
    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return "a decoder layer lacks the gate/up/down projections it differentiates"
        for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            if getattr(proj, "lora_variant", None):
                return "weight-decomposed adapters (DoRA) need their own backward; it supports plain LoRA"
    return None


def host_budget() -> int:
    """The most CPU memory the parked activations may take: a share of what is available at start."""
    try:  # Linux counts reclaimable page cache as available; sysconf's free pages would not
        found = re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        available = int(found.group(1)) * 1024 if found else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # no /proc, no sysconf name: nothing is parked rather than too much
        available = 0
    return int(available * HOST_SHARE)


def parked_layers(model: Any, link: HostLink) -> int:
    """How many layers, from the first, should park their MLP: as many as the link copies out in a forward.

    Both a layer's forward and its copy grow with the tokens, so their ratio is
    the machine's and the model's alone.  The first layers park: their copies
    finish while the later layers compute, and backward reads them last.
    """
    c = model.config
    layers, width, inner = len(decoder_layers(model)), c.hidden_size, c.intermediate_size
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or width // heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    matmul_flops = 2 * (2 * width * heads * head_dim + 2 * width * kv * head_dim + 3 * width * inner)  # per token
    copied_bytes = 2 * (2 * inner + width)  # gate and up in bf16, and the layer's input that travels too
    share = (matmul_flops / link.flops) / (copied_bytes / link.bytes_per_s)
    return max(0, min(layers, int(layers * share)))


def keep_mlps(model: Any, budget_bytes: int, count: int | None = None) -> int:
    """Make the first ``count`` decoder layers' MLPs (all: None) park their activations; returns how many.

    Must run before the layers are compiled: the kept MLP stays outside the
    compiled graph (its replay returns no value and differentiates by hand).
    """
    layers = decoder_layers(model)
    count = len(layers) if count is None else min(count, len(layers))
    for layer in list(layers)[:count]:
        mlp: Any = layer.mlp
        mlp.kept_layers, mlp.kept_budget = count, budget_bytes
        mlp.kept_draws = random_state.draws_random(mlp)  # read once: the walk costs host time at every call
        retype(mlp, _KeptForward)
    return count


class _KeptForward:
    """Put in front of an MLP's class: it parks gate and up, and its replay runs no matrix product."""

    kept_layers: int
    kept_budget: int
    kept_draws: bool  # whether the MLP can draw random numbers (dropout), so its backward needs the forward's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _kept_forward(self, x)


@torch.compiler.disable
def _kept_forward(mlp: Any, x: torch.Tensor) -> torch.Tensor:
    if is_replay():
        kept = parked()
        return _KeptMLP.apply(x, mlp, *kept) if len(kept) == 2 else super(_KeptForward, mlp).forward(x)
    if torch.is_grad_enabled():  # no checkpoint around it: autograd saves what it needs, as usual
        return super(_KeptForward, mlp).forward(x)
    gate = mlp.gate_proj(x)  # the same modules in the same order as the MLP's own forward (dropout masks too)
    up = mlp.up_proj(x)
    if mlp.kept_layers * 2 * gate.nbytes <= mlp.kept_budget:
        park(gate, up)  # outside a checkpoint's first run (evaluation, generation) nothing is parked
    return mlp.down_proj(mlp.act_fn(gate) * up)


class _KeptMLP(torch.autograd.Function):
    """The replay's MLP: no value (nothing reads it), and a backward from the parked gate and up."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mlp: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.mlp = mlp
        ctx.autocast = {"enabled": torch.is_autocast_enabled(x.device.type),
                        "dtype": torch.get_autocast_dtype(x.device.type)}  # fmt: skip
        # The replay has drawn the attention's dropout masks again: the generator stands where the
        # first run's MLP found it, so its adapters' masks are drawn again below in the same order.
        ctx.rng = random_state.saved(x.device) if mlp.kept_draws else None  # no dropout: nothing to draw again
        ctx.save_for_backward(x, gate, up)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, gate, up = ctx.saved_tensors
        mlp = ctx.mlp
        with (
            random_state.restored(ctx.rng, x.device),
            torch.enable_grad(),
            torch.autocast(x.device.type, **ctx.autocast),
        ):
            xl = x.detach().requires_grad_(True)
            gl, ul = gate.detach().requires_grad_(True), up.detach().requires_grad_(True)
            branch_gate, branch_up = adapter_branch(mlp.gate_proj, xl), adapter_branch(mlp.up_proj, xl)
            hidden = mlp.act_fn(gl) * ul
            branch_down = adapter_branch(mlp.down_proj, hidden)
        # down: d hidden = dy·W_down (the frozen base) + what its adapter adds, in one pass back to gate and up
        outs, grads = [hidden], [input_grad(mlp.down_proj, grad)]
        if branch_down is not None:
            outs.append(branch_down)
            grads.append(grad)
        torch.autograd.backward(outs, grads)
        d_gate, d_up = gl.grad, ul.grad
        dx = input_grad(mlp.gate_proj, d_gate) + input_grad(mlp.up_proj, d_up)
        branches = [(b, d) for b, d in ((branch_gate, d_gate), (branch_up, d_up)) if b is not None]
        if branches:
            torch.autograd.backward([b for b, _ in branches], [d for _, d in branches])
            dx = dx + xl.grad
        return dx.to(x.dtype), None, None, None
