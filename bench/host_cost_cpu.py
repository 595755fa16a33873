"""The host's cost of a compiled, checkpointed step, read on a CPU: switches for the GPU path timed without one.

Where a GPU step waits on the host (8B QLoRA with checkpointing on an H100: 418 ms a
step for ~340 ms of kernels, bench/README.md, session 49), what counts is the Python
and dispatch work per decoder layer: dynamo's guard checks, the compiled graphs'
wrappers, the checkpoint's own code, autograd's engine.  On a CPU that work is the
same code, so a deep, very narrow Llama (32 layers of width 32 by default; its
arithmetic is a few per cent of a step) makes a step all host time, and a switch
that saves the host time shows up there first.

Each variant runs ``TorchBackend.load`` (every layer rewrite ``tunelab train`` applies
on this device, in its order) with gradient checkpointing and compiled layers, which
``fast.resolve`` otherwise keeps for CUDA: here it is told they apply.  The variants
run as separate processes, interleaved, and the script prints each one's median
step time and its loss, which must not move.  This is a diagnostic for the
switches' A/B on a GPU, not a figure of the product: on a GPU the kernels a wrapper
launches cost the host more than the CPU kernels these wrappers call.

    python bench/host_cost_cpu.py                        # python and cpp graph wrappers, 3 rounds
    python bench/host_cost_cpu.py --variants python,cpp --rounds 5 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

# name -> what it sets in tunelab.backends.torch.fast before the layers compile
VARIANTS: dict[str, dict[str, Any]] = {
    "python": {},
    "cpp": {"CPP_WRAPPER": True},
    "no_asserts": {"RUNTIME_ASSERTS": False},
}


def _checkpoint(workdir: Path, layers: int, hidden: int) -> Path:
    from _common import DataSpec, ModelSpec, build_checkpoint, make_conversations

    folder = workdir / f"llama_{layers}x{hidden}"
    if not (folder / "config.json").exists():
        spec = ModelSpec(vocab_size=1000, hidden_size=hidden, num_layers=layers, num_heads=2, num_kv_heads=1,
                         intermediate_size=2 * hidden)  # fmt: skip
        build_checkpoint(folder, make_conversations(DataSpec(examples=200)), spec)
    return folder


def _one_run(folder: Path, variant: str, steps: int, rows: int, length: int) -> dict[str, Any]:
    """Runs in its own process: load with the variant's switches, time ``steps`` optimizer steps."""
    import numpy as np
    import torch

    from tunelab.backends.base import MethodSpec, ModelSpec, OptimSpec
    from tunelab.backends.torch import backend as backend_module
    from tunelab.backends.torch import fast
    from tunelab.backends.torch.backend import TorchBackend
    from tunelab.hub import load_tokenizer

    for name, value in VARIANTS[variant].items():
        setattr(fast, name, value)
    fast.PERSISTENT_ROWS = None  # inductor's GPU heuristics: nothing to do with the host's cost

    def compiled_here(device: Any, **how: Any) -> fast.FastPath:
        return fast.FastPath(compile_layers=True, fused_loss=how["fused_loss"], activation_budget=1.0)

    backend_module.resolve = compiled_here  # type: ignore[assignment]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    backend = TorchBackend()
    spec = ModelSpec(str(folder), dtype="float32", device="cpu", gradient_checkpointing=True)
    backend.load(spec, MethodSpec("lora", rank=8, alpha=16.0), OptimSpec(), load_tokenizer(folder))
    ids = np.random.default_rng(0).integers(3, 900, (rows, length)).astype(np.int64)
    batch = {"input_ids": ids, "labels": ids.copy(), "attention_mask": np.ones_like(ids)}
    times, losses = [], []
    start = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        part = backend.forward_backward(batch, 1.0)
        backend.optimizer_step(1e-3)
        times.append(time.perf_counter() - t)
        losses.append(float(part.loss_sum))
    warm = min(5, steps // 2)
    return {
        "variant": variant,
        "step_ms": 1e3 * statistics.median(times[warm:]),
        "first_steps_s": sum(times[:warm]),
        "wall_s": time.perf_counter() - start,
        "last_loss": losses[-1],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="python,cpp")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--length", type=int, default=16)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = p.parse_args()
    workdir = args.workdir or Path(tempfile.gettempdir()) / "tunelab_host_cost"
    workdir.mkdir(parents=True, exist_ok=True)
    folder = _checkpoint(workdir, args.layers, args.hidden)
    if args.one:
        print(json.dumps(_one_run(folder, args.one, args.steps, args.rows, args.length)))
        return
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else reversed(names):
            cmd = [sys.executable, __file__, "--one", name, "--workdir", str(workdir)]
            cmd += [f"--{k}={getattr(args, k)}" for k in ("steps", "layers", "hidden", "rows", "length")]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            results[name].append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{args.layers} layers x {args.hidden} wide, {args.rows}x{args.length} tokens, {args.rounds} rounds")
    print("| variant | step ms (median of rounds) | range | first steps s | last loss |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        steps = [r["step_ms"] for r in rows]
        first = statistics.median(r["first_steps_s"] for r in rows)
        loss = {round(r["last_loss"], 5) for r in rows}
        span = f"{min(steps):.2f}-{max(steps):.2f}"
        print(f"| {name} | {statistics.median(steps):.2f} | {span} | {first:.1f} | {sorted(loss)} |")


if __name__ == "__main__":
    main()
