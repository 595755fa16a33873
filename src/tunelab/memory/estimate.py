"""Peak training memory, predicted from the architecture and the run's settings.

The model follows what the backends actually allocate in one training step
(measured with a live-tensor tracker on torch, ``mx.get_peak_memory`` on MLX):

* **weights** in the compute dtype, or 4/8-bit blocks plus their scales;
* **trainable** parameters, **gradients** and AdamW's two **optimizer** moments
  (same dtype as the parameter: fp32 for PEFT adapters, which PEFT upcasts);
* **activations** saved for backward, per token and layer — with gradient
  checkpointing only each layer's input, plus one layer recomputed in backward;
* **logits & loss**: tunelab's torch loss projects only the supervised positions
  through the LM head, in chunks whose gradients are taken on the spot, so one
  chunk's fp32 logits are alive at a time; MLX (and torch's plain path) hold
  fp32 ``tokens × vocab`` buffers for the whole batch (saved log-softmax, its
  incoming gradient and its outgoing gradient);
* **temporaries**: a decoder layer's backward workspace, dequantized weights,
  the foreach AdamW step's scratch copy on CUDA;
* **runtime**: what the framework holds outside tensors (CUDA context, or the
  Python process itself on a CPU).

The step's peak is the largest of three moments — the loss, a decoder layer's
backward, the optimizer step — and the breakdown shows what is alive at it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.errors import ConfigError
from tunelab.memory.activations import layer_activation_bytes, logits_bytes, logits_note, workspace_bytes
from tunelab.memory.shapes import ModelShape
from tunelab.memory.workload import (
    CPU_ALLOCATOR_SLACK,
    CUDA_ALLOCATOR_SLACK,
    DTYPE_BYTES,
    MLX_ACTIVATION_FACTOR,
    MLX_CHECKPOINT_LAYERS,
    MLX_CPU_RUNTIME,
    NF4_BLOCK,
    RUNTIME_BYTES,
    Workload,
    targeted,
)
from tunelab.vocab import LORA_METHODS, METHODS, WHOLE_MODEL_METHODS


@dataclass(frozen=True)
class Line:
    """One row of the breakdown."""

    key: str
    label: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class Estimate:
    """Peak memory of a training step, as a breakdown whose lines sum to the total."""

    lines: tuple[Line, ...]
    peak_at: str
    trainable_params: int
    workload: Workload = field(repr=False)

    @property
    def total(self) -> int:
        return sum(line.bytes for line in self.lines)

    @property
    def tensor_bytes(self) -> int:
        """The part a framework's own counter sees (``torch.cuda.max_memory_allocated``)."""
        return sum(line.bytes for line in self.lines if line.key not in ("runtime", "allocator"))

    @property
    def peak_bytes(self) -> int:
        """The estimate of what the run's own peak counter reports (``peak_memory_bytes``).

        On a GPU that counter is the framework's tensor high-water mark
        (``torch.cuda.max_memory_allocated``, MLX's peak memory); on a CPU it is
        the process's resident peak, which the runtime line and the allocator's
        kept buffers are part of.
        """
        on_gpu = self.workload.device == "cuda" or (self.workload.backend == "mlx" and self.workload.device != "cpu")
        return self.tensor_bytes if on_gpu else self.total

    def get(self, key: str) -> int:
        return sum(line.bytes for line in self.lines if line.key == key)

    def to_dict(self) -> dict[str, object]:
        return {
            "total_bytes": self.total,
            "tensor_bytes": self.tensor_bytes,
            "peak_at": self.peak_at,
            "trainable_params": self.trainable_params,
            "lines": [{"key": x.key, "label": x.label, "bytes": x.bytes, "note": x.note} for x in self.lines],
        }


