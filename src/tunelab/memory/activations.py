"""Bytes per token that training keeps alive: a decoder layer's saved activations, and the loss's logits."""

from __future__ import annotations

from tunelab.config.schema import MLP_TILE_TOKENS, loss_chunk_rows
from tunelab.memory.shapes import ModelShape
from tunelab.memory.workload import DTYPE_BYTES, Workload, targeted
from tunelab.vocab import LORA_METHODS, WHOLE_MODEL_METHODS


def layer_activation_bytes(shape: ModelShape, work: Workload) -> float:
    """Bytes saved for backward per token by one decoder layer (no checkpointing)."""
    if work.compiled_layers:
        return compiled_layer_bytes(shape, work)
    a = DTYPE_BYTES[work.dtype]
    h, i = shape.hidden, shape.intermediate
    kv = expanded_kv_dim(shape, work)
    norms = shape.norms_per_layer * (4 * h + 4) + (4 * (shape.q_dim + shape.kv_dim) if shape.qk_norm else 0)
    attention = a * (2 * shape.q_dim + 2 * kv) + 4 * shape.heads
    if work.backend == "mlx":
        attention += a * shape.heads * work.seq_len  # MLX keeps the attention weights for backward
    elif shape.eager_attention:
        attention += (4 if a == 4 else 6) * shape.heads * work.seq_len  # fp32 softmax (and its 16-bit cast)
    mlp = a * h if work.tiled_mlp else a * 3 * i  # tiled: only the MLP's input is saved
    inputs = {"attn": h, "o": shape.q_dim, "mlp": h, "down": 0 if work.tiled_mlp else i}
    saved_inputs = 0.0
    if work.method == "full" or work.method == "freeze":
        share = 1.0 if work.method == "full" else min(work.trained_layers, shape.layers) / shape.layers
        saved_inputs += share * (a * sum(inputs.values()) + a * shape.norms_per_layer * h)
    elif work.method in LORA_METHODS:
        saved_inputs += _adapter_bytes(shape, work, a, inputs)
    elif work.method == "ia3":
        saved_inputs += a * (2 * kv + i)
    return norms + attention + mlp + saved_inputs


def expanded_kv_dim(shape: ModelShape, work: Workload) -> int:
    """Width of the k/v that attention saves: masked SDPA in torch repeats grouped k/v to every head.

    Measured (H200/H100, 8B Llama, 1x32768, offloaded checkpoints): the replayed
    layer's attention held six q-sized and two k/v-sized tensors at the peak,
    the repeated k and v, their gradients, dq, and the gradients summed back.
    """
    return shape.q_dim if (work.padded and work.backend == "torch") else shape.kv_dim


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
    if work.gradient_checkpointing:
        # A checkpoint's replay runs attention through transformers' SDPA call outside the compiled
        # graph (measured: its allocations at the peak), which saves the repeated k/v; without
        # checkpointing the compiled layer keeps them grouped (8B 2x2048: 27.83 GiB padded or packed).
        kv = expanded_kv_dim(shape, work)
    mlp = h if work.tiled_mlp else 2 * i  # tiled: the MLP's input instead of gate and up
    kept: float = a * (2 * h + 2 * q + 2 * kv + mlp) + 4 * shape.heads
    cheap = a * (shape.norms_per_layer * h + q + (0 if work.tiled_mlp else i))
    if work.method in WHOLE_MODEL_METHODS or work.activation_budget >= 1.0:
        kept += cheap  # trained weights need their inputs (and budget 1 keeps everything)
    elif work.activation_budget < 0.8:
        kept *= work.activation_budget / 0.8
    if work.bits and work.gradient_checkpointing and not work.tiled_mlp:
        # The replayed layer of a 4-bit base also holds bitsandbytes' gate and up outputs beside the
        # graph's own sums with the adapters (H100, 1B QLoRA 4x2048 packed: two 128 MiB outputs of its
        # dequantize-and-multiply at the peak; bench/results/peak_1b_qlora_gc_pack_2k_h100_2026-12-06.txt).
        kept += a * 2 * i
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


def logits_note(work: Workload) -> str:
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
    rows = min(picked, loss_chunk_rows(shape.vocab))
    per_row = (2 * a + 4 + (4 if shape.logit_softcap else 0)) * shape.vocab
    hidden = 2 * a * picked * shape.hidden
    head_grad = 4 * shape.vocab * shape.hidden if work.method == "full" else 0
    return int(rows * per_row + hidden + head_grad)


def workspace_bytes(shape: ModelShape, work: Workload) -> int:
    """Transient tensors of one decoder layer's backward (gradients of the MLP's widest tensors)."""
    t = work.tokens
    a = DTYPE_BYTES[work.dtype]
    if work.tiled_mlp and t > MLP_TILE_TOKENS:  # one tile's MLP run again with its gradients, and dx being filled
        temps = (8 + 3 * a) * shape.intermediate * MLP_TILE_TOKENS + a * shape.hidden * t
    else:
        temps = 8 * shape.intermediate * t
    # Attention's backward comes after the MLP's (whose dx stays alive): dq and the gradients of the
    # (repeated) k and v, then k's and v's summed back to their heads.  It outgrows a tiled MLP's
    # workspace at long context (8B at 32k: 1.1 vs 1.0 GiB).
    kv_e = expanded_kv_dim(shape, work)
    attention = a * (shape.q_dim + 2 * kv_e + (2 * shape.kv_dim if kv_e != shape.kv_dim else 0) + shape.hidden) * t
    temps = max(temps, attention)
    if work.bits and work.backend == "torch":
        widest = max(lin.in_features * lin.out_features for lin in shape.block_linears())
        temps += 2 * widest * DTYPE_BYTES[work.dtype]  # a dequantized weight, forward and backward
    return temps
