"""tunelab's CUDA fast path vs the transformers Trainer + PEFT stack, side by side on one GPU.

One command, one lease (an H100 or H200; about 9 minutes for the default rows):

    PYTHONPATH=src PYTHONUNBUFFERED=1 python3 bench/gpu.py [--rows NAME,NAME…] [--out DIR]

Every row runs in a child process of its own (an empty GPU, its own peak
memory), on random-initialised bf16 weights of real shapes (Llama-3.1-8B,
Llama-3.2-1B, Qwen2.5-0.5B; nothing is downloaded), LoRA r=16, alpha 32, no
dropout, on all seven linear layers of every block, AdamW (fused) at lr 1e-4.

* ``*_base_*`` rows: transformers ``Trainer`` + PEFT, sdpa attention, gradient
  checkpointing through ``gradient_checkpointing_enable`` (non-reentrant) for
  ``_gc``; the stack most people run.
* ``*_tl_*`` rows: tunelab's torch backend (``TorchBackend.attach`` on the same
  model, then its ``forward_backward`` / ``optimizer_step``), with the fast path
  as it is on by default on CUDA; ``_eager`` turns its parts off.

Fixed-shape rows feed fully packed rows of random tokens (every position
supervised) and report the median step's tokens/s after warm-up, the peak of
``torch.cuda.max_memory_allocated``, and MFU = (4N + causal attention) FLOPs
per token × tokens/s / 790 TFLOP/s (N: the matmul weights, embeddings excluded
unless tied; attention 2·2·L·seq·H per token, forward and backward; recompute
not counted), the issue's convention.

``varlen_*`` rows draw example lengths from a log-normal like instruction data
(median ~250 tokens, capped at 2,048, every token supervised): the baseline
batches 8 examples padded to the longest, tunelab packs them into 8 rows of
2,048 with per-example attention; both report supervised tokens/s over the
same examples.

``numerics`` trains the Llama-3.2-1B shape 50 steps from the same start on the
same batches (tokens drawn from 1,000 ids, so the loss moves) twice, fast path
and plain eager, and prints the largest per-step relative loss difference.

The table printed last is what ``bench/README.md`` quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PEAK_FLOPS = 790e12  # bf16 dense matmul rate measured on this workplace's H100/H200
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ARCHS: dict[str, tuple[str, dict[str, Any], int, int]] = {
    # name: (model_type, config, sequence length, rows per step)
    "llama8b": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            tie_word_embeddings=False,
        ),
        2048,
        2,
    ),
    "llama1b": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            tie_word_embeddings=True,
        ),
        2048,
        8,
    ),
    "qwen05b": (
        "qwen2",
        dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
        ),
        2048,
        8,
    ),
}
DEFAULT_ROWS = (
    "llama8b_base_nogc,llama8b_tl_nogc,llama8b_base_gc,llama8b_tl_gc,llama8b_tl_b0.2_nogc,"
    "llama1b_base_nogc,llama1b_tl_nogc,qwen05b_base_nogc,qwen05b_tl_nogc,"
    "varlen_base,varlen_tl,numerics"
)
STEPS, WARM = 12, 4


# -- child side ---------------------------------------------------------------------------------
def build(arch: str) -> tuple[Any, Any, int, int]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, kwargs, seq, rows = ARCHS[arch]
    config = AutoConfig.for_model(kind, **kwargs)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model, config, seq, rows


def matmul_params(model: Any) -> int:
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in name)
    if model.config.tie_word_embeddings:
        n += model.get_input_embeddings().weight.numel()
    return n


def mfu(config: Any, nmat: int, seq: int, tokens_per_s: float) -> float:
    attention = 2 * 2 * config.num_hidden_layers * seq * config.hidden_size
    return (4 * nmat + 2 * attention) * tokens_per_s / PEAK_FLOPS


def fixed_batches(vocab: int, rows: int, seq: int, count: int, high: int | None = None) -> list[dict[str, Any]]:
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        ids = rng.integers(0, high or vocab, size=(rows, seq), dtype=np.int64)
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()})
    return out


def varlen_examples(count: int, seed: int = 0) -> list[Any]:
    """Instruction-like lengths: log-normal, median ~250 tokens, capped at 2,048."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=np.log(250), sigma=0.9, size=count), 16, 2048).astype(np.int64)
    return [rng.integers(0, 128256, size=int(n), dtype=np.int64) for n in lengths]


def tunelab_backend(model: Any, *, gc: bool, fast: bool, packing: bool = False, budget: float = 0.8) -> Any:
    from tunelab.backends.base import MethodSpec, ModelSpec, OptimSpec
    from tunelab.backends.torch.backend import TorchBackend

    backend = TorchBackend()
    spec = ModelSpec(
        "",
        "bfloat16",
        gradient_checkpointing=gc,
        compile=fast,
        fused_loss=fast,
        packing=packing,
        activation_budget=budget,
    )
    backend.attach(model, spec, MethodSpec("lora", rank=16, alpha=32.0, dropout=0.0), OptimSpec(), None)
    return backend


