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
from tunelab.memory.shapes import Linear, ModelShape
from tunelab.vocab import LORA_METHODS, METHODS, WHOLE_MODEL_METHODS

GiB = 2**30
CHUNK_ELEMENTS = 2**25  # keep equal to backends/torch/linear_ce.py (no torch import here)
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

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def autocast(self) -> bool:
        """torch on CUDA runs fp32 adapters over a 16-bit base under autocast: their inputs stay 16-bit."""
        return self.backend == "torch" and self.device == "cuda" and DTYPE_BYTES.get(self.dtype, 4) != 4


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
        Line("logits", "logits & loss", phase.logits, _logits_note(work) if phase.logits else ""),
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
        # backward (offloaded checkpoints: the layer being recomputed and the next one, prefetched).
        kept = final_norm + (layer_input if work.gradient_checkpointing else 0)
        fetched = layer_input * (2 if work.offload_checkpoints else 1)
        first = last = (fetched + recomputed) if work.gradient_checkpointing else layer
    earlier = params_b if work.grad_accum > 1 else 0  # gradients of earlier micro-batches
    block_grads = params_b // max(shape.layers, 1)
    temps, note = _workspace(shape, work), "one layer's backward workspace"
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
    if not bits:
        return shape.num_params * a
    linear = shape.layers * sum(lin.in_features * lin.out_features for lin in shape.block_linears())
    rest = shape.num_params - linear
    if work.backend == "mlx":
        # Affine groups: codes plus a scale and a bias per group; embeddings and head are quantized too.
        per_weight = bits / 8 + 2 * a / (work.group_size or shape.quant_group_size)
        embeds = shape.embed_params + shape.head_params
        return int((linear + embeds) * per_weight) + (rest - embeds) * a
    if bits == 4:
        scale = (1 + 4 / 256) / NF4_BLOCK if work.double_quant else 4 / NF4_BLOCK
        return int(linear * (0.5 + scale)) + rest * a
    # LLM.int8: one byte per weight and an fp32 scale per output row.
    rows = shape.layers * sum(lin.out_features for lin in shape.block_linears())
    return linear + 4 * rows + rest * a


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


def _check(shape: ModelShape, work: Workload) -> None:
    if work.method not in METHODS:
        raise ConfigError(f"method.name: {work.method!r} has no memory model (one of {', '.join(METHODS)})")
    if work.dtype not in DTYPE_BYTES:
        raise ConfigError(f"model.dtype: {work.dtype!r} is not a compute dtype (float32, bfloat16, float16)")
    if work.bits not in (None, 4, 8):
        raise ConfigError(f"method.bits: {work.bits} is not supported; use 4 or 8")
    if work.batch < 1 or work.seq_len < 1 or work.rank < 1:
        raise ConfigError("batch size, sequence length and rank must be at least 1")


def layer_activation_bytes(shape: ModelShape, work: Workload) -> float:
    """Bytes saved for backward per token by one decoder layer (no checkpointing)."""
    if work.compiled_layers:
        return compiled_layer_bytes(shape, work)
    a = DTYPE_BYTES[work.dtype]
    h, i = shape.hidden, shape.intermediate
    kv = shape.q_dim if (work.padded and work.backend == "torch") else shape.kv_dim  # masked SDPA: k/v expanded
    norms = shape.norms_per_layer * (4 * h + 4) + (4 * (shape.q_dim + shape.kv_dim) if shape.qk_norm else 0)
    attention = a * (2 * shape.q_dim + 2 * kv) + 4 * shape.heads
    if work.backend == "mlx":
        attention += a * shape.heads * work.seq_len  # MLX keeps the attention weights for backward
    elif shape.eager_attention:
        attention += (4 if a == 4 else 6) * shape.heads * work.seq_len  # fp32 softmax (and its 16-bit cast)
    mlp = a * 3 * i
    inputs = {"attn": h, "o": shape.q_dim, "mlp": h, "down": i}
    saved_inputs = 0.0
    if work.method == "full" or work.method == "freeze":
        share = 1.0 if work.method == "full" else min(work.trained_layers, shape.layers) / shape.layers
        saved_inputs += share * (a * sum(inputs.values()) + a * shape.norms_per_layer * h)
    elif work.method in LORA_METHODS:
        saved_inputs += _adapter_bytes(shape, work, a, inputs)
    elif work.method == "ia3":
        saved_inputs += a * (2 * kv + i)
    return norms + attention + mlp + saved_inputs


