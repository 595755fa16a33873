"""What a memory estimate is about: the workload (everything but the architecture) and the measured constants."""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.errors import ConfigError
from tunelab.memory.shapes import Linear, ModelShape

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# What each runtime holds beside tensors (measured: CUDA 12/13 context with cuBLAS/cuDNN
# handles on an H100; a Python process with torch+transformers, or mlx+transformers, imported).
RUNTIME_BYTES = {"cuda": int(0.55 * GiB), "mps": int(0.3 * GiB), "cpu": int(0.45 * GiB), "metal": int(0.15 * GiB)}
MLX_CPU_RUNTIME = int(0.27 * GiB)
# Beyond live tensors: CUDA's caching allocator reserves more than it hands out (block
# rounding, fragmentation); on a CPU, glibc keeps freed tensor buffers mapped (measured
# 10-65% of the tensor peak in bench/estimator_cpu.py; MLX returns them).
CUDA_ALLOCATOR_SLACK = 0.06
CPU_ALLOCATOR_SLACK = 0.4
# NF4 (bitsandbytes): 4-bit codes, one absmax per 64 weights; double quantization stores the
# absmax as 8-bit with an fp32 scale per 256 of them.
NF4_BLOCK = 64
# MLX's lazy graph keeps more alive than torch's autograd, and its checkpointed backward holds
# about two layers' worth at once; both fitted with mx.get_peak_memory on CPU (bench/estimator_cpu.py).
MLX_ACTIVATION_FACTOR = 1.35
MLX_CHECKPOINT_LAYERS = 2


@dataclass(frozen=True)
class Workload:
    """What is trained and how: everything besides the architecture that decides memory."""

    backend: str = "torch"  # torch | mlx
    device: str = "cpu"  # cuda | mps | cpu | metal
    dtype: str = "float32"  # the compute dtype, already resolved from "auto"
    method: str = "lora"
    rank: int = 8
    targets: str | tuple[str, ...] = "all-linear"
    dropout: bool = False
    trained_layers: int = 2  # method freeze
    num_virtual_tokens: int = 16  # method prefix
    bits: int | None = None  # 4 or 8: a quantized base (qlora, or an MLX-quantized checkpoint)
    double_quant: bool = True
    group_size: int = 64  # MLX affine quantization
    batch: int = 1
    seq_len: int = 1024
    supervised: float = 1.0  # fraction of positions that carry loss
    padded: bool = True  # batches carry padding, so attention gets a mask (torch then expands k/v)
    gradient_checkpointing: bool = False
    grad_accum: int = 1
    fast_loss: bool = True  # torch: only supervised positions go through the LM head
    compiled: bool = False  # MLX's compiled step
    compiled_layers: bool = False  # torch on CUDA: compiled decoder layers (the fast path)
    activation_budget: float = 0.8  # compiled layers: share of activations the partitioner keeps
    offload_activations: bool = False  # torch/CUDA: saved activations wait in pinned CPU memory
    offload_checkpoints: bool = False  # torch/CUDA with checkpointing: layer inputs wait in pinned CPU memory
    host_embeddings: bool = False  # torch/CUDA, adapters: the input-embedding table stays in CPU memory
    tiled_mlp: bool = False  # torch: MLPs over tiles of MLP_TILE_TOKENS positions, only their input saved
    kept_attention: bool = False  # offloaded checkpoints park each layer's attention output with its input

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def autocast(self) -> bool:
        """torch on CUDA runs fp32 adapters over a 16-bit base under autocast: their inputs stay 16-bit."""
        return self.backend == "torch" and self.device == "cuda" and DTYPE_BYTES.get(self.dtype, 4) != 4


def targeted(shape: ModelShape, targets: str | tuple[str, ...]) -> tuple[Linear, ...]:
    """The block linears an adapter wraps (``all-linear`` = all of them; the head is never wrapped)."""
    linears = shape.block_linears()
    if targets == "all-linear":
        return linears
    wanted = {t.split(".")[-1] for t in targets}
    found = tuple(lin for lin in linears if lin.name in wanted)
    if not found:
        names = ", ".join(lin.name for lin in linears)
        raise ConfigError(
            f"method.targets: no linear layer of this {shape.model_type} model matches {list(targets)}",
            hint=f"use all-linear or some of: {names}",
        )
    return found
