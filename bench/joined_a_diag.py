"""Joined A (``backends/torch/joined_a.py``) against PEFT on a small model, each way it can run, on a GPU.

    . bench/gpu_env.sh && PROBE=1 PYTHONPATH=$PYTHONPATH:src python3 bench/joined_a_diag.py   # on the GPU machine
    PROBE=1 DEVICE=cpu LENGTH=64 python3 bench/joined_a_diag.py                   # the same plumbing here, slowly

Written to find why joined A trained nothing on an H100 (bench/README.md, sessions 40 to 43) while it
matched PEFT on CPU.  ``PROBE=1`` first runs one joined projection against PEFT's own path on the same
input, forward and backward, eager, under dynamo alone, ``aot_eager`` and inductor, with autocast and
without.  Then, for each mode (``MODES=`` picks), a 4-layer Llama (512 wide, bf16 base, fp32 adapters
under autocast, as a CUDA load sets them) runs three optimizer steps through ``TorchBackend`` with joined
A off and on, and it prints the losses, the peak, the first step's total gradient norm, how many
trained tensors got no gradient, and each projection's summed A and B gradient norms at the second
step.  The first mode where "on" departs from "off" names the layer at fault.

What it found (session 43, torch 2.11 on an H100): dynamo alone, under CUDA autocast, gave every
gradient through the layer as zero; eager, and dynamo without autocast, were right.  The forward
returned ``(s + l).to(dtype)``, a no-op cast under autocast, so its output was also one of its
intermediates, which torch 2.11's dynamo routes to the wrong autograd slot (CPU runs torch 2.13 here).
Returning the sum as made fixed it: every mode now matches PEFT.
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
    ("eager", True), ("eager-unfused", True), ("aot_eager", True), ("inductor", True), ("inductor", False),
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
    torch._dynamo.reset()
    narrow(mode == "inductor-narrow")
    on: bool | str = DEVICE if DEVICE == "cuda" else True
    joined_a.ON, joined_b.ON = (on if joined_a_on else False), (on if joined_b_on else False)
    budget = 1.0 if mode == "inductor-budget1" else BUDGET
    spec = ModelSpec("", "bfloat16", compile=mode.startswith("inductor"), fused_loss=True, activation_budget=budget)
    backend = small_backend(spec, layers=4)
    backend._autocast = torch.bfloat16  # as a CUDA load sets it (CPU loads leave it off)
    if mode == "aot_eager":
        for layer in decoder_layers(backend._causal_lm):
            layer.compile(backend="aot_eager")
    if mode.startswith("inductor") and DEVICE != "cuda":  # the backend compiles its layers on CUDA only
        fast.compile_decoder_layers(backend._causal_lm, budget)
    if mode == "eager-unfused":  # AdamW's for-each kernels instead of its fused one (the CUDA default)
        backend._optimizer = torch.optim.AdamW(backend._params, lr=0.0, fused=False, foreach=True)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, norms, first = [], "", ""
    for step, batch in enumerate(batches()):
        result = backend.forward_backward(batch, 1.0 / (4 * LENGTH))
        if step == 0:
            first = f"step1 total grad norm={total_norm(backend.model):.3g} "
        if step == 1:
            norms = gradient_summary(backend.model)
        backend.optimizer_step(1e-2)
        losses.append(round(float(result.loss_sum) / result.tokens, 4))
    peak = torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else 0.0
    return f"losses={losses} peak={peak:.0f} MiB {first}{norms}"


def small_backend(spec: ModelSpec, layers: int) -> TorchBackend:
    """A small bf16 Llama (512 wide, seeded) with LoRA r16 on every projection, attached to a TorchBackend."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", vocab_size=4096, hidden_size=512, intermediate_size=2048, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(DEVICE)
    backend = TorchBackend()
    backend.attach(model, spec, MethodSpec("lora", rank=16, alpha=32.0), OptimSpec(), None)
    return backend


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


def total_norm(model: Any) -> float:
    """The summed norm of every trained tensor's gradient (0 for those without one)."""
    return sum(float(p.grad.float().norm()) for p in model.parameters() if p.requires_grad and p.grad is not None)


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


# the probe's ways of running one joined module: (label, torch.compile backend or None, autocast on)
PROBES = [
    ("peft", None, True),
    ("joined eager", None, True),
    ("joined dynamo only", "eager", True),
    ("joined aot_eager", "aot_eager", True),
    ("joined aot_eager no autocast", "aot_eager", False),
    ("joined inductor", "inductor", True),
]


def probe() -> None:
    """One joined module against PEFT's path on the same input, forward and backward, B made nonzero first."""
    joined_a.ON = DEVICE if DEVICE == "cuda" else True
    backend = small_backend(ModelSpec("", "bfloat16", fused_loss=True), layers=2)
    layer = decoder_layers(backend._causal_lm)[0]
    for module in (layer.self_attn.o_proj, layer.mlp.down_proj):
        a, b = joined_a._a(module), module.lora_B["default"].weight
        with torch.no_grad():
            b.normal_(std=0.02)
        rows = getattr(module, joined_a.BUFFER, None)
        same_rows = None if rows is None else float((rows[-a.shape[0] :].float() - a.float()).abs().max())
        x0 = torch.randn(2, 64, a.shape[1], device=DEVICE, dtype=torch.bfloat16)
        g = torch.randn(2, 64, b.shape[0], device=DEVICE, dtype=torch.bfloat16)
        print(f"probe {module.__class__.__name__}: A rows vs A={same_rows}", flush=True)
        reference = None
        # (label, compile backend or None, autocast on): PEFT's own path first, the reference
        for label, backend_name, autocast in PROBES:
            x = x0.clone().requires_grad_(True)
            a.grad = b.grad = None
            torch._dynamo.reset()

            def call(x: torch.Tensor, label: str = label, module: Any = module) -> torch.Tensor:
                return module(x, adapter_names=None) if label == "peft" else module(x)

            run_it = torch.compile(call, backend=backend_name) if backend_name else call
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
                y = run_it(x)
            y.backward(g)
            got = [t.float() if t is not None else torch.zeros(1, device=DEVICE) for t in (y, x.grad, a.grad, b.grad)]
            if reference is None:
                reference = got
                print(f"  peft norms y/x.grad/A.grad/B.grad={[f'{float(t.norm()):.3g}' for t in got]}", flush=True)
                continue
            diffs = [float((m - r).abs().max() / (r.abs().max() + 1e-12)) for m, r in zip(got, reference, strict=True)]
            print(f"  {label:24s} relative max diff={[f'{d:.2e}' for d in diffs]}", flush=True)


def main() -> None:
    where = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(torch.__version__, where, f"budget={BUDGET}", flush=True)
    if os.environ.get("PROBE"):
        probe()
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
