"""The CUDA fast path: compiled decoder layers, the fused loss, and static shapes for them.

What costs time in a LoRA step on a GPU, past the big matrix products, is
memory traffic: RMSNorm, RoPE, SiLU·up, residual adds, the LoRA adds and
scalings each read and write whole activation tensors, and eager PyTorch
launches one kernel per op.  ``torch.compile`` on each decoder layer
("regional" compilation: the layers share code, so one compiled graph serves
all of them and compiling takes seconds, not minutes) fuses those chains into
a few Triton kernels, and its partitioner decides per tensor whether backward
reads it back or recomputes it: cheap elementwise results (the normalised
hidden state, SiLU(gate)·up) are recomputed rather than saved, which is the
"checkpoint only what is cheap" half of the memory savings.  The other half is
the chunked LM head + cross-entropy (:mod:`linear_ce`), which never holds the
whole batch's logits.

Each part has its own switch (``train.compile``, ``train.fused_loss``); the
plain eager path is what runs with both off, and the numerics test holds the
fast path to it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from tunelab.backends.torch.loading import decoder_layers

log = logging.getLogger(__name__)

# torch.compile's mode for the decoder layers and the MLP tiles; None is inductor's default.  For an A/B on a
# GPU, bench/gpu_env.sh's switches set it to "max-autotune-no-cudagraphs" (autotune: inductor tries several
# kernel configurations and keeps the fastest) or "reduce-overhead" (cudagraphs: each graph's kernels are
# replayed as one CUDA graph, with no per-kernel launch).  "reduce-overhead" measured no gain through
# `tunelab train` on an H100 (1B LoRA 8x2048 +0.3%, 8B LoRA 2x2048 +0.1%; bench/README.md).
MODE: str | None = None

# Whether inductor times its own Triton GEMM templates against cuBLAS for each of a layer's matrix product
# shapes and keeps the faster, where a Triton template can carry the elementwise work after it (SiLU·up, the
# adapters' adds) in its epilogue instead of a kernel of its own.  Only the products are tuned, unlike the
# "autotune" MODE, which also searches every other kernel's configuration (its compile did not finish within a
# device call).  Off until an A/B through `tunelab train` on a GPU (bench/gpu_env.sh's switch autotune_gemm).
AUTOTUNE_GEMM = False

# Whether inductor tunes the block sizes of its own elementwise and reduction kernels by timing neighbours of
# its heuristic's choice (coordinate descent) when a layer compiles.  In 8B LoRA's step on an H100 those
# kernels take ~29 ms of ~252, SiLU·up's backward 7.4 ms.  Compiling takes longer.  Off: timed alone on an
# H100 (bench/swiglu_backward_gpu.py, session 48), SiLU·up's backward compiled with it ran slower (8B shape
# 312 -> 407 us, 1B 575 -> 580 us), and no A/B through `tunelab train` has shown a gain (bench/gpu_env.sh's
# switch coordinate_descent).
COORDINATE_DESCENT = False

# Whether each compiled graph's wrapper (the code that allocates its buffers and launches its kernels, once per
# layer call) is generated as C++ instead of Python.  Where a step waits on the host, as 8B QLoRA's with
# checkpointing does on an H100 (418 ms a step for ~340 ms of kernels; the compiled graphs' Python wrappers were
# 108 ms of the host's time a step, session 49), each kernel launch from C++ costs the host a few microseconds
# less.  On a CPU, with a 32-layer hidden-32 Llama whose step is all host time (bench/host_cost_cpu.py), a
# step took 58.4 ms against 65.5 (median of 5 interleaved runs, session 50).  On an H100, 8B LoRA with
# checkpointing, whose host keeps up with its GPU, ran the same with it (10,874 against 10,864 tok/s, session
# 37).  Compiling can take longer (a C++ build per graph, cached on disk like the rest).  Off until an A/B of
# the QLoRA row through `tunelab train` on a GPU (bench/gpu_env.sh's switch cpp_wrapper).
CPP_WRAPPER = False

# Whether each compiled graph's Python wrapper checks, at every call, the sizes, strides and alignment of its
# inputs and of what its extern kernels return (inductor's size_asserts, alignment_asserts, scalar_asserts: on
# by default; Meta's own builds leave the alignment checks out).  Dynamo's guards have already checked the
# graph's inputs; the asserts catch a custom op whose output disagrees with its fake.  In bench/host_cost_cpu.py,
# a LoRA layer's graph makes ~34 such checks a call (3,232 a step), and without them its step took 61.3 ms
# against 65.5.  On until an A/B through `tunelab train` on a GPU (bench/gpu_env.sh's switch
# runtime_asserts_off); the C++ wrapper (CPP_WRAPPER) checks in C++.
RUNTIME_ASSERTS = True

# Rows of at most this many elements reduce in one pass (inductor's "persistent" reduction, the row held in
# registers) where inductor's own heuristic stops at 1,024: an RMSNorm over a 2,048- or 4,096-wide hidden
# state then reads its input once, not once for the sum of squares and again to scale it, and so does its
# backward.  On an H100 the norms' kernels took ~6 ms of 1B LoRA's 206 ms step, looped, at about half the
# memory bandwidth their bytes need; with this bound, 1B LoRA 8x2048 through `tunelab train` ran 79,763 ->
# 80,824 tok/s (+1.3%, the ~1.5% that profile predicts) at the same peak and losses (H100, one lease,
# 2026-12-07); 8B LoRA 2x2048, two runs each in either order on one H100 (session 48): 16,166 and 16,378
# tok/s against 15,931 and 16,097 without it (+1.6% on the means).  None: inductor's heuristic
# (bench/gpu_env.sh's switch persistent_rows_off).
PERSISTENT_ROWS: int | None = 8192

# Compiled graphs are specialised to shapes; padded (unpacked) batches are
# rounded up to a multiple of this so that a few graphs cover every length.
SHAPE_MULTIPLE = 128


@dataclass(frozen=True)
class FastPath:
    """Which parts of the fast path a run uses (resolved for its device)."""

    compile_layers: bool = False
    fused_loss: bool = True
    activation_budget: float = 1.0

    @property
    def parts(self) -> list[str]:
        return [name for name, on in (("compiled layers", self.compile_layers), ("fused loss", self.fused_loss)) if on]


def resolve(device: torch.device, *, compile: bool, fused_loss: bool, activation_budget: float = 1.0) -> FastPath:
    """The parts that apply on ``device``: layer compilation pays only on CUDA (Triton kernels)."""
    compiled = compile and device.type == "cuda" and _inductor_available()
    return FastPath(compile_layers=compiled, fused_loss=fused_loss, activation_budget=activation_budget)


def _inductor_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # inductor's GPU code generator is Triton
        return False
    return True


def compile_decoder_layers(model: Any, activation_budget: float = 1.0) -> int:
    """Compile each decoder layer in place (``nn.Module.compile``); returns how many.

    Every layer runs the same Python code over its own weights, and dynamo
    treats module parameters as graph inputs, so the first layer's graph is
    reused by the others.  Gradient checkpointing wraps the compiled call from
    outside, so the two compose.
    """
    import torch._functorch.config as functorch_config

    # Below 1 the partitioner keeps only this share of each layer's activations for
    # backward and recomputes the rest, choosing what is cheapest to recompute
    # (elementwise chains and norms before matrix products).  Read when the first
    # forward compiles, and process-wide: a process trains one model.
    functorch_config.activation_memory_budget = activation_budget
    # A layer the compiler can't handle (an exotic architecture, a missing C compiler for
    # Triton's launcher) then runs eager with a logged warning instead of failing the run.
    import torch._dynamo.config as dynamo_config

    dynamo_config.suppress_errors = True
    if PERSISTENT_ROWS:
        persist_rows_up_to(PERSISTENT_ROWS)
    from torch._inductor import config as inductor_config

    if COORDINATE_DESCENT:
        inductor_config.coordinate_descent_tuning = True
    if CPP_WRAPPER:
        inductor_config.cpp_wrapper = True
    if not RUNTIME_ASSERTS:
        inductor_config.size_asserts = inductor_config.alignment_asserts = inductor_config.scalar_asserts = False
    if AUTOTUNE_GEMM:
        inductor_config.max_autotune_gemm = True
        inductor_config.max_autotune_gemm_backends = "ATEN,TRITON"  # cuBLAS, or a Triton template if faster
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(mode=MODE)  # static shapes first; dynamo goes dynamic if a new length comes
    return len(layers)


def round_up(length: int, multiple: int = SHAPE_MULTIPLE) -> int:
    return -(-length // multiple) * multiple


def persist_rows_up_to(numel: int) -> None:
    """Make inductor reduce rows of up to ``numel`` elements (along the innermost dimension) in one pass.

    Through inductor's documented hook for its heuristics (``InductorChoices``), process-wide: a
    training process compiles one model's layers.
    """
    from tunelab.backends.torch import wide_rows  # imports inductor, which a CPU run never needs

    wide_rows.install(numel)