def estimate(shape: ModelShape, work: Workload) -> Estimate:
    """Predict the peak memory of one training step of ``shape`` under ``work``."""
    _check(shape, work)
    trainable, train_dtype_bytes = trainable_params(shape, work)
    params_b = trainable * train_dtype_bytes
    in_place = work.method in WHOLE_MODEL_METHODS  # trained weights are the base weights themselves
    phase = max(_phases(shape, work, params_b), key=lambda p: p.total)
    lines = [
        Line("weights", "weights", weight_bytes(shape, work), _weights_note(shape, work)),
        Line(
            "trainable",
            "trainable parameters",
            0 if in_place else params_b,
            f"{trainable:,} in {_dtype_name(train_dtype_bytes)}" + (" (part of the weights)" if in_place else ""),
        ),
        Line("gradients", "gradients", phase.grads, "" if phase.grads else "none allocated at the peak"),
        Line("optimizer", "optimizer state", 2 * params_b, "AdamW: 2 moments per trainable parameter"),
        Line("activations", "activations", phase.acts, _acts_note(work)),
        Line("logits", "logits & loss", phase.logits, logits_note(work) if phase.logits else ""),
        Line("temporaries", "temporaries", phase.temps, phase.temps_note),
    ]
    tensors = sum(x.bytes for x in lines)
    if work.device == "cuda":
        lines.append(Line("allocator", "allocator slack", int(tensors * CUDA_ALLOCATOR_SLACK), "caching allocator"))
    elif work.device == "cpu" and work.backend == "torch":
        lines.append(Line("allocator", "allocator slack", int(tensors * CPU_ALLOCATOR_SLACK), "freed buffers kept"))
    lines.append(Line("runtime", "runtime", runtime_bytes(work), _runtime_note(work)))
    return Estimate(tuple(lines), phase.name, trainable, work)


@dataclass(frozen=True)
class _Phase:
    """What a moment of the step holds beyond weights and optimizer state."""

    name: str
    acts: int
    logits: int
    temps: int
    grads: int
    temps_note: str = ""

    @property
    def total(self) -> int:
        return self.acts + self.logits + self.temps + self.grads


def _phases(shape: ModelShape, work: Workload, params_b: int) -> list[_Phase]:
    """The candidate peaks: the loss, the first and last layer of backward, the optimizer step.

    Backward frees a layer's activations as it produces that layer's gradients,
    so the two ends of backward bound every moment in between.
    """
    t, a = work.tokens, DTYPE_BYTES[work.dtype]
    layer = int(layer_activation_bytes(shape, work) * t * (MLX_ACTIVATION_FACTOR if work.backend == "mlx" else 1))
    final_norm = 4 * shape.hidden * t
    layer_input = a * shape.hidden * t
    if work.gradient_checkpointing:
        kept = shape.layers * layer_input + final_norm  # each layer's input, nothing else
        recomputed = layer * (MLX_CHECKPOINT_LAYERS if work.backend == "mlx" else 1)
        first, last = kept + recomputed, layer_input + recomputed  # plus the layer recomputed in backward
    else:
        kept = first = shape.layers * layer + final_norm
        last = layer
    if work.offload_activations or (work.offload_checkpoints and work.gradient_checkpointing):
        # Saved tensors go to CPU as the forward makes them and come back one layer at a time in
        # backward. Offloaded checkpoints hold three inputs: the layer being recomputed, the next one
        # (prefetched), and the one just done, whose block the allocator counts until the GPU has
        # passed its last use (the host runs ahead; measured at 1B 32k on an H100, 2026-12-06).
        kept = final_norm + (layer_input if work.gradient_checkpointing else 0)
        fetched = layer_input * (3 if work.offload_checkpoints else 1)
        if work.kept_attention:
            # The attention's output and log-sum-exp travel with the input: the replayed layer's own stand in
            # for what the replay would compute, the next layer's come back early (measured: +0.11 GiB at
            # 8B 16k, where one output is 0.125 GiB; H100, 2026-12-06).
            fetched += (a * shape.q_dim + 4 * shape.heads) * t
        first = last = (fetched + recomputed) if work.gradient_checkpointing else layer
    earlier = params_b if work.grad_accum > 1 else 0  # gradients of earlier micro-batches
    block_grads = params_b // max(shape.layers, 1)
    temps, note = workspace_bytes(shape, work), "one layer's backward workspace"
    scratch = params_b if work.device == "cuda" and work.backend == "torch" else 0  # foreach AdamW
    return [
        _Phase("loss", kept, logits_bytes(shape, work), 0, earlier),
        _Phase("backward (first layer)", first, 0, temps, max(earlier, block_grads), note),
        _Phase("backward (last layer)", last, 0, temps, params_b, note),
        _Phase("optimizer step", 0, 0, scratch, params_b, "AdamW scratch copy" if scratch else ""),
    ]


def runtime_bytes(work: Workload) -> int:
    """Memory the framework holds outside tensors on this device."""
    if work.backend == "mlx" and work.device == "cpu":
        return MLX_CPU_RUNTIME
    return RUNTIME_BYTES.get(work.device, RUNTIME_BYTES["cpu"])


