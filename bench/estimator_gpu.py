"""Memory estimator vs measured peak on a CUDA GPU, for a Llama-3.1-8B-shaped model.

One command on a machine with one GPU (H100 80 GB or larger), about 3 minutes:

    PYTHONUNBUFFERED=1 PYTHONPATH=src python bench/estimator_gpu.py

Needs only torch, transformers and peft (tunelab itself is read from ``src/``;
its estimator and the torch backend's loss and LoRA code are plain imports).
Nothing is downloaded: the model is random-initialised from Llama-3.1-8B's
config numbers, in bf16, directly on the GPU.

Each row trains LoRA (rank 16, all linear layers, as tunelab's torch backend
builds it) on random tokens, every position supervised (the worst case for the
logits), batch B × 2048 tokens, with and without gradient checkpointing: two
optimizer steps, the peak taken over the second (AdamW's state exists by then).
``torch.cuda.max_memory_allocated`` is compared with the estimator's tensor
bytes, ``max_memory_reserved`` with tensors plus allocator slack.  A row that
runs out of memory is reported as such (the estimator's "does not fit" should
agree).  QLoRA rows run once tunelab's torch backend can quantize (method
qlora); until then they are printed as skipped.

Results: a markdown table on stdout and JSON in ``$OUT/estimator_gpu.json``
(or ``bench/results/``).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tunelab.backends.base import MethodSpec
from tunelab.backends.torch.loss import summed_loss
from tunelab.backends.torch.methods import apply_method
from tunelab.memory.estimate import GiB, Workload, estimate
from tunelab.memory.shapes import read_shape

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


def main() -> None:
    args = _parse()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    numbers = TINY if args.tiny else LLAMA_31_8B
    shape = read_shape(numbers)
    say(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    started = time.perf_counter()
    model = _build(numbers, device)
    say(f"built {shape.num_params / 1e9:.2f}B parameters in {time.perf_counter() - started:.1f} s")
    peft_model = apply_method(model, MethodSpec("lora", rank=args.rank, alpha=2.0 * args.rank, targets="all-linear"))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    work = Workload(
        backend="torch", device=device.type, dtype="bfloat16", rank=args.rank, seq_len=args.seq, padded=False
    )
    rows = []
    for checkpointing in (False, True):
        _set_checkpointing(model, checkpointing)
        for batch in args.batches:
            predicted = estimate(shape, replace(work, batch=batch, gradient_checkpointing=checkpointing))
            row = _measure(model, peft_model, params, batch, args.seq, shape.vocab, device)
            rows.append(_row("lora", batch, args.seq, checkpointing, predicted, row, device))
            say(_markdown_row(rows[-1]))
    rows += _qlora_rows(args, shape, work)
    _report(rows, args)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the script itself (CPU too)")
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


def _measure(
    model: Any, peft_model: Any, params: list, batch: int, seq: int, vocab: int, device: torch.device
) -> dict[str, Any]:
    """Two AdamW steps of tunelab's loss; the peak of the second. Out of memory is a result too."""
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    peft_model.train()
    result: dict[str, Any] = {"oom": False, "allocated": None, "reserved": None, "runtime": None, "step_s": None}
    try:
        for step in range(2):
            if step == 1 and device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
            loss, _ = summed_loss(model, peft_model, inputs, True)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
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
        optimizer.zero_grad(set_to_none=True)
        del optimizer, inputs, ids
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


def _qlora_rows(args: argparse.Namespace, shape: Any, work: Workload) -> list[dict[str, Any]]:
    """Predictions only, until tunelab's torch backend quantizes (then this is where they run)."""
    from tunelab.backends.torch import methods

    why = None
    if importlib.util.find_spec("bitsandbytes") is None:
        why = "bitsandbytes is not installed"
    elif "qlora" not in getattr(methods, "ADAPTER_METHODS", ()):
        why = "tunelab's torch backend has no method qlora yet"
    rows = []
    for checkpointing in (False, True):
        for batch in args.batches:
            predicted = estimate(
                shape, replace(work, method="qlora", bits=4, batch=batch, gradient_checkpointing=checkpointing)
            )
            row = {
                "method": "qlora-nf4",
                "batch": batch,
                "seq": args.seq,
                "checkpointing": checkpointing,
                "predicted_tensor_bytes": predicted.tensor_bytes,
                "predicted_total_bytes": predicted.total,
                "skipped": why or "measurement of method qlora is not wired up in this script yet",
            }
            rows.append(row)
    say(f"QLoRA rows skipped: {rows[0]['skipped']} (predictions are in the table)")
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
