"""Helpers the end-to-end tests share: start the real CLI, wait on it, read what a run left behind.

Test modules import these instead of each other's private helpers (one copy, one name).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml
from safetensors.numpy import load_file
from tests.conftest import run_cli, start_cli
from tests.integration.conftest import base_config

__all__ = [
    "adapter_diff",
    "assert_close",
    "cpu_config",
    "curve",
    "finish",
    "listed_runs",
    "only_run_id",
    "ranks_cli",
    "reference_val_loss",
    "start_cli",
    "stop_after_first_step",
    "torchrun",
    "wait_for",
]


def torchrun(nproc: int) -> tuple[str, ...]:
    """The launcher arguments of a plain ``torchrun --nproc-per-node N`` (as a cluster would start it)."""
    return ("-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}") if nproc else ()


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> str:
    """Wait for a started CLI; it must succeed. Returns its stdout."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{out}\n{err}"
    return out


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    """Wait until ``path`` exists while ``proc`` still runs."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path.name}: {proc.communicate()}"
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.01)


def stop_after_first_step(proc: subprocess.Popen[str], out: Path) -> str:
    """SIGTERM the run once its first step is logged (as Ctrl-C: every rank stops at the same step and
    rank 0 checkpoints); return its stderr."""
    import signal

    deadline = time.time() + 180
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text(encoding="utf-8"):
        assert proc.poll() is None, f"run ended before its first step: {proc.communicate()}"
        assert time.time() < deadline, "timed out waiting for the first step"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    return err


def listed_runs(home: Path) -> list[dict]:
    """``tunelab runs list --json`` for the registry under ``home``."""
    listed = run_cli("runs", "list", "--json", home=home)
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def only_run_id(home: Path) -> str:
    runs = listed_runs(home)
    assert len(runs) == 1
    return runs[0]["id"]


def adapter_diff(a: Path, b: Path) -> float:
    """The largest absolute difference between two saved PEFT adapters (same tensors required)."""
    left, right = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert left.keys() == right.keys()
    return max(float(abs(left[k] - right[k]).max()) for k in left)


def curve(out: Path, key: str) -> dict[int, float]:
    """``key`` by step from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return {row["step"]: row[key] for row in rows if key in row}


def assert_close(left: dict[int, float], right: dict[int, float], steps: range, tol: float) -> None:
    missing = [step for step in steps if step not in left or step not in right]
    assert not missing, f"steps {missing} not logged by both runs: {sorted(left)} and {sorted(right)}"
    for step in steps:
        assert abs(left[step] - right[step]) < tol, (step, left[step], right[step])


def cpu_config(tmp: Path, model: Path, data: Path, batch: int, *, steps: int, backend: str = "torch") -> Path:
    """An fp32, dropout-free CPU run (so layouts must agree to rounding), written to ``tmp/cfg.yaml``."""
    raw = base_config(model, data, tmp / "out", steps=steps, batch_size=batch, save_every=10)
    raw["method"]["dropout"] = 0.0
    raw["model"]["dtype"] = "float32"
    raw["device"] = "cpu"
    raw["backend"] = backend
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def ranks_cli(*args: str, home: Path, nproc: int = 0) -> subprocess.Popen[str]:
    """The CLI for the several-process tests: one thread per process (2 ranks share 2 cores), under a plain
    torchrun when ``nproc`` is given (``--nproc`` in ``args`` starts the launcher from tunelab instead)."""
    return start_cli(*args, home=home, launcher=torchrun(nproc), OMP_NUM_THREADS="1")


def reference_val_loss(model: Any, tokenizer_dir: Path, cfg_data: Any) -> float:
    """Token-weighted mean CE over all supervised validation tokens, the plain transformers way."""
    import torch

    from tunelab.data.batching import eval_batches
    from tunelab.data.prepare import prepare_data
    from tunelab.hub import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    data = prepare_data(cfg_data, tokenizer)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in eval_batches(data.valid, 5, tokenizer.pad_token_id):  # another batching than training's
            ids = torch.from_numpy(batch["input_ids"])
            logits = model(input_ids=ids, attention_mask=torch.from_numpy(batch["attention_mask"])).logits
            labels = torch.from_numpy(batch["labels"])[:, 1:]
            mask = labels != -100
            total += float(
                torch.nn.functional.cross_entropy(logits[:, :-1][mask].float(), labels[mask], reduction="sum")
            )
            count += int(mask.sum())
    return total / count
