"""The MLP of each decoder layer run over the sequence in tiles, saving only its input for backward.

At long context the MLP's intermediates dominate what a layer holds in backward:
an 8B Llama's gate, up and SiLU(gate)·up at 16k tokens are 3 × 448 MiB, and
their gradients as much again, while the layer's input is 128 MiB.  The MLP
treats every position on its own, so it can run over tiles of positions: the
forward computes its output tile by tile without saving anything, and backward
runs each tile again with gradients (the adapters' gradients accumulate tile
by tile).  Memory for the MLP then stays that of one tile at any length.

The price is one more MLP forward per layer.  Inside an offloaded checkpoint
(:mod:`checkpointing`) the layer already runs twice, and on the second run,
made only to be differentiated, the MLP's output value is never read when the
layer ends in ``residual + mlp(x)`` (Llama, Mistral, Qwen, Phi-3): there the
tiled MLP skips computing it (:mod:`replay`), so tiling costs no extra
work.  Architectures that normalise the MLP's output (Gemma 2 and 3, OLMo 2) compute it.

Dropout inside the MLP's adapters replays the masks of the forward (the RNG
state is restored), and the tiles' recompute runs under the forward's autocast.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.backends.torch.loading import decoder_layers
from tunelab.backends.torch.replay import is_replay, replaying
from tunelab.backends.torch.retype import retype
from tunelab.config.schema import MLP_TILE_TOKENS

TILE_TOKENS = MLP_TILE_TOKENS  # positions per tile: an 8B Llama's MLP intermediates for one tile are ~336 MiB
# Layers that end in `residual + mlp(x)`, so a replay made only for its gradient never reads the MLP's output.
RESIDUAL_MLP_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "smollm3"})


def tile_mlps(model: Any, tile_tokens: int = TILE_TOKENS) -> int:
    """Make each decoder layer's ``mlp`` run in tiles of ``tile_tokens`` positions; returns how many.

    Must run before the layers are compiled: the tiled call is kept out of the
    compiled graph (a graph break), since it calls backward inside backward.
    """
    skip_value = str(getattr(model.config, "model_type", "")) in RESIDUAL_MLP_MODELS
    count = 0
    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            continue
        mlp.tile_tokens, mlp.tile_skip_value = tile_tokens, skip_value
        retype(mlp, _TiledForward)
        count += 1
    return count


class _TiledForward:
    """Put in front of an MLP's class: its call runs in tiles (one class for every layer, so one graph)."""

    tile_tokens: int
    tile_skip_value: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _tiled_forward(self, x)


@torch.compiler.disable
def _tiled_forward(mlp: Any, x: torch.Tensor) -> torch.Tensor:
    inner, tile = super(_TiledForward, mlp).forward, mlp.tile_tokens
    if x.shape[:-1].numel() <= tile:
        return inner(x)
    if not torch.is_grad_enabled():  # tiles here too: dropout then draws its masks as backward will
        return _tiles(inner, x, tile)
    return _TiledMLP.apply(x, inner, tile, mlp.tile_skip_value and is_replay())


def _tiles(inner: Any, x: torch.Tensor, tile: int) -> torch.Tensor:
    out = torch.cat([inner(part) for part in x.reshape(-1, x.shape[-1]).split(tile)])
    return out.view(*x.shape[:-1], out.shape[-1])


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, inner: Any, tile: int, skip_value: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.inner, ctx.tile = inner, tile
        ctx.autocast = {"enabled": torch.is_autocast_enabled(x.device.type),
                        "dtype": torch.get_autocast_dtype(x.device.type)}  # fmt: skip
        ctx.rng = torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.save_for_backward(x)
        if skip_value:  # a checkpoint's replay: nothing reads this value, only its gradient flows back
            return torch.empty_like(x)
        with torch.no_grad():
            return _tiles(inner, x, tile)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        flat, grads = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        dx = torch.empty_like(flat)
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices):  # adapter dropout draws what the forward drew
            torch.set_rng_state(ctx.rng[0])
            if ctx.rng[1] is not None:
                torch.cuda.set_rng_state(ctx.rng[1], x.device)
            for start in range(0, flat.shape[0], ctx.tile):
                part = flat[start : start + ctx.tile].detach().requires_grad_(True)
                # A replay too: only the tile's gradient is taken, so a lean down projection skips its value.
                with torch.enable_grad(), torch.autocast(x.device.type, **ctx.autocast), replaying():
                    out = ctx.inner(part)
                torch.autograd.backward(out, grads[start : start + ctx.tile])
                dx[start : start + ctx.tile] = part.grad
        return dx.view_as(x), None, None, None
