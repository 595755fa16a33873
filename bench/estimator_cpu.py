"""Memory estimator vs measured peak on a CPU, through tunelab's own torch and MLX backends.

    python bench/estimator_cpu.py            # ~3 minutes on 2 cores
    python bench/estimator_cpu.py --quick    # the two smallest configs only

Each config runs in a fresh process: a random-init checkpoint is loaded by the
backend as in a real run, then two training steps (forward + backward +
AdamW) run on random tokens with every position supervised, and the second
step is measured.  Nothing is downloaded.

What "peak" means on a CPU, and what is compared:

* **tensor peak** — the most bytes held by live tensors at any moment of the
  step: what ``torch.cuda.max_memory_allocated`` reports on a GPU and what the
  estimator's tensor lines (all but runtime) predict.  torch's CPU allocator
  keeps no such counter, so a dispatch mode sees every tensor each operator
  returns (forward, backward and the optimizer) and tracks which storages are
  still alive.  MLX counts it itself: ``mx.get_peak_memory``.
* **process peak** — the process's resident-set high-water mark (``VmHWM``),
  reset after the model is loaded so that loading's transient copies are not
  counted: what the operating system sees.  It adds the interpreter and the
  framework libraries (the estimator's *runtime* line) and whatever the C
  allocator keeps cached, so it is compared with the estimator's total.

``tracemalloc`` would be wrong here: it sees Python objects, not tensor buffers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MiB = 2**20
TOLERANCE = 0.15
# (model[:arch], backend, method, dtype, batch, seq, checkpointing); the arch defaults to llama
MODELS = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "vocab_size": 512,
    },
    "small": {
        "hidden_size": 256,
        "intermediate_size": 704,
        "num_layers": 4,
        "num_heads": 8,
        "num_kv_heads": 4,
        "vocab_size": 8000,
    },
    "medium": {
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_layers": 8,
        "num_heads": 8,
        "num_kv_heads": 4,
        "vocab_size": 32000,
    },
}
CONFIGS = [
    ("tiny", "torch", "lora", "float32", 4, 128, False),
    ("small", "torch", "lora", "float32", 4, 256, False),
    ("small", "torch", "lora", "bfloat16", 4, 256, False),
    ("small", "torch", "full", "float32", 2, 256, False),
    ("small:qwen2", "torch", "lora", "float32", 4, 256, False),
    ("small:qwen3", "torch", "lora", "bfloat16", 4, 256, False),
    ("small:gemma2", "torch", "lora", "float32", 4, 256, False),
    ("small:phi3", "torch", "lora", "float32", 4, 256, True),
    ("medium", "torch", "lora", "float32", 4, 512, False),
    ("medium", "torch", "lora", "float32", 4, 512, True),
    ("tiny", "mlx", "lora", "float32", 4, 128, False),
    ("small", "mlx", "lora", "float32", 4, 256, False),
    ("small", "mlx", "full", "float32", 2, 256, False),
    ("medium", "mlx", "lora", "float32", 4, 512, False),
    ("medium", "mlx", "lora", "float32", 4, 512, True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the tiny configs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_work(json.loads(args.worker))), flush=True)
        return
    configs = [c for c in CONFIGS if c[0] == "tiny"] if args.quick else CONFIGS
    rows = []
    with tempfile.TemporaryDirectory(prefix="tunelab-estimator-") as tmp:
        for name, backend, method, dtype, batch, seq, ckpt in configs:
            folder = _checkpoint(Path(tmp), name)
            job = {
                "folder": str(folder),
                "model": name,
                "backend": backend,
                "method": method,
                "dtype": dtype,
                "batch": batch,
                "seq": seq,
                "checkpointing": ckpt,
            }
            rows.append(_run_worker(job))
            print(_line(rows[-1]), flush=True)
    _table(rows)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "estimator_cpu.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")


def _checkpoint(root: Path, name: str) -> Path:
    from tunelab.tiny import build_tiny_model

    size, _, arch = name.partition(":")
    folder = root / name.replace(":", "-")
    if not folder.exists():
        tied = {"tie_word_embeddings": True} if arch.startswith("gemma") else {}
        build_tiny_model(folder, arch=arch or "llama", seed=0, **MODELS[size], **tied)
    return folder


def _run_worker(job: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, env=env, timeout=900
    )
    if proc.returncode != 0:
        return {**job, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return {**job, **json.loads(proc.stdout.strip().splitlines()[-1])}


# ----------------------------------------------------------------------------- one config, in its own process


def _work(job: dict[str, Any]) -> dict[str, Any]:
    from dataclasses import replace
    from types import SimpleNamespace

    import numpy as np

    from tunelab.backends.base import MethodSpec, ModelSpec, OptimSpec
    from tunelab.memory.estimate import estimate
    from tunelab.memory.shapes import read_shape
    from tunelab.memory.workload import Workload

    if job["backend"] == "mlx":
        from tunelab.backends.mlx.backend import MlxBackend as Backend
    else:
        from tunelab.backends.torch.backend import TorchBackend as Backend  # type: ignore[assignment]
    rss_before_load = _rss("VmRSS")
    backend: Any = Backend()
    spec = ModelSpec(
        job["folder"], dtype=job["dtype"], device="cpu", gradient_checkpointing=job["checkpointing"], compile=False
    )
    backend.load(spec, MethodSpec(job["method"], rank=8, alpha=16.0), OptimSpec(), SimpleNamespace(pad_token_id=0))
    shape = read_shape(Path(job["folder"]))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, shape.vocab, (job["batch"], job["seq"]), dtype=np.int64)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}
    step = lambda: (backend.forward_backward(batch, 1.0), backend.optimizer_step(1e-4))  # noqa: E731
    step()  # AdamW's state exists from here on, as in every step but the first
    _reset_hwm()
    tensor_peak = _mlx_peak(step) if job["backend"] == "mlx" else _torch_peak(backend, step)
    work = Workload(
        backend=job["backend"],
        device="cpu",
        dtype=job["dtype"],
        method=job["method"],
        rank=8,
        batch=job["batch"],
        seq_len=job["seq"],
        padded=False,
        gradient_checkpointing=job["checkpointing"],
    )
    est = estimate(shape, replace(work))
    return {
        "predicted_tensor_bytes": est.tensor_bytes,
        "predicted_total_bytes": est.total,
        "peak_at": est.peak_at,
        "measured_tensor_bytes": tensor_peak,
        "measured_process_bytes": _rss("VmHWM"),
        "process_before_load_bytes": rss_before_load,
        "params": shape.num_params,
    }


def _torch_peak(backend: Any, step: Any) -> int:
    """Live tensor bytes at their highest during ``step`` (the CPU equivalent of max_memory_allocated)."""
    import torch

    tracker = _LiveTensors()
    existing = list(backend.model.parameters()) + [
        t for state in backend._optimizer.state.values() for t in state.values() if torch.is_tensor(t)
    ]
    tracker.track(existing)
    with tracker:
        step()
    return tracker.peak


def _mlx_peak(step: Any) -> int:
    import mlx.core as mx

    mx.clear_cache()
    mx.reset_peak_memory()
    step()
    return int(mx.get_peak_memory())


class _LiveTensors:
    """A dispatch mode that records every storage an operator returns and tracks which are still alive."""

    def __new__(cls) -> Any:
        import torch
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        class Mode(TorchDispatchMode):
            def __init__(self) -> None:
                super().__init__()
                self.live: dict[int, tuple[Any, int]] = {}
                self.peak = 0

            def track(self, tensors: list) -> None:
                for t in tensors:
                    storage = t.untyped_storage()
                    ptr = storage.data_ptr()
                    if ptr not in self.live or self.live[ptr][0].expired():
                        self.live[ptr] = (StorageWeakRef(storage), storage.nbytes())
                self.live = {p: v for p, v in self.live.items() if not v[0].expired()}
                self.peak = max(self.peak, sum(n for _, n in self.live.values()))

            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                self.track([t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)])
                return out

        return Mode()


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> None:
    """Reset the resident-set high-water mark (Linux: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


# ----------------------------------------------------------------------------- report


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:.1f}"


