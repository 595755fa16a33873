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

A 4-bit (QLoRA) base dequantizes its weight in every product: per tile, that
is each of gate, up and down again in the forward's tiles and twice more in
backward's (bitsandbytes' backward dequantizes anew).  With
:data:`DEQUANTIZE_ONCE` the tiled call dequantizes each of the MLP's 4-bit
weights once and its tiles multiply by that (three weights of a layer held at
once: 352 MB at 8B in bf16; the measured peak rose 0.05 GiB).

Where the decoder layers are compiled, each tile runs through one compiled
function too (:func:`tile_mlps`' ``compile_backend``): the tiled call itself must
stay outside the layer's graph, and run eagerly a tile is a dozen separate
elementwise kernels (SiLU, the product with up, the adapters' scalings and
sums, casts).  On an H100 those came to about 170 ms of a 2.1 s step at 16k
tokens (8B QLoRA, ``bench/step_profile.py qlora_gc_16k``); compiled, the run
went from 7,660 to 8,404 tok/s (bench/README.md).  The MLP must then
have no active dropout: a compiled graph draws its masks its own way, and the
tile's forward (no gradients) and backward (with) are two different graphs.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from tunelab.backends.torch import fast, random_state
from tunelab.backends.torch.loading import decoder_layers
from tunelab.backends.torch.lora_parts import DEQUANTIZED, base_weight
from tunelab.backends.torch.replay import is_replay, replaying
from tunelab.backends.torch.retype import retype
from tunelab.config.schema import MLP_TILE_TOKENS

TILE_TOKENS = MLP_TILE_TOKENS  # positions per tile: an 8B Llama's MLP intermediates for one tile are ~336 MiB
# 4-bit weights dequantized once a tiled call.  On since an A/B on an H100 (8B QLoRA 1x16,384, checkpointing,
# one lease): 8,694 -> 8,873-8,928 tok/s at 7.46 -> 7.51 GiB, same losses.  gpu_env.sh's dequant_per_tile
# switch now turns it off.
DEQUANTIZE_ONCE = True
# Layers that end in `residual + mlp(x)`, so a replay made only for its gradient never reads the MLP's output.
RESIDUAL_MLP_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "smollm3"})


def tile_mlps(model: Any, tile_tokens: int = TILE_TOKENS, compile_backend: str | None = None) -> int:
    """Make each decoder layer's ``mlp`` run in tiles of ``tile_tokens`` positions; returns how many.

    Must run before the layers are compiled: the tiled call is kept out of the
    compiled graph (a graph break), since it calls backward inside backward.
    With ``compile_backend`` (a ``torch.compile`` backend: "inductor" where the
    layers are compiled), each tile of an MLP without active dropout runs
    through one function compiled with it, shared by every layer.
    """
    skip_value = str(getattr(model.config, "model_type", "")) in RESIDUAL_MLP_MODELS
    count = 0
    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            continue
        mlp.tile_tokens, mlp.tile_skip_value = tile_tokens, skip_value
        mlp.tile_draws = random_state.draws_random(mlp)  # read once: the walk costs host time at every call
        # A compiled tile would draw other dropout masks in its backward than in its forward: those stay eager.
        mlp.tile_compiled = _compiled_tile(compile_backend) if compile_backend and not mlp.tile_draws else None
        retype(mlp, _TiledForward)
        for base in _four_bit_bases(mlp) if DEQUANTIZE_ONCE else ():
            retype(base, _FromDequantized)  # before compiling: the tiles' graph sees the product it runs
        count += 1
    return count


_COMPILED_TILES: dict[str, Any] = {}


def _compiled_tile(backend: str) -> Any:
    """One compiled function a backend, for every layer: dynamo lifts each MLP's weights to graph inputs."""
    if backend not in _COMPILED_TILES:
        mode = fast.MODE if backend == "inductor" else None  # a mode is inductor's alone
        _COMPILED_TILES[backend] = torch.compile(_tile, backend=backend, mode=mode)
    return _COMPILED_TILES[backend]


def _tile(mlp: Any, x: torch.Tensor) -> torch.Tensor:
    """The MLP's own forward on one tile (or on a whole input no longer than one)."""
    out: torch.Tensor = super(_TiledForward, mlp).forward(x)
    return out


