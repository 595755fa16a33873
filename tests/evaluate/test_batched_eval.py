"""`tunelab eval` answers several prompts at once (left-padded batches) and each answer is still exactly what
`tunelab generate` prints for that prompt alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import run_cli
from tests.evaluate.conftest import generate_here, newlines

pytestmark = pytest.mark.slow

# Prompts of very different lengths, so every batch pads some rows on the left.
PROMPTS = (
    "hi",
    "what is red?",
    "what is the colour of a ripe orange, and is it a fruit or a colour first?",
    "green",
    "what is purple? what is black? what is white?",
    "tell me",
)


def test_batched_answers_equal_generate_prompt_by_prompt(
    trained: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    home, _run_id = trained
    base = home.parent / "model"  # the untrained tiny model: a different answer to each prompt
    data = tmp_path / "varied.jsonl"
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "x"}]} for p in PROMPTS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    runs = {}
    for size in ("4", "1"):
        done = run_cli("eval", "--model", base, "--data", data, "--metrics", "exact_match", "--max-new-tokens", "12",
                       "--batch-size", size, "--json", home=home)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        path = Path(json.loads(done.stdout)["examples_file"])
        runs[size] = [json.loads(line)["prediction"] for line in path.read_text(encoding="utf-8").splitlines()]
    assert runs["4"] == runs["1"]
    assert len(set(runs["4"])) == len(PROMPTS), runs["4"]  # distinct answers: a row mixed up would show

    for prompt, answer in zip(PROMPTS, runs["4"], strict=True):  # `tunelab generate` in this process: 6 starts less
        generated = generate_here(capsys, monkeypatch, home, prompt, "--model", base, "--max-new-tokens", "12")
        assert generated == newlines(answer), prompt
