"""The estimate's long-context terms, pinned to what the allocator held at an 8B Llama's peak (bench/peak_breakdown.py).

At 1x32768 with offloaded checkpoints and a tiled MLP, the measured peak fell in a replayed
layer's attention backward, with six q-sized and two k/v-sized tensors from transformers' SDPA
call alive; the estimate was 13.5% low (QLoRA) before it counted them.
"""

from __future__ import annotations

from dataclasses import replace

from test_memory import LLAMA_8B, SHAPE

from tunelab.memory.activations import compiled_layer_bytes, expanded_kv_dim, workspace_bytes
from tunelab.memory.shapes import read_shape
from tunelab.memory.workload import Workload

LONG = Workload(
    backend="torch", device="cuda", dtype="bfloat16", method="qlora", rank=16, bits=4, batch=1, seq_len=32768,
    gradient_checkpointing=True, compiled_layers=True, offload_checkpoints=True, tiled_mlp=True,
)  # fmt: skip


def test_a_masked_replay_saves_repeated_kv_and_an_unmasked_or_compiled_one_does_not() -> None:
    assert expanded_kv_dim(SHAPE, LONG) == SHAPE.q_dim == 4 * SHAPE.kv_dim
    assert expanded_kv_dim(SHAPE, replace(LONG, padded=False)) == SHAPE.kv_dim
    checkpointed = compiled_layer_bytes(SHAPE, LONG)
    plain = compiled_layer_bytes(SHAPE, replace(LONG, gradient_checkpointing=False))
    assert checkpointed - plain == 2 * 2 * (SHAPE.q_dim - SHAPE.kv_dim)  # k and v repeated, bf16


def test_attention_backward_outgrows_a_tiled_mlp_at_32k_but_not_at_16k() -> None:
    a, t = 2, LONG.tokens
    attention = a * (SHAPE.q_dim + 2 * SHAPE.q_dim + 2 * SHAPE.kv_dim + SHAPE.hidden) * t
    dequantized = 2 * a * max(lin.in_features * lin.out_features for lin in SHAPE.block_linears())
    assert workspace_bytes(SHAPE, LONG) == attention + dequantized
    half = replace(LONG, seq_len=16384)
    tile = (8 + 3 * a) * SHAPE.intermediate * 4096 + a * SHAPE.hidden * half.tokens
    assert workspace_bytes(SHAPE, half) == tile + dequantized


def test_grouped_query_models_only() -> None:
    mha = read_shape({**LLAMA_8B, "num_key_value_heads": 32})
    assert expanded_kv_dim(mha, LONG) == mha.kv_dim == mha.q_dim