class _TiledForward:
    """Put in front of an MLP's class: its call runs in tiles (one class for every layer, so one graph)."""

    tile_tokens: int
    tile_skip_value: bool
    tile_compiled: Any
    tile_draws: bool  # whether the MLP can draw random numbers (dropout), so its backward needs the forward's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _tiled_forward(self, x)


@torch.compiler.disable
def _tiled_forward(mlp: Any, x: torch.Tensor) -> torch.Tensor:
    tile = mlp.tile_tokens
    inner = partial(mlp.tile_compiled or _tile, mlp)
    if x.shape[:-1].numel() <= tile:
        return inner(x)
    if not torch.is_grad_enabled():  # tiles here too: dropout then draws its masks as backward will
        return _tiles(inner, x, tile, mlp)
    return _TiledMLP.apply(x, inner, tile, mlp.tile_skip_value and is_replay(), mlp)


def _tiles(inner: Any, x: torch.Tensor, tile: int, mlp: Any) -> torch.Tensor:
    with _dequantized(mlp):
        out = torch.cat([inner(part) for part in x.reshape(-1, x.shape[-1]).split(tile)])
    return out.view(*x.shape[:-1], out.shape[-1])


class _dequantized:  # a context manager, named for the state it sets
    """With :data:`DEQUANTIZE_ONCE`: the MLP's 4-bit base weights dequantized for the tiles of one call.

    :func:`lora_parts.base_weight` and the bases' products (:class:`_FromDequantized`) read them
    from the base layer's ``DEQUANTIZED`` attribute while it is set; they are dropped on exit.
    """

    def __init__(self, mlp: Any) -> None:
        self.bases = _four_bit_bases(mlp) if DEQUANTIZE_ONCE else []

    def __enter__(self) -> None:
        with torch.no_grad():
            for base in self.bases:
                setattr(base, DEQUANTIZED, base_weight(base))

    def __exit__(self, *_: Any) -> None:
        for base in self.bases:
            setattr(base, DEQUANTIZED, None)


def _four_bit_bases(mlp: Any) -> list[Any]:
    bases = []
    for name in ("gate_proj", "up_proj", "down_proj"):
        module = getattr(mlp, name, None)
        base = getattr(module, "base_layer", module)
        if getattr(getattr(base, "weight", None), "quant_state", None) is not None:
            bases.append(base)
    return bases


class _FromDequantized:
    """Put in front of a 4-bit linear's class: while its weight is held dequantized, a plain product with it."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        weight = getattr(self, DEQUANTIZED, None)
        if weight is None:
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        return torch.nn.functional.linear(x, weight.to(x.dtype), self.bias)  # type: ignore[attr-defined]


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, inner: Any, tile: int, skip_value: bool, mlp: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.inner, ctx.tile, ctx.mlp = inner, tile, mlp
        ctx.autocast = {"enabled": torch.is_autocast_enabled(x.device.type),
                        "dtype": torch.get_autocast_dtype(x.device.type)}  # fmt: skip
        ctx.rng = random_state.saved(x.device) if mlp.tile_draws else None  # no dropout: nothing to draw again
        ctx.save_for_backward(x)
        if skip_value:  # a checkpoint's replay: nothing reads this value, only its gradient flows back
            return torch.empty_like(x)
        with torch.no_grad():
            return _tiles(inner, x, tile, mlp)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        flat, grads = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        dx = torch.empty_like(flat)
        with random_state.restored(ctx.rng, x.device), _dequantized(ctx.mlp):  # dropout draws the forward's masks
            for start in range(0, flat.shape[0], ctx.tile):
                part = flat[start : start + ctx.tile].detach().requires_grad_(True)
                # A replay too: only the tile's gradient is taken, so a lean down projection skips its value.
                with torch.enable_grad(), torch.autocast(x.device.type, **ctx.autocast), replaying():
                    out = ctx.inner(part)
                torch.autograd.backward(out, grads[start : start + ctx.tile])
                dx[start : start + ctx.tile] = part.grad
        return dx.view_as(x), None, None, None, None
