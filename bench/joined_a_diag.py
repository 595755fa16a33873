"""Where joined A (``backends/torch/joined_a.py``, off) goes wrong on a CUDA GPU: a small model, run each way.

    . bench/gpu_env.sh && PYTHONPATH=$PYTHONPATH:src python3 bench/joined_a_diag.py   # on the GPU machine
    DEVICE=cpu LENGTH=64 python3 bench/joined_a_diag.py          # the same plumbing here, slowly

Through ``tunelab train`` on an H100, joined A's losses did not fall and its peak was 10 GiB under PEFT's
(bench/README.md, sessions 40 and 41), and its ``gpu`` tests fail there, while on CPU it matches PEFT in fp32
under eager, ``aot_eager`` and inductor alike.  This runs a 4-layer Llama (512 wide, bf16 base, fp32
adapters under autocast, as a CUDA load sets them) through ``TorchBackend`` three optimizer steps with
joined A off and on, for each of: eager; layers compiled with ``aot_eager`` (dynamo and AOT autograd,
no code generation); tunelab's own compiled path (inductor); the same with joined B off.  For each it
prints the losses, the peak, how many trained tensors got no gradient, and the summed gradient norm of
each projection's A and B at the second step.  The first mode where "on" departs from "off" names the
layer at fault: dynamo's tracing of the autograd function, AOT's partition, or inductor's CUDA code.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from tunelab.backends.base import MethodSpec, ModelSpec, OptimSpec
from tunelab.backends.torch import fast, joined_a, joined_b
from tunelab.backends.torch.backend import TorchBackend
from tunelab.backends.torch.loading import decoder_layers

DEVICE = os.environ.get("DEVICE", "cuda")
LENGTH = int(os.environ.get("LENGTH", "1024"))
# (mode, joined B on): eager, aot_eager (layers compiled without code generation), inductor (tunelab's path),
# then tunelab's path without one of its CUDA-only choices at a time: the partitioner's activation budget (1.0:
# it recomputes nothing) and the one-pass norms' wide rows (inductor's own reduction heuristic)
MODES = [
    ("eager", True), ("aot_eager", True), ("inductor", True), ("inductor", False),
    ("inductor-budget1", True), ("inductor-narrow", True),
]  # fmt: skip
WIDE_ROWS = fast.PERSISTENT_ROWS  # the backend's default, put back after an inductor-narrow run
BUDGET = float(os.environ.get("BUDGET", "0.8"))  # the activation budget of the inductor modes but -budget1
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def batches(count: int = 3, rows: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        ids = rng.integers(0, 512, size=(rows, LENGTH))
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()})
    return out


def run(mode: str, joined_b_on: bool, joined_a_on: bool) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch._dynamo.reset()
    narrow(mode == "inductor-narrow")
    on: bool | str = DEVICE if DEVICE == "cuda" else True
    joined_a.ON, joined_b.ON = (on if joined_a_on else False), (on if joined_b_on else False)
    config = AutoConfig.for_model(
        "llama", vocab_size=4096, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(DEVICE)
    backend = TorchBackend()
    budget = 1.0 if mode == "inductor-budget1" else BUDGET
    spec = ModelSpec("", "bfloat16", compile=mode.startswith("inductor"), fused_loss=True, activation_budget=budget)
    backend.attach(model, spec, MethodSpec("lora", rank=16, alpha=32.0), OptimSpec(), None)
    backend._autocast = torch.bfloat16  # as a CUDA load sets it (CPU loads leave it off)
    if mode == "aot_eager":
        for layer in decoder_layers(backend._causal_lm):
            layer.compile(backend="aot_eager")
    if mode.startswith("inductor") and DEVICE != "cuda":  # the backend compiles its layers on CUDA only
        fast.compile_decoder_layers(backend._causal_lm, budget)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, norms = [], ""
    for step, batch in enumerate(batches()):
        result = backend.forward_backward(batch, 1.0 / (4 * LENGTH))
        if step == 1:
            norms = gradient_summary(backend.model)
        backend.optimizer_step(1e-2)
        losses.append(round(float(result.loss_sum) / result.tokens, 4))
    peak = torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else 0.0
    return f"losses={losses} peak={peak:.0f} MiB {norms}"


def narrow(on: bool) -> None:
    """Inductor's own reduction heuristic (on) or tunelab's wide rows (off, as ``tunelab train`` runs)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    fast.PERSISTENT_ROWS = None if on else WIDE_ROWS
    if on:
        if hasattr(inductor_config, "inductor_choices_class"):
            inductor_config.inductor_choices_class = None
        V.set_choices_handler(InductorChoices())


def gradient_summary(model: Any) -> str:
    """How many trained tensors have no gradient, and each projection's A and B gradient norms summed over layers."""
    missing, sums = 0, {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            missing += 1
            continue
        projection = next((k for k in PROJECTIONS if k in name), name.split(".")[-2])
        key = f"{projection}.{'A' if 'lora_A' in name else 'B'}"
        sums[key] = sums.get(key, 0.0) + float(p.grad.float().norm())
    return f"no-grad={missing} " + " ".join(f"{k}={v:.3g}" for k, v in sorted(sums.items()))


def main() -> None:
    where = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(torch.__version__, where, f"budget={BUDGET}", flush=True)
    chosen = os.environ.get("MODES")  # e.g. MODES=inductor,inductor-budget1
    for mode, joined_b_on in MODES:
        if chosen and mode not in chosen.split(","):
            continue
        for joined_a_on in (False, True):
            started = time.time()
            label = f"{mode:16s} joined_b={'on ' if joined_b_on else 'off'} joined_a={'on ' if joined_a_on else 'off'}"
            try:
                line = run(mode, joined_b_on, joined_a_on)
            except Exception as exc:  # a diagnostic: report and go on to the next mode
                line = f"ERROR {type(exc).__name__}: {str(exc)[:300]}"
            print(f"{label} {line} ({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
