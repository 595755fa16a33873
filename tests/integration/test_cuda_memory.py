"""On a GPU, through `tunelab train` itself: checkpointing lowers the peak on the compiled, packed path,
offloading the checkpoints lowers it further, and the loss curve stays the same.

Marked ``gpu`` (CI has none); run on the device machine with ``pytest -m gpu``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer bf16 Llama wide enough that activations dominate its weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.tiny import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("llama")
    words = [f"w{i}" for i in range(500)]
    train_bpe_tokenizer([" ".join(random.Random(i).choices(words, k=50)) for i in range(200)], out, vocab_size=800)
    config = AutoConfig.for_model(
        "llama", vocab_size=4096, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
    )  # fmt: skip
    with torch.device("cuda"):
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
    return out


def _train(run_cli: Callable[..., Any], tmp: Path, model: Path, **train: Any) -> dict[str, Any]:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(500)]
    chats = [
        {"messages": [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(20, 400)))},
                      {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(20, 600)))}]}
        for _ in range(64)
    ]  # fmt: skip
    tmp.mkdir()
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    cfg = {
        "model": {"path": str(model), "dtype": "bfloat16"},
        "data": {"train": str(data), "max_seq_len": 2048, "packing": True},
        "method": {"name": "lora", "rank": 16, "alpha": 32},
        "train": {"steps": 4, "batch_size": 4, "scheduler": "constant", "seed": 0, **train},
        "tensorboard": False,
        "output_dir": str(tmp / "run"),
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_cli("train", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = json.loads(run_cli("runs", "list", "--json").stdout)
    shown = json.loads(run_cli("runs", "show", runs[0]["id"], "--json").stdout)
    losses = [json.loads(line)["train_loss"] for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"peak": shown["peak_memory_bytes"], "losses": losses}


def test_checkpointing_lowers_the_peak_of_tunelab_train(
    tmp_path: Path, llama_dir: Path, cli: Callable[..., Any]
) -> None:
    plain = _train(cli, tmp_path / "a", llama_dir, gradient_checkpointing=False)
    kept = _train(cli, tmp_path / "b", llama_dir, gradient_checkpointing=True, offload_checkpoints=False)
    offloaded = _train(cli, tmp_path / "c", llama_dir, gradient_checkpointing=True)  # auto: offloaded on CUDA
    assert kept["peak"] < 0.8 * plain["peak"], (kept, plain)
    assert offloaded["peak"] < kept["peak"], (offloaded, kept)
    for other in (kept, offloaded):
        assert other["losses"] == pytest.approx(plain["losses"], rel=2e-2)


def test_a_run_capped_below_its_batch_backs_off_and_completes(tmp_path: Path, llama_dir: Path) -> None:
    """`set_per_process_memory_fraction` below what micro-batch 8 needs: the run halves it and finishes."""
    import os
    import subprocess
    import sys

    rng = random.Random(1)
    words = [f"w{i}" for i in range(500)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=3000))}) + "\n" for _ in range(64)))

    def run(name: str, batch: int, accum: int, cap_bytes: int | None) -> dict[str, Any]:
        cfg = {
            "model": {"path": str(llama_dir), "dtype": "bfloat16"},
            "data": {"train": str(data), "max_seq_len": 2048, "group_by_length": False},
            "method": {"name": "lora", "rank": 16, "alpha": 32},
            "train": {"steps": 3, "batch_size": batch, "grad_accum": accum, "compile": False, "seed": 0},
            "tensorboard": False,
            "output_dir": str(tmp_path / name / "run"),
        }
        (tmp_path / name).mkdir()
        path = tmp_path / name / "run.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cap = "" if cap_bytes is None else (
            "import torch; torch.cuda.set_per_process_memory_fraction("
            f"{cap_bytes} / torch.cuda.get_device_properties(0).total_memory); "
        )  # fmt: skip
        env = {**os.environ, "TUNELAB_HOME": str(tmp_path / name / "home")}
        env.pop("TUNELAB_DB_URL", None)
        code = cap + "import sys; sys.argv[0] = 'tunelab'; from tunelab.cli.main import main; main()"
        proc = subprocess.run([sys.executable, "-c", code, "train", str(path)], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        listed = subprocess.run(
            [sys.executable, "-m", "tunelab", "runs", "list", "--json"], env=env, capture_output=True, text=True
        )
        run_id = json.loads(listed.stdout)[0]["id"]
        shown = subprocess.run(
            [sys.executable, "-m", "tunelab", "runs", "show", run_id, "--json"], env=env, capture_output=True, text=True
        )
        return json.loads(shown.stdout)

    small = run("small", 4, 2, None)
    big = run("big", 8, 1, None)
    assert big["peak_memory_bytes"] > small["peak_memory_bytes"] * 1.3, (big, small)
    cap = (small["peak_memory_bytes"] + big["peak_memory_bytes"]) // 2
    capped = run("capped", 8, 1, cap)
    assert capped["memory_backoffs"], "the capped run should have backed off"
    assert capped["memory_backoffs"][0]["step"] == 1 and capped["memory_backoffs"][0]["micro_batch_size"] <= 4
    assert capped["peak_memory_bytes"] <= cap