def compiled_layer_bytes(shape: ModelShape, work: Workload) -> float:
    """What a compiled decoder layer saves per token, as inductor's partitioner chooses (torch on CUDA).

    Always kept (costly to recompute): the layer's input and mid-layer residual,
    q/k/v and the attention output with its log-sum-exp, and the MLP's gate and
    up projections.  At ``activation_budget`` 1 it also keeps what is cheap to
    recompute (the two normalised inputs, the o_proj input copy, SiLU(gate)·up);
    from 0.8 to just under 1 those are recomputed (measured: one partition for
    0.8-0.9 on Llama-8B); lower budgets recompute matrix products too, taken
    here as proportional.
    """
    a = DTYPE_BYTES[work.dtype]
    h, i, q, kv = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    kept: float = a * (2 * h + 2 * q + 2 * kv + 2 * i) + 4 * shape.heads
    cheap = a * (shape.norms_per_layer * h + q + i)
    if work.method in WHOLE_MODEL_METHODS or work.activation_budget >= 1.0:
        kept += cheap  # trained weights need their inputs (and budget 1 keeps everything)
    elif work.activation_budget < 0.8:
        kept *= work.activation_budget / 0.8
    if work.method in LORA_METHODS:
        mods = targeted(shape, work.targets)
        kept += sum(a * work.rank for _ in mods)  # A's outputs
        if work.dropout:
            kept += sum((a + 1) * lin.in_features for lin in mods)  # dropout output and mask
        if work.method == "dora":
            kept += sum((a + 4) * lin.out_features for lin in mods)
    return kept


def _adapter_bytes(shape: ModelShape, work: Workload, a: int, inputs: dict[str, int]) -> float:
    """What LoRA/DoRA adapters save: their input (upcast to fp32 by PEFT, once per module) and A's output."""
    mods = targeted(shape, work.targets)
    saved = 0.0
    if work.dropout:
        saved += sum(5 * lin.in_features for lin in mods)  # dropout output (fp32) and its mask
    elif work.backend == "torch" and a != 4 and not work.autocast:
        saved += sum(4 * lin.in_features for lin in mods)  # PEFT casts x to fp32 per module
    else:
        groups = {_input_group(lin.name) for lin in mods}  # same-dtype input: shared, saved once
        saved += sum(a * inputs[g] for g in groups)
    lora_a_out = 4 if work.backend == "torch" and not work.autocast else a
    saved += sum(lora_a_out * work.rank for _ in mods)
    if work.method == "dora":
        saved += sum((a + 4) * lin.out_features for lin in mods)
    return saved


def _input_group(name: str) -> str:
    if name in ("q_proj", "k_proj", "v_proj", "qkv_proj"):
        return "attn"
    if name in ("gate_proj", "up_proj", "gate_up_proj"):
        return "mlp"
    return "o" if name == "o_proj" else "down"


def logits_bytes(shape: ModelShape, work: Workload) -> int:
    """The loss's peak: fp32 ``positions × vocab`` buffers alive at once at the start of backward."""
    a = DTYPE_BYTES[work.dtype]
    rows = work.batch * (work.seq_len - 1)
    picked = rows * work.supervised
    if work.backend == "mlx" and work.compiled:
        picked = rows  # the compiled MLX step projects every position (fixed shapes)
    if work.backend == "torch" and work.fast_loss:
        return _chunked_loss_bytes(shape, work, int(picked))
    # The model's own logits: saved log-softmax + its gradient in and out; MLX's graph holds one more fp32 copy.
    peak = (16 if work.backend == "mlx" else 12) * picked * shape.vocab
    if shape.logit_softcap:
        peak += 8 * picked * shape.vocab  # the scaled logits and tanh's saved output
    if work.backend == "torch" and not work.fast_loss:
        # The model's own full logits stay alive next to the gathered fp32 copy while the loss runs.
        peak = max(peak, (a * rows + a * picked + 8 * picked) * shape.vocab)
    return int(peak)


def _logits_note(work: Workload) -> str:
    if work.backend == "torch" and work.fast_loss:
        return "fp32 logits of one chunk of positions at a time"
    return "fp32 positions × vocab"


def _chunked_loss_bytes(shape: ModelShape, work: Workload, picked: int) -> int:
    """torch's fused head + loss (``backends/torch/linear_ce.py``): one chunk of logits at a time.

    Alive at the chunk's peak: its head output in the compute dtype, the fp32
    logits (softmax'd in place), tanh's output under soft-capping, the gradient
    cast back to the compute dtype; beside them the gathered hidden states and
    the hidden-state gradient being filled.  A trained head (full fine-tuning)
    also accumulates an fp32 weight gradient.
    """
    a = DTYPE_BYTES[work.dtype]
    rows = min(picked, max(64, CHUNK_ELEMENTS // max(shape.vocab, 1)))
    per_row = (2 * a + 4 + (4 if shape.logit_softcap else 0)) * shape.vocab
    hidden = 2 * a * picked * shape.hidden
    head_grad = 4 * shape.vocab * shape.hidden if work.method == "full" else 0
    return int(rows * per_row + hidden + head_grad)


def _workspace(shape: ModelShape, work: Workload) -> int:
    """Transient tensors of one decoder layer's backward (gradients of the MLP's widest tensors)."""
    t = work.tokens
    temps = 8 * shape.intermediate * t
    if work.bits and work.backend == "torch":
        widest = max(lin.in_features * lin.out_features for lin in shape.block_linears())
        temps += 2 * widest * DTYPE_BYTES[work.dtype]  # a dequantized weight, forward and backward
    return temps


def _weights_note(shape: ModelShape, work: Workload) -> str:
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
