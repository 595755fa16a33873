"""A GRPO step that can't be held in memory stops the run with what to lower, its last step checkpointed.

The limit is real: the run's process gets an address-space limit (``RLIMIT_AS``) a little above what a
run of short prompts needs, and the third prompt is ~6,000 tokens long, whose eager attention alone
takes over a gigabyte while its group is sampled.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.conftest import address_space_peak, run_cli_capped


def _train(config: Path, home: Path, limit: int | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli_capped("train", config, home=home, limit=limit)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the address-space peak")
def test_a_step_that_does_not_fit_stops_with_what_to_lower(tmp_path: Path) -> None:
    from tunelab.tiny import make_tiny_checkpoint

    rng = random.Random(0)
    words = [a + b for a in "bcdfgklmnprst" for b in "aeiou"]
    texts = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(20)]
    sizes = dict(vocab_size=400, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256)
    model = make_tiny_checkpoint(tmp_path / "model", texts, arch="llama", seed=0, **sizes)  # type: ignore[arg-type]
    long = " ".join(rng.choice(words) for _ in range(6000))

    def config(name: str, prompts: list[str]) -> Path:
        root = tmp_path / name
        root.mkdir()
        (root / "train.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in prompts),
                                          encoding="utf-8")  # fmt: skip
        raw = {
            "model": {"path": str(model), "dtype": "float32", "attn_implementation": "eager"},
            "data": {"train": str(root / "train.jsonl"), "max_seq_len": 16384, "shuffle": False},
            "objective": {"name": "grpo", "rewards": ["exact_match"], "num_generations": 2, "max_new_tokens": 4},
            "train": {"steps": 3, "batch_size": 1, "save_every": 0},
            "device": "cpu",
            "output_dir": str(root / "out"),
            "tensorboard": False,
        }
        (root / "cfg.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
        return root / "cfg.yaml"

    reference = _train(config("reference", texts[:3]), tmp_path / "home-reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    limit = address_space_peak(reference.stderr) + 300 * 2**20

    stopped = _train(config("stopped", [*texts[:2], long]), tmp_path / "home", limit)
    assert stopped.returncode == 7, stopped.stderr[-3000:]  # a StateError, said without a traceback
    assert "out of memory at step 3 sampling or training 2 rows" in stopped.stderr
    assert "objective.num_generations" in stopped.stderr and "--resume" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert (tmp_path / "stopped" / "out" / "checkpoints" / "step-2").is_dir()  # nothing already trained is lost