def run_tunelab(backend: Any, batches: list[dict[str, Any]], warm: int) -> tuple[list[float], list[float]]:
    import torch

    times, losses = [], []
    for i, batch in enumerate(batches):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = backend.forward_backward(batch, 1.0 / max(1, int((batch["labels"][:, 1:] != -100).sum())))
        backend.optimizer_step(1e-4)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.loss_sum) / max(loss.tokens, 1))
        if i == warm - 1:
            torch.cuda.reset_peak_memory_stats()
    return times[warm:], losses


def run_trainer(model: Any, batches: list[dict[str, Any]], warm: int, gc: bool, pad_id: int = 0) -> list[float]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    times: list[float] = []

    class Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(batches)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {k: torch.from_numpy(v) for k, v in batches[i].items()}

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)
            if len(times) == warm:
                torch.cuda.reset_peak_memory_stats()

    args = TrainingArguments(
        output_dir="/tmp/tunelab-bench-trainer",
        per_device_train_batch_size=1,  # each dataset item is already a whole batch
        max_steps=len(batches),
        bf16=True,
        learning_rate=1e-4,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        optim="adamw_torch_fused",
    )

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        return items[0]

    Trainer(model=model, args=args, train_dataset=Rows(), data_collator=collate, callbacks=[Clock()]).train()
    return times[warm:]


