"""`tunelab eval` under a real memory limit: a batch that runs out of memory is answered again in halves.

The limit is real: the eval process runs under an address-space limit (``RLIMIT_AS``) set
200 MB below what an unlimited eval of the same prompts at batch 8 peaked at.  The model's
MLP is wide (8,192) and the prompts long (~1,000 tokens), so each row of a batch needs ~100 MB
more: 8 at once can't fit, 4 can.  Its answers must be the unlimited run's, and a prompt too
long to fit even alone must stop the eval with a clear error and no answers file.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import address_space_peak, run_cli_capped

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the address-space peak"),
]

HEADROOM = 200 * 2**20  # below batch 8's peak by this much; batch 4 needs ~400 MB less than batch 8


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A 2-layer Llama with a wide MLP (its activations grow ~100 MB per 1,000-token row) and 8 long prompts."""
    from tunelab.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("eval-backoff")
    rng = random.Random(0)
    words = [a + b for a in "bcdfgklmnprst" for b in "aeiou"]
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(900, 1000))) for _ in range(8)]
    model = make_tiny_checkpoint(root / "model", prompts[:4], arch="llama", vocab_size=400, hidden_size=64,
                                 num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=8192,
                                 max_position_embeddings=16384, seed=0)  # fmt: skip
    return model, prompts


def _data(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "completion": "x"}) + "\n" for p in prompts), encoding="utf-8")
    return path


def _eval(
    model: Path, data: Path, home: Path, limit: int | None = None, batch: int = 8
) -> subprocess.CompletedProcess[str]:
    args = ["eval", "--model", str(model), "--data", str(data), "--metrics", "exact_match", "--max-new-tokens", "6",
            "--batch-size", str(batch), "--json"]  # fmt: skip
    return run_cli_capped(*args, home=home, limit=limit, COLUMNS="200")


def _answers(done: subprocess.CompletedProcess[str]) -> list[str]:
    path = Path(json.loads(done.stdout)["examples_file"])
    return [json.loads(line)["prediction"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_batch_that_runs_out_of_memory_is_halved_and_answers_as_the_unlimited_run(
    wide_model: tuple[Path, list[str]], tmp_path: Path
) -> None:
    model, prompts = wide_model
    data = _data(tmp_path / "long.jsonl", prompts)
    free = _eval(model, data, tmp_path / "home-free")
    assert free.returncode == 0, free.stderr[-3000:]
    assert "out of memory" not in free.stderr
    limit = address_space_peak(free.stderr) - HEADROOM

    capped = _eval(model, data, tmp_path / "home", limit)
    assert capped.returncode == 0, capped.stderr[-3000:]
    assert "8 prompts at once ran out of memory" in capped.stderr and "retrying 4 at a time" in capped.stderr
    assert "Traceback" not in capped.stderr
    assert _answers(capped) == _answers(free)  # the same greedy text, prompt by prompt
    assert len(set(_answers(free))) > 1, _answers(free)  # distinct answers: a row mixed up would show

    # A ~15,000-token prompt (after a short one, answered) needs more than the limit even alone:
    # a clear error, and no answers file.
    giant = _data(tmp_path / "giant.jsonl", [prompts[0], " ".join(prompts * 2)])
    stopped = _eval(model, giant, tmp_path / "home-giant", limit)
    assert stopped.returncode == 7, stopped.stderr[-3000:]
    assert re.search(
        r"giant\.jsonl:2 \(\d+ prompt tokens\) ran out of memory even one prompt at a time", stopped.stderr
    )
    assert "--max-new-tokens" in stopped.stderr and "Traceback" not in stopped.stderr
    assert not list((tmp_path / "home-giant" / "evals").glob("*")), "a stopped eval writes no answers"

    # One prompt at a time (what an MLX model always does) stops the same way, on the same prompt.
    alone = _eval(model, giant, tmp_path / "home-alone", limit, batch=1)
    assert alone.returncode == 7, alone.stderr[-3000:]
    assert "giant.jsonl:2 ran out of memory even one prompt at a time" in alone.stderr, alone.stderr[-3000:]
    assert "Traceback" not in alone.stderr and not list((tmp_path / "home-alone" / "evals").glob("*"))
