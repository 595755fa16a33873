"""QLoRA vs bf16 LoRA on a CUDA GPU: same start, same batches, 50 steps each; final losses and QLoRA's peak.

One command on a machine with one GPU (H100 80 GB or larger), about 4 minutes:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
      PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 python3 bench/qlora_gpu.py

(bitsandbytes is carried as a wheel: see ``bench/estimator_gpu.py``'s docstring for
the download line.)  Needs torch, transformers and peft; tunelab is read from ``src/``.

A Llama-3.1-8B-shaped model is random-initialised in bf16 on the GPU (seed 0,
nothing downloaded).  Two child processes, each on an empty GPU, train the same
LoRA (rank 16, all decoder linears, tunelab's shared ``lora_A`` init, zero
``lora_B``) with tunelab's loss path and AdamW (lr 1e-3, clip 1.0), batch 2 ×
2048 tokens with gradient checkpointing, for 50 steps on the same seeded
batches: first over the bf16 base, then over the base quantized to NF4 with
double-quantized scales and bf16 compute, the layers ``BitsAndBytesConfig
(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
bnb_4bit_compute_dtype=bfloat16)`` gives (what ``method: qlora`` loads).

The tokens are drawn from the first 1,000 ids of the 128k vocabulary, so there
is something to learn (the loss falls from ~ln 128256 = 11.8 towards ln 1000 =
6.9) and the two runs' curves can be compared as they move.  Printed: both
final losses (mean of the last 5 steps) and their relative difference (target
≤ 2%), the largest per-step difference, and QLoRA's peak
``torch.cuda.max_memory_allocated`` over its 50 steps (target ≤ 10 GiB); then, for
``train.offload_activations``, QLoRA's peak over 5 steps with the forward under
``torch.autograd.graph.save_on_cpu(pin_memory=True)``.
``--tiny`` runs a 2-layer model (CPU too; QLoRA is skipped without
bitsandbytes/CUDA) to check the script itself.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from estimator_gpu import LLAMA_31_8B, TINY, _build, _quantize_nf4, _set_checkpointing
from tunelab.backends.base import MethodSpec
from tunelab.backends.torch.loss import summed_loss
from tunelab.backends.torch.methods import apply_method

GiB = 1024**3
RESULT = "RESULT "
LOSS_TARGET = 0.02
PEAK_TARGET = 10 * GiB
SUB_VOCAB = 1000
OFFLOAD_STEPS = 5  # the offload run is there for its peak memory only
TAIL = 5  # final loss = mean of the last TAIL steps (one step's batch is noise)


def main() -> None:
    args = _parse()
    if args.part:  # a child: one run, its losses and peak as one JSON line for the parent
        say(RESULT + json.dumps(_train(args, quantized=args.part.startswith("qlora"), offload="offload" in args.part)))
        return
    results = {"lora": _child(args, "lora")}
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        say("QLoRA skipped: it needs a CUDA GPU and bitsandbytes (carry its wheel, see the docstring)")
    else:
        results["qlora"] = _child(args, "qlora")
        results["qlora-offload"] = _child(args, "qlora-offload")
    _report(results, args)


def _child(args: argparse.Namespace, part: str) -> dict[str, Any]:
    """One run in a fresh process, so it starts on an empty GPU; its other output is echoed."""
    cmd = [sys.executable, __file__, "--part", part, "--steps", str(args.steps), "--batch", str(args.batch)]
    cmd += ["--seq", str(args.seq), "--rank", str(args.rank), "--lr", str(args.lr)]
    cmd += ["--tiny"] if args.tiny else []
    result: dict[str, Any] = {}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(RESULT):
                result = json.loads(line[len(RESULT) :])
            elif "warn" not in line.lower():
                say(line.rstrip())
    if proc.returncode != 0 or not result:
        raise SystemExit(f"{part}: the child process failed (exit {proc.returncode})")
    return result


def _train(args: argparse.Namespace, *, quantized: bool, offload: bool = False) -> dict[str, Any]:
    """Build (and quantize), add LoRA, train ``args.steps`` steps; return losses, peak and timing.

    ``offload`` runs OFFLOAD_STEPS steps as ``train.offload_activations`` does: the forward
    under ``save_on_cpu(pin_memory=True)``, for its peak memory.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    numbers = TINY if args.tiny else LLAMA_31_8B
    started = time.perf_counter()
    model = _build(numbers, device)  # seed 0: the same weights in both children
    if quantized:
        _quantize_nf4(model)
    _set_checkpointing(model, True)
    spec = MethodSpec("lora", rank=args.rank, alpha=2.0 * args.rank, targets="all-linear", seed=0)
    peft_model = apply_method(model, spec)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    say(f"{args.part}: ready in {time.perf_counter() - started:.1f} s")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    steps = min(args.steps, OFFLOAD_STEPS) if offload else args.steps
    batches = _batches(steps, args.batch, args.seq)
    losses, started = [], time.perf_counter()
    peft_model.train()
    for step, ids in enumerate(batches):
        ids = ids.to(device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        with torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext():
            total, tokens = summed_loss(model, peft_model, inputs, True)
        (total / tokens).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(total.detach()) / tokens)
        if step % 10 == 0 or step == steps - 1:
            say(f"  step {step + 1:3d}  loss {losses[-1]:.4f}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"losses": losses, "peak_bytes": peak, "seconds_per_step": (time.perf_counter() - started) / steps}


def _batches(steps: int, batch: int, seq: int) -> list[torch.Tensor]:
    """Seeded random tokens from a sub-vocabulary, made on the CPU so both runs see the same ones."""
    generator = torch.Generator().manual_seed(1234)
    return [torch.randint(0, SUB_VOCAB, (batch, seq), generator=generator) for _ in range(steps)]


def _report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    lora = results["lora"]["losses"]
    say("")
    say(f"{'tiny Llama' if args.tiny else 'Llama-3.1-8B'} shape, random init, LoRA r={args.rank} all-linear, "
        f"{args.batch}×{args.seq} tokens, gradient checkpointing, {args.steps} steps")  # fmt: skip
    say(f"bf16 LoRA: loss {lora[0]:.4f} -> {_final(lora):.4f}, {results['lora']['seconds_per_step']:.2f} s/step")
    summary: dict[str, Any] = {"args": vars(args), **results}
    if "qlora" in results:
        qlora = results["qlora"]["losses"]
        diff = abs(_final(qlora) - _final(lora)) / _final(lora)
        worst = max(abs(q - b) / b for q, b in zip(qlora, lora, strict=True))
        peak = results["qlora"]["peak_bytes"]
        say(f"QLoRA NF4: loss {qlora[0]:.4f} -> {_final(qlora):.4f}, {results['qlora']['seconds_per_step']:.2f} s/step")
        say(f"final loss relative difference: {diff:.2%} (target <= {LOSS_TARGET:.0%}) "
            f"{'PASS' if diff <= LOSS_TARGET else 'FAIL'}; largest per-step difference {worst:.2%}")  # fmt: skip
        if peak is not None:
            verdict = "PASS" if peak <= PEAK_TARGET else "FAIL"
            say(f"QLoRA peak memory (max allocated): {peak / GiB:.2f} GiB (target <= 10 GiB) {verdict}")
        offload = results["qlora-offload"]
        if offload["peak_bytes"] is not None:
            say(f"QLoRA with offload_activations: peak {offload['peak_bytes'] / GiB:.2f} GiB, "
                f"{offload['seconds_per_step']:.2f} s/step ({OFFLOAD_STEPS} steps)")  # fmt: skip
        summary.update(final_relative_difference=diff, largest_step_difference=worst)
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "qlora_gpu.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    say(f"JSON: {out / 'qlora_gpu.json'}")


def _final(losses: list[float]) -> float:
    tail = losses[-TAIL:]
    return sum(tail) / len(tail)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the script itself (CPU too)")
    parser.add_argument("--part", choices=["lora", "qlora", "qlora-offload"], help=argparse.SUPPRESS)
    return parser.parse_args()


def say(text: str) -> None:
    print(text, flush=True)


if __name__ == "__main__":
    main()