def weight_bytes(shape: ModelShape, work: Workload) -> int:
    """The base model's weights: compute dtype, or quantized blocks plus their scales."""
    a = DTYPE_BYTES[work.dtype]
    bits = work.bits or shape.quant_bits
    on_host = shape.embed_params * a if work.host_embeddings else 0  # train.offload_embeddings: not on the GPU
    if not bits:
        return shape.num_params * a - on_host
    linear = shape.layers * sum(lin.in_features * lin.out_features for lin in shape.block_linears())
    rest = shape.num_params - linear
    if work.backend == "mlx":
        # Affine groups: codes plus a scale and a bias per group; embeddings and head are quantized too.
        per_weight = bits / 8 + 2 * a / (work.group_size or shape.quant_group_size)
        embeds = shape.embed_params + shape.head_params
        return int((linear + embeds) * per_weight) + (rest - embeds) * a
    if bits == 4:
        scale = (1 + 4 / 256) / NF4_BLOCK if work.double_quant else 4 / NF4_BLOCK
        return int(linear * (0.5 + scale)) + rest * a - on_host
    # LLM.int8: one byte per weight and an fp32 scale per output row.
    rows = shape.layers * sum(lin.out_features for lin in shape.block_linears())
    return linear + 4 * rows + rest * a - on_host


def trainable_params(shape: ModelShape, work: Workload) -> tuple[int, int]:
    """(number of trained parameters, bytes per parameter) for the method."""
    a = DTYPE_BYTES[work.dtype]
    if work.method in LORA_METHODS:
        mods = targeted(shape, work.targets)
        per_layer = sum(work.rank * (lin.in_features + lin.out_features) for lin in mods)
        if work.method == "dora":
            per_layer += sum(lin.out_features for lin in mods)
        return shape.layers * per_layer, 4  # PEFT and tunelab's MLX layers keep adapters in fp32
    if work.method == "full":
        return shape.num_params, a
    if work.method == "freeze":
        return min(work.trained_layers, shape.layers) * shape.block_params, a
    if work.method == "prefix":
        return work.num_virtual_tokens * shape.layers * 2 * shape.kv_dim, 4
    return shape.layers * (2 * shape.kv_dim + shape.intermediate), 4  # ia3: k, v and the MLP input


def _check(shape: ModelShape, work: Workload) -> None:
    if work.method not in METHODS:
        raise ConfigError(f"method.name: {work.method!r} has no memory model (one of {', '.join(METHODS)})")
    if work.dtype not in DTYPE_BYTES:
        raise ConfigError(f"model.dtype: {work.dtype!r} is not a compute dtype (float32, bfloat16, float16)")
    if work.bits not in (None, 4, 8):
        raise ConfigError(f"method.bits: {work.bits} is not supported; use 4 or 8")
    if work.batch < 1 or work.seq_len < 1 or work.rank < 1:
        raise ConfigError("batch size, sequence length and rank must be at least 1")


def _weights_note(shape: ModelShape, work: Workload) -> str:
    return _weights_kind(shape, work) + ("; input embeddings in CPU memory" if work.host_embeddings else "")


def _weights_kind(shape: ModelShape, work: Workload) -> str:
    bits = work.bits or shape.quant_bits
    if not bits:
        return f"{_count(shape.num_params)} parameters in {work.dtype}"
    if work.backend == "mlx":
        return f"{bits}-bit affine, group size {work.group_size or shape.quant_group_size}"
    return "NF4, double-quantized scales" if bits == 4 and work.double_quant else f"{bits}-bit bitsandbytes"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _acts_note(work: Workload) -> str:
    if work.offload_activations:
        return f"{work.batch}×{work.seq_len} tokens; saved ones offloaded to CPU, one layer back at a time"
    if work.gradient_checkpointing:
        return f"{work.batch}×{work.seq_len} tokens; checkpointed: layer inputs + one layer"
    return f"{work.batch}×{work.seq_len} tokens, every layer"


def _runtime_note(work: Workload) -> str:
    if work.device == "cuda":
        return "CUDA context and library handles"
    return "the Python process with the framework loaded" if work.device == "cpu" else f"{work.device} runtime"


def _dtype_name(nbytes: int) -> str:
    return "fp32" if nbytes == 4 else "16-bit"
