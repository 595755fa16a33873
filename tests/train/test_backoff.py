"""Out-of-memory back-off through the real CLI: a run that can't hold its micro-batch halves it and goes on.

The memory limit is real: the training process runs under an address-space limit
(``RLIMIT_AS``) set between what the run needs at micro-batch 4 and at 8, so its first step
fails to allocate at 8, backs off to 4 × 2 and completes.  Its adapter must equal an
uninterrupted run at 4 × 2 (same effective batch, same rows in the same order).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file
from tests.conftest import address_space_peak, run_cli_capped

from tunelab.train.backoff import memory_hints, split_rows
from tunelab.vocab import IGNORE


@pytest.fixture(scope="module")
def long_rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small Llama whose eager attention at 1,024 tokens makes batch 8 need ~0.4 GB more than batch 4."""
    from tunelab.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("backoff")
    rng = random.Random(0)
    words = [a + b for a in "bcdfgklmnprst" for b in "aeiou"]
    texts = [" ".join(rng.choice(words) for _ in range(1500)) for _ in range(48)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    sizes = dict(vocab_size=400, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256)
    model = make_tiny_checkpoint(root / "model", texts[:20], arch="llama", seed=0, **sizes)  # type: ignore[arg-type]
    return model, data


def _config(tmp: Path, model: Path, data: Path, batch: int, accum: int) -> Path:
    raw = {
        "model": {"path": str(model), "dtype": "float32", "attn_implementation": "eager"},
        "data": {"train": str(data), "max_seq_len": 1024, "group_by_length": False},
        "method": {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.0},
        "train": {"steps": 3, "batch_size": batch, "grad_accum": accum, "lr": 1e-3, "seed": 1},
        "device": "cpu",
        "output_dir": str(tmp / "out"),
        "tensorboard": False,
    }
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _train(cfg: Path, home: Path, limit: int | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli_capped("train", cfg, home=home, limit=limit)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the address-space peak")
def test_a_run_that_runs_out_of_memory_halves_its_micro_batch_and_matches_the_smaller_run(
    long_rows: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data = long_rows
    small = _train(_config(tmp_path / "small", model, data, 4, 2), tmp_path / "home-small")
    assert small.returncode == 0, small.stderr[-3000:]
    # Room for micro-batches of 4 but not 8 (8 needs ~0.4 GB more address space here).
    limit = address_space_peak(small.stderr) + 160 * 2**20

    home = tmp_path / "home"
    capped = _train(_config(tmp_path / "capped", model, data, 8, 1), home, limit)
    assert capped.returncode == 0, capped.stderr[-3000:]
    assert "out of memory" in capped.stderr and "micro-batch 4" in capped.stderr
    assert "Traceback" not in capped.stderr

    left = load_file(str(tmp_path / "capped" / "out" / "adapter" / "adapter_model.safetensors"))
    right = load_file(str(tmp_path / "small" / "out" / "adapter" / "adapter_model.safetensors"))
    assert left.keys() == right.keys()
    assert max(float(np.abs(left[k] - right[k]).max()) for k in left) < 1e-5

    env = {**os.environ, "TUNELAB_HOME": str(home)}
    env.pop("TUNELAB_DB_URL", None)
    shown = subprocess.run(
        [sys.executable, "-m", "tunelab", "runs", "list", "--json"], env=env, capture_output=True, text=True
    )
    run_id = json.loads(shown.stdout)[0]["id"]
    run = json.loads(
        subprocess.run(
            [sys.executable, "-m", "tunelab", "runs", "show", run_id, "--json"], env=env, capture_output=True, text=True
        ).stdout
    )
    assert run["status"] == "completed"
    # The first step backs off to 4 x 2. On a loaded machine a later step can fail again (the failed attempt
    # leaves the heap fragmented) and halve once more, at step 1 or after it: each back-off halves the micro-batch
    # and doubles accumulation, so the effective batch and rows stay those of the reference and the adapter
    # still matches (checked above).
    backoffs = [(b["step"], b["micro_batch_size"], b["grad_accum"]) for b in run["memory_backoffs"]]
    assert backoffs[0] == (1, 4, 2), backoffs
    for before, after in itertools.pairwise(backoffs):
        assert after[0] >= before[0] and after[1] * 2 == before[1] and after[2] == before[2] * 2, backoffs


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the address-space peak")
def test_a_row_that_never_fits_stops_the_run_with_its_last_step_checkpointed(
    long_rows: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data = long_rows
    texts = [json.loads(line)["text"] for line in data.read_text(encoding="utf-8").splitlines()]
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"text": t[:400]}) + "\n" for t in texts[:3]), encoding="utf-8")
    mixed = tmp_path / "mixed.jsonl"  # the 4th row is ~6,000 tokens: its eager attention scores alone take ~1.5 GB
    lines = [json.dumps({"text": t[:400]}) for t in texts[:3]] + [json.dumps({"text": " ".join(texts[3:8])})]
    mixed.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    def config(name: str, train: Path) -> Path:
        path = _config(tmp_path / name, model, train, 1, 1)
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        raw["data"].update(max_seq_len=8192, shuffle=False)
        raw["train"].update(steps=4, save_every=0)
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        return path

    reference = _train(config("reference", short), tmp_path / "home-reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    limit = address_space_peak(reference.stderr) + 300 * 2**20

    stopped = _train(config("stopped", mixed), tmp_path / "home", limit)
    assert stopped.returncode != 0
    assert "step 4 ran out of memory" in stopped.stderr and "1 row per micro-batch" in stopped.stderr
    assert "gradient_checkpointing" in stopped.stderr and "--resume" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert (tmp_path / "stopped" / "out" / "checkpoints" / "step-3").is_dir()  # nothing already trained is lost


def test_split_rows_keeps_every_row_once_in_order_and_trims_only_padding() -> None:
    rng = np.random.default_rng(0)
    lengths = [5, 9, 3, 7, 2]
    ids = np.zeros((5, 12), dtype=np.int64)
    mask = np.zeros((5, 12), dtype=np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n], mask[i, :n] = rng.integers(1, 50, n), 1
    batch = {"input_ids": ids, "labels": np.where(mask == 1, ids, IGNORE), "attention_mask": mask}

    pieces = split_rows(batch, 2)
    assert [p["input_ids"].shape for p in pieces] == [(3, 9), (2, 7)]  # each as wide as its longest row
    rows = [(row, m) for p in pieces for row, m in zip(p["labels"], p["attention_mask"], strict=True)]
    for i, (row, m) in enumerate(rows):
        assert np.array_equal(row[m == 1], batch["labels"][i, : lengths[i]])
    assert [p["input_ids"].shape[0] for p in split_rows(batch, 8)] == [1, 1, 1, 1, 1]
    assert split_rows(batch, 1)[0] is batch


def test_an_out_of_memory_stop_suggests_only_the_savings_the_run_has_not_turned_on() -> None:
    # Seen on an H100: an 8B QLoRA run with checkpointing and offload on was told to turn all three on.
    everything = memory_hints(checkpointing=True, offload="auto", method="qlora")
    assert everything == ("a smaller data.max_seq_len",)
    bare = memory_hints(checkpointing=False, offload="auto", method="lora")
    assert bare[:1] == ("train.gradient_checkpointing: true",) and "method: qlora" in bare
    assert "train.offload_checkpoints: true (CUDA)" in memory_hints(checkpointing=True, offload=False, method="qlora")
