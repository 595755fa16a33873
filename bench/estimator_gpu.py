"""Memory estimator vs measured peak on a CUDA GPU, for a Llama-3.1-8B-shaped model.

One command on a machine with one GPU (H100 80 GB or larger), about 4 minutes:

    PYTHONUNBUFFERED=1 PYTHONPATH=src python bench/estimator_gpu.py

The QLoRA rows need bitsandbytes, which the GPU machine's image lacks; carry its wheel
(43 MB, pure Python + bundled CUDA kernels) and install it first:

    # here:  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    #          --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
    # there (carry .whl):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
      PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 python3 bench/estimator_gpu.py

Needs only torch, transformers and peft (tunelab itself is read from ``src/``;
its estimator and the torch backend's loss and LoRA code are plain imports).
Nothing is downloaded: the model is random-initialised from Llama-3.1-8B's
config numbers, in bf16, directly on the GPU.

Each row trains LoRA (rank 16, all linear layers) through tunelab's torch
backend itself (``TorchBackend.attach``: PEFT adapters, autocast, and on CUDA
the fast path as it is by default, compiled layers with activation budget 0.8
and the fused loss) on random tokens, every position supervised (the worst case for the
logits), batch B × 2048 tokens, with and without gradient checkpointing: two
optimizer steps, the peak taken over the second (AdamW's state exists by then).
``torch.cuda.max_memory_allocated`` is compared with the estimator's tensor
bytes, ``max_memory_reserved`` with tensors plus allocator slack.  A row that
runs out of memory is reported as such (the estimator's "does not fit" should
agree).  QLoRA rows quantize the decoder blocks' linears to NF4 with
bitsandbytes (as ``BitsAndBytesConfig(load_in_4bit=True, nf4, double quant,
bf16 compute)`` loads them) and train the same LoRA on top; without
bitsandbytes they print their predictions and are skipped.

Results: a markdown table on stdout and JSON in ``$OUT/estimator_gpu.json``
(or ``bench/results/``).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tunelab.backends.base import MethodSpec, ModelSpec, OptimSpec
from tunelab.backends.torch.backend import TorchBackend
from tunelab.memory.estimate import estimate
from tunelab.memory.shapes import read_shape
from tunelab.memory.workload import GiB, Workload

LLAMA_31_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
TINY = {**LLAMA_31_8B, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2, "vocab_size": 4096}
TOLERANCE = 0.15
ROW = "ROW "


def main() -> None:
    args = _parse()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    numbers = TINY if args.tiny else LLAMA_31_8B
    shape = read_shape(numbers)
    work = Workload(
        backend="torch",
        device=device.type,
        dtype="bfloat16",
        rank=args.rank,
        seq_len=args.seq,
        padded=False,
        compiled_layers=device.type == "cuda",  # the backend's CUDA fast path, as it is by default
    )
    if args.part:  # a child process: one model family, rows as JSON lines for the parent
        # Only children touch the GPU: a CUDA context in the parent would take memory from them.
        say(f"torch {torch.__version__}, {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
        part = work if args.part == "lora" else replace(work, method="qlora", bits=4)
        for row in _rows(args, numbers, device, part):
            say(ROW + json.dumps(row))
        return
    rows = _child(args, "lora")
    if importlib.util.find_spec("bitsandbytes") is None:
        rows += _skipped_qlora_rows(args, shape, work, "bitsandbytes is not installed (carry its wheel)")
    else:
        rows += _child(args, "qlora")
    _report(rows, args)


def _child(args: argparse.Namespace, part: str) -> list[dict[str, Any]]:
    """Run one model family in a fresh process, so the next starts on an empty GPU; echo its output."""
    cmd = [sys.executable, __file__, "--part", part, "--seq", str(args.seq), "--rank", str(args.rank)]
    cmd += ["--batches", *map(str, args.batches)] + (["--tiny"] if args.tiny else [])
    rows = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(ROW):
                rows.append(json.loads(line[len(ROW) :]))
            elif "warn" not in line.lower():
                say(line.rstrip())
    if proc.returncode != 0:
        say(f"{part}: the child process failed (exit {proc.returncode}); its rows so far are kept")
    return rows


def _rows(args: argparse.Namespace, numbers: dict[str, Any], device: torch.device, work: Workload) -> list[dict]:
    """Build the model (NF4-quantized for qlora), wrap it with tunelab's LoRA, measure every row."""
    shape = read_shape(numbers)
    started = time.perf_counter()
    model = _build(numbers, device)
    if work.bits:
        _quantize_nf4(model)
        kinds = {type(m).__name__ for m in model.model.layers.modules()}
        say(f"  quantized the decoder blocks' linears to NF4 ({'Linear4bit' in kinds and 'Linear' not in kinds})")
    say(f"built {shape.num_params / 1e9:.2f}B parameters in {time.perf_counter() - started:.1f} s ({work.method})")
    if device.type == "cuda":
        say(
            f"  weights on the GPU: {_gib(torch.cuda.memory_allocated())} GiB, "
            f"predicted {_gib(estimate(shape, work).get('weights'))} GiB"
        )
    backend = TorchBackend()  # the training path itself: PEFT LoRA, autocast, compiled layers, fused loss
    method = MethodSpec("lora", rank=args.rank, alpha=2.0 * args.rank, targets="all-linear")
    backend.attach(model, ModelSpec("", "bfloat16"), method, OptimSpec(), None)
    rows = []
    for checkpointing in (False, True):
        _set_checkpointing(model, checkpointing)
        for batch in args.batches:
            predicted = estimate(shape, replace(work, batch=batch, gradient_checkpointing=checkpointing))
            measured = _measure(backend, batch, args.seq, shape.vocab, device)
            name = "qlora-nf4" if work.bits else "lora"
            rows.append(_row(name, batch, args.seq, checkpointing, predicted, measured, device))
            say(_markdown_row(rows[-1]))
    return rows