def padded_batches(examples: list[Any], rows: int, pad_id: int = 0) -> list[dict[str, Any]]:
    import numpy as np

    out = []
    for start in range(0, len(examples) - rows + 1, rows):
        group = examples[start : start + rows]
        width = max(len(x) for x in group)
        ids = np.full((rows, width), pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        labels = np.full_like(ids, -100)
        for r, x in enumerate(group):
            ids[r, : len(x)], mask[r, : len(x)], labels[r, : len(x)] = x, 1, x
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def packed_batches(examples: list[Any], rows: int, capacity: int) -> list[dict[str, Any]]:
    import numpy as np

    from tunelab.data.packing import collate_packed, pack_rows
    from tunelab.data.tokenize import TokenizedSplit

    split = TokenizedSplit(input_ids=examples, labels=examples)
    packed = pack_rows(np.array([len(x) for x in examples]), capacity, seed=0, shuffle=False)
    # First-fit-decreasing fills the first rows with the longest examples; training draws rows in
    # a shuffled order, and so does this (else the timed steps would see only long examples).
    order = np.random.default_rng(0).permutation(len(packed))
    packed = [packed[i] for i in order]
    return [collate_packed(split, packed[i : i + rows], 0) for i in range(0, len(packed) - rows + 1, rows)]


def supervised(batch: dict[str, Any]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def child(name: str) -> dict[str, Any]:
    import torch

    if name == "numerics":
        return numerics()
    if name.startswith("varlen"):
        model, config, seq, rows = build("llama1b")
        examples = varlen_examples(12_000)
        if name == "varlen_base":
            batches = padded_batches(examples, 8)[: 4 * (STEPS + WARM)]
            times = run_trainer(model, batches, 4 * WARM, gc=False)
            measured = batches[4 * WARM :]
        else:
            batches = packed_batches(examples, rows, seq)[: STEPS + WARM]
            backend = tunelab_backend(model, gc=False, fast=True, packing=True)
            times, _ = run_tunelab(backend, batches, WARM)
            measured = batches[WARM:]
            print(f"attention {backend._attention}; steps (ms) {[round(t * 1e3) for t in times]}")
        tokens = sum(supervised(b) for b in measured)
        return {
            "row": name,
            "supervised_tok_s": round(tokens / sum(times)),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "steps": len(times),
        }
    arch, stack, variant = name.split("_", 2)
    model, config, seq, rows = build(arch)
    nmat = matmul_params(model)
    gc = variant.endswith("gc") and not variant.endswith("nogc")
    budget = next((float(part[1:]) for part in variant.split("_") if part.startswith("b")), 0.8)
    batches = fixed_batches(config.vocab_size, rows, seq, STEPS + WARM)
    if stack == "base":
        times = run_trainer(model, batches, WARM, gc=gc)
    else:
        backend = tunelab_backend(model, gc=gc, fast="eager" not in variant, budget=budget)
        times, _ = run_tunelab(backend, batches, WARM)
        if name in os.environ.get("TUNELAB_BENCH_PROFILE", "").split(","):
            profile(backend, batches[:3], name)
    step = statistics.median(times)
    tok_s = rows * seq / step
    return {
        "row": name,
        "tok_s": round(tok_s),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "mfu": round(mfu(config, nmat, seq, tok_s), 3),
        "step_ms": round(step * 1e3, 1),
    }


def numerics(steps: int = 50) -> dict[str, Any]:
    """The fast path's loss curve against the plain eager one's: same start, same batches."""
    import torch

    curves = {}
    for fast in (True, False):
        model, config, seq, rows = build("llama1b")
        batches = fixed_batches(config.vocab_size, rows, seq, steps, high=1000)
        backend = tunelab_backend(model, gc=False, fast=fast)
        _, curves[fast] = run_tunelab(backend, batches, 0)
        del backend, model
        torch.cuda.empty_cache()
    diffs = [abs(a - b) / b for a, b in zip(curves[True], curves[False], strict=True)]
    return {
        "row": "numerics",
        "max_rel_diff": round(max(diffs), 5),
        "final_fast": round(curves[True][-1], 4),
        "final_eager": round(curves[False][-1], 4),
        "first": round(curves[False][0], 4),
    }


def saved_report(backend: Any, batch: dict[str, Any]) -> str:
    """What the forward keeps for backward: unique tensors by shape and dtype (for the profile)."""
    from collections import Counter

    import torch

    seen: dict[tuple[int, tuple[int, ...]], tuple[tuple[int, ...], str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cuda":
            seen[(t.untyped_storage().data_ptr(), tuple(t.shape))] = (
                tuple(t.shape),
                str(t.dtype),
                t.untyped_storage().nbytes(),
            )
        return t

    torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = backend._summed_loss(batch)
    after_forward, forward_peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    loss.backward()
    backward_peak = torch.cuda.max_memory_allocated()
    backend._optimizer.zero_grad(set_to_none=True)
    counts: Counter[tuple[tuple[int, ...], str]] = Counter()
    total: Counter[tuple[tuple[int, ...], str]] = Counter()
    storages: dict[int, int] = {}
    for (ptr, _), (shape, dtype, nbytes) in seen.items():
        counts[(shape, dtype)] += 1
        if ptr not in storages:
            storages[ptr] = nbytes
            total[(shape, dtype)] += nbytes
    lines = [
        f"allocated after forward {after_forward / 2**30:.2f} GiB, forward peak {forward_peak / 2**30:.2f}, "
        f"backward peak {backward_peak / 2**30:.2f}",
        f"saved for backward: {sum(storages.values()) / 2**30:.2f} GiB in {len(storages)} storages",
    ]
    for key, nbytes in total.most_common(10):
        lines.append(f"  {key[0]} {key[1]}: {counts[key]} tensors, {nbytes / 2**30:.3f} GiB")
    return "\n".join(lines)


def profile(backend: Any, batches: list[dict[str, Any]], name: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    print(saved_report(backend, batches[0]))

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for batch in batches:
            backend.forward_backward(batch, 1e-4)
            backend.optimizer_step(1e-4)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    out = Path(os.environ.get("OUT", "/tmp")) / f"profile_{name}.txt"
    out.write_text(table)


# -- parent side --------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=DEFAULT_ROWS)
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    parser.add_argument("--child")
    parser.add_argument("--table", nargs="*", help="print the table of saved result files and exit")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child)), flush=True)
        return
    if args.table is not None:
        print_table([row for path in args.table for row in json.loads(Path(path).read_text())])
        return
    results = []
    for name in args.rows.split(","):
        start = time.time()
        proc = subprocess.run(
            [sys.executable, __file__, "--child", name], capture_output=True, text=True, env=os.environ.copy()
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            tail = (proc.stderr or proc.stdout)[-1500:]
            print(f"{name}: failed ({proc.returncode})\n{tail}", flush=True)
            results.append({"row": name, "error": tail[-300:]})
            continue
        for line in proc.stdout.splitlines():
            if not line.startswith("RESULT "):
                print(f"  {name}: {line}")
        row = json.loads(lines[-1][7:])
        row["wall_s"] = round(time.time() - start)
        results.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu.json").write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: list[dict[str, Any]]) -> None:
    by = {r["row"]: r for r in results}
    print("\nrow                    tok/s    peak GiB   MFU    vs baseline")
    for r in results:
        if "tok_s" not in r:
            continue
        arch, stack, variant = r["row"].split("_", 2)
        base = by.get(f"{arch}_base_{variant.split('_')[-1]}")  # gc or nogc
        vs = f"{r['tok_s'] / base['tok_s']:.2f}x" if base and "tok_s" in base and stack != "base" else ""
        print(f"{r['row']:<22} {r['tok_s']:>7,} {r['peak_gib']:>9.2f} {r['mfu']:>6.3f}   {vs}")
    if "varlen_base" in by and "varlen_tl" in by and "supervised_tok_s" in by["varlen_tl"]:
        base, ours = by["varlen_base"], by["varlen_tl"]
        ratio = ours["supervised_tok_s"] / base["supervised_tok_s"] if "supervised_tok_s" in base else float("nan")
        print(
            f"varlen supervised tok/s: baseline padded {base.get('supervised_tok_s')}, tunelab packed "
            f"{ours['supervised_tok_s']} ({ratio:.2f}x)"
        )
    if "numerics" in by and "max_rel_diff" in by["numerics"]:
        n = by["numerics"]
        print(
            f"numerics, 50 steps: max per-step loss diff {n['max_rel_diff']:.2%} "
            f"(final {n['final_fast']} fast vs {n['final_eager']} eager, first {n['first']})"
        )


if __name__ == "__main__":
    main()
