"""The contract between the trainer and a compute backend.

Batches cross it as numpy arrays and results come back as Python numbers, so
the trainer loop never imports torch or mlx.  Specs are plain dataclasses that
small factory functions build from the config: a backend never sees a config.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, SupportsFloat

import numpy as np

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class ModelSpec:
    """Where the base model is and how to hold it."""

    path: str
    dtype: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str = "auto"
    device: str = "auto"
    gradient_checkpointing: bool = False
    compile: bool = True  # MLX: the compiled step; torch on CUDA: compiled decoder layers
    fused_loss: bool = True  # chunked LM head + cross-entropy (torch)
    activation_budget: float = 0.8  # compiled layers: share of activations kept for backward
    packing: bool = False  # batches carry position_ids/segment_ids: attention must stay per example
    longest_row: int | None = None  # tokens in the longest training row (compiled layers pad up to it)
    offload_activations: bool = False  # CUDA: saved activations live in pinned CPU memory
    offload_checkpoints: bool | str = "auto"  # CUDA + checkpointing: layer inputs in pinned CPU memory
    offload_embeddings: bool | str = "auto"  # CUDA, adapters: the frozen input-embedding table in CPU memory
    offload_mlp: bool | int | str = False  # CUDA + offloaded checkpoints: MLP activations in CPU memory, no MLP replay
    tiled_mlp: bool | str = False  # torch: each layer's MLP over tiles of positions ("auto": chosen, not asked)
    memory_limit_bytes: int | None = None  # MLX on Metal: wired/cache limits derived from the estimate
    parallel: str = "auto"  # train.parallel; torch with fsdp: sharded model and DCP checkpoints
    processes: int = 1  # data-parallel processes of this run (each holds its share's gradient)


@dataclass(frozen=True)
class MethodSpec:
    """What to train and how (adapter hyper-parameters, or which base weights)."""

    name: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | tuple[str, ...] = "all-linear"
    layers: int = 2
    num_virtual_tokens: int = 16
    seed: int = 0
    bits: int | None = None  # qlora: the frozen base quantized to 4 or 8 bits
    group_size: int = 64  # qlora on MLX: affine quantization group


@dataclass(frozen=True)
class OptimSpec:
    """AdamW settings; the learning rate itself is set every step by the trainer."""

    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass(frozen=True)
class ObjectiveSpec:
    """What the loss optimizes (``objective:``); each backend maps the name to one loss function.

    Preference objectives read ``beta`` (dpo, ipo, kto, simpo), ``gamma`` (simpo) and ``alpha`` (orpo);
    with ``precompute_ref`` the batches carry the reference model's log-probs (``ref_logps``).  GRPO reads
    ``beta`` (its KL weight; 0 = no reference) and ``epsilon`` (the ratio's clip range).
    """

    name: str = "sft"
    beta: float = 0.1
    gamma: float = 0.5
    alpha: float = 0.1
    precompute_ref: bool = False
    epsilon: float = 0.2


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded, for logs and the registry."""

    architecture: str
    num_params: int
    trainable_params: int
    dtype: str
    device: str
    path: str


@dataclass(frozen=True)
class LossSum:
    """The summed loss and how many terms it covers: supervised tokens (SFT), or pairs / KTO examples.

    ``loss_sum`` is a number, or (from ``forward_backward``) a device scalar that becomes one when
    ``float()`` reads it: reading waits for the device, so the trainer reads it once the step's work
    is queued.  ``stats`` are an objective's diagnostics as ``(sum, count)``, e.g. ``rewards/chosen``:
    the trainer adds them up over micro-batches and reports sum / count.
    """

    loss_sum: SupportsFloat
    tokens: int
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)


class Backend(Protocol):
    """What the trainer needs from a compute backend."""

    name: str

    def load(
        self,
        model: ModelSpec,
        method: MethodSpec,
        optim: OptimSpec,
        tokenizer: Any,
        objective: ObjectiveSpec = ObjectiveSpec(),
    ) -> ModelInfo:
        """Load the base model, apply the method, choose the objective's loss and build the optimizer."""
        ...

    def load_inference(self, model: ModelSpec, adapter: Path | None, tokenizer: Any) -> ModelInfo:
        """Load a base model (plus a saved adapter, if given) for generation only."""
        ...

    def forward_backward(self, batch: Batch, loss_scale: float) -> LossSum:
        """Accumulate gradients of ``loss_sum * loss_scale`` for one micro-batch (the objective's loss)."""
        ...

    def prepare_batch(self, batch: Batch, waiting: int) -> None:
        """Host-side work for a training micro-batch, done ahead of its step on the loader's helper thread.

        ``waiting``: how many prepared micro-batches may wait for their steps at once.  Must be thread-safe
        and leave ``batch`` as it is; :meth:`forward_backward` gives the same result whether it ran or not
        (it only saves the step time).
        """
        ...

    def optimizer_step(self, lr: float) -> SupportsFloat:
        """Clip, step with ``lr``, zero the gradients; returns the pre-clip gradient norm (read by ``float()``)."""
        ...

    def eval_loss(self, batch: Batch) -> LossSum:
        """Summed loss over the supervised tokens of a batch, without gradients."""
        ...

    def reference_logprobs(self, batch: Batch) -> np.ndarray:
        """Each token's log-prob under the reference model (the base, adapters off), given those before it.

        Shaped like ``input_ids`` (float32, 0 where a position carries no label); for
        ``objective.precompute_ref``, called before training and before any checkpoint loads.
        """
        ...

    def save_adapter(self, path: Path) -> None:
        """Write the trained result in the format other tools load (PEFT adapter or full model)."""
        ...

    def save_checkpoint(self, path: Path) -> None:
        """Write trainable weights, optimizer state and the backend's RNG state into ``path``."""
        ...

    def load_checkpoint(self, path: Path) -> None:
        """Restore what :meth:`save_checkpoint` wrote."""
        ...

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop_ids: Sequence[int],
        seed: int,
    ) -> Iterator[int]:
        """Yield new token ids one at a time until a stop id or the length limit."""
        ...

    def peak_memory_bytes(self) -> int | None:
        """Peak accelerator (or process) memory so far, if the backend can tell."""
        ...

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether ``exc`` is an allocation failure of this backend's device (CUDA, MPS, Metal or CPU)."""
        ...

    def release_memory(self) -> None:
        """After an out-of-memory error mid-step: drop the step's partial gradients and cached memory."""
        ...