def _quantize_nf4(model: Any) -> None:
    """Swap every decoder-block linear for bitsandbytes' NF4 layer (double-quantized scales, bf16 compute).

    The same layers ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)`` gives when loading;
    embeddings, norms and the LM head stay bf16.  One layer at a time, so the peak stays low.
    """
    import bitsandbytes as bnb

    for block in model.model.layers:
        for parent in list(block.modules()):
            for attr, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                layer = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,
                    quant_type="nf4",
                    device=torch.device("meta"),
                )
                weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=64
                )
                layer.weight = weight.to(child.weight.device)
                if child.bias is not None:
                    layer.bias = child.bias
                setattr(parent, attr, layer)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the script itself (CPU too)")
    parser.add_argument("--part", choices=["lora", "qlora"], help=argparse.SUPPRESS)
    return parser.parse_args()


def say(text: str) -> None:
    print(text, flush=True)


def _build(numbers: dict[str, Any], device: torch.device) -> Any:
    """Random weights straight on the device: no download, no host copy of 16 GB."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**numbers)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model


def _set_checkpointing(model: Any, on: bool) -> None:
    """As tunelab's torch backend does it: non-reentrant, embeddings' output requiring grad."""
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    else:
        model.gradient_checkpointing_disable()
        if hasattr(model, "disable_input_require_grads"):
            model.disable_input_require_grads()


def _measure(backend: Any, batch: int, seq: int, vocab: int, device: torch.device) -> dict[str, Any]:
    """Two training steps through the backend; the peak of the second. Out of memory is a result too."""
    import numpy as np

    ids = np.random.default_rng(0).integers(0, vocab, size=(batch, seq))
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}
    result: dict[str, Any] = {"oom": False, "allocated": None, "reserved": None, "runtime": None, "step_s": None}
    try:
        for step in range(2):
            if step == 1 and device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
            backend.forward_backward(inputs, 1.0 / (batch * (seq - 1)))
            backend.optimizer_step(1e-5)
        if device.type == "cuda":
            torch.cuda.synchronize()
            result["step_s"] = time.perf_counter() - started
            result["allocated"] = torch.cuda.max_memory_allocated()
            result["reserved"] = torch.cuda.max_memory_reserved()
            free, total = torch.cuda.mem_get_info()
            result["runtime"] = (total - free) - torch.cuda.memory_reserved()  # held outside PyTorch's pool
    except torch.cuda.OutOfMemoryError:
        result["oom"] = True
    finally:
        backend._optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _row(
    method: str, batch: int, seq: int, checkpointing: bool, predicted: Any, measured: dict, device: torch.device
) -> dict[str, Any]:
    capacity = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    return {
        "method": method,
        "batch": batch,
        "seq": seq,
        "checkpointing": checkpointing,
        "predicted_tensor_bytes": predicted.tensor_bytes,
        "predicted_reserved_bytes": predicted.tensor_bytes + predicted.get("allocator"),
        "predicted_total_bytes": predicted.total,
        "predicted_fits": capacity is None or predicted.total <= capacity,
        "peak_at": predicted.peak_at,
        "breakdown_gib": {line.key: round(line.bytes / GiB, 3) for line in predicted.lines},
        **{f"measured_{k}": v for k, v in measured.items()},
    }


def _skipped_qlora_rows(args: argparse.Namespace, shape: Any, work: Workload, why: str) -> list[dict[str, Any]]:
    """Predictions only, when bitsandbytes is missing."""
    rows = []
    for checkpointing in (False, True):
        for batch in args.batches:
            quantized = replace(work, method="qlora", bits=4, batch=batch, gradient_checkpointing=checkpointing)
            predicted = estimate(shape, quantized)
            rows.append(
                {
                    "method": "qlora-nf4",
                    "batch": batch,
                    "seq": args.seq,
                    "checkpointing": checkpointing,
                    "predicted_tensor_bytes": predicted.tensor_bytes,
                    "predicted_total_bytes": predicted.total,
                    "skipped": why,
                }
            )
    say(f"QLoRA rows skipped: {why} (predictions are in the table)")
    return rows


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def _markdown_row(row: dict[str, Any]) -> str:
    ckpt = "yes" if row["checkpointing"] else "no"
    head = f"| {row['method']} | {row['batch']}×{row['seq']} | {ckpt} | {_gib(row['predicted_tensor_bytes'])} |"
    if row.get("skipped"):
        return head + f" skipped | | | | {row['skipped']} |"
    if row["measured_oom"]:
        verdict = "agrees" if not row["predicted_fits"] else "estimator said it fits"
        return head + f" OOM | | {_gib(row['predicted_total_bytes'])} | | predicted total > GPU: {verdict} |"
    alloc, reserved = row["measured_allocated"], row["measured_reserved"]
    if alloc is None:
        return head + " n/a (no CUDA) | | | | |"
    error = row["predicted_tensor_bytes"] / alloc - 1
    ok = "✓" if abs(error) <= TOLERANCE else "✗"
    return (
        head + f" {_gib(alloc)} | {error:+.1%} {ok} | {_gib(row['predicted_reserved_bytes'])} | {_gib(reserved)} |"
        f" peak at {row['peak_at']}; runtime outside pool {_gib(row['measured_runtime'])} GiB |"
    )


def _report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    say("")
    name = "tiny Llama" if args.tiny else "Llama-3.1-8B"
    say(f"{name} shape, bf16, LoRA r={args.rank} all-linear, every token supervised, tunelab's loss path")
    say("")
    say(
        "| method | tokens | checkpointing | predicted GiB | measured max allocated | error | "
        "predicted reserved | measured max reserved | note |"
    )
    say("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        say(_markdown_row(row))
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "estimator_gpu.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    say(f"\nJSON: {out / 'estimator_gpu.json'}")


if __name__ == "__main__":
    main()