def _error(pred: int, measured: int) -> str:
    err = pred / measured - 1
    return f"{err:+.1%} {'✓' if abs(err) <= TOLERANCE else '✗'}"


def _line(row: dict[str, Any]) -> str:
    what = (
        f"| {row['model']} | {row['backend']} | {row['method']} | {row['dtype']} | {row['batch']}×{row['seq']} |"
        f" {'yes' if row['checkpointing'] else 'no'} |"
    )
    if "error" in row:
        return what + f" failed: {row['error']} |"
    return (
        what + f" {_mib(row['predicted_tensor_bytes'])} | {_mib(row['measured_tensor_bytes'])} |"
        f" {_error(row['predicted_tensor_bytes'], row['measured_tensor_bytes'])} |"
        f" {_mib(row['predicted_total_bytes'])} | {_mib(row['measured_process_bytes'])} |"
        f" {_error(row['predicted_total_bytes'], row['measured_process_bytes'])} | {row['peak_at']} |"
    )


def _table(rows: list[dict[str, Any]]) -> None:
    print(
        "\n| model | backend | method | dtype | tokens | ckpt | predicted tensors MiB | measured tensor peak |"
        " error | predicted total MiB | measured process peak | error | peak at |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(_line(row))


if __name__ == "__main__":
    main()
