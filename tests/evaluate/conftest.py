"""A tiny model fine-tuned on a format its base has never seen: the run `tunelab eval` scores in these tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import run_cli

COLOURS = ("red", "yellow", "green", "purple", "orange", "white", "black", "blue")
ANSWER = "a fruit"  # a format the base has never seen: it fails, and 30 steps of fine-tuning learn it


def newlines(text: str) -> str:
    """Text as a text-mode subprocess pipe reads it (universal newlines), without the trailing newline."""
    return text.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")


def generate_here(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, home: Path, *argv: str | Path
) -> str:
    """`tunelab generate …` on the registry under ``home``, through the CLI's entry point in this process (the command
    a child would run, without a child's start-up); what it prints, read as a text-mode pipe reads it."""
    from tunelab.cli.main import main

    monkeypatch.setenv("TUNELAB_HOME", str(home))
    for var in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "TOKENIZERS_PARALLELISM"):
        monkeypatch.setenv(var, "error" if var == "TRANSFORMERS_VERBOSITY" else "1")  # main() setdefault()s these
    capsys.readouterr()
    try:
        main(["generate", *(str(a) for a in argv)])
    except SystemExit as exc:
        assert not exc.code, capsys.readouterr().err[-2000:]
    return newlines(capsys.readouterr().out)


def _rows() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"what is {c}?"}, {"role": "assistant", "content": ANSWER}]}
        for c in COLOURS
    ]


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tiny model fully fine-tuned to answer every colour question the same way; its home and run id.

    Trained once for all of tests/evaluate (each module used to train its own, the same one). Tests add to its
    home (exports of the run, a second run, eval results) but none changes what another reads: treat the run's
    own files as read-only."""
    from tunelab.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("eval")
    rows = _rows()
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 8), encoding="utf-8")
    (root / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    texts = [m["content"] for r in rows for m in r["messages"]] * 20
    model = make_tiny_checkpoint(root / "model", texts, arch="llama", vocab_size=300, hidden_size=64, num_layers=2,
                                 num_heads=4, num_kv_heads=2, intermediate_size=128, seed=0)  # fmt: skip
    config = {
        "model": {"path": str(model)},
        "data": {"train": str(root / "train.jsonl"), "valid": str(root / "valid.jsonl"), "max_seq_len": 64},
        "method": {"name": "full"},
        "train": {"steps": 30, "batch_size": 8, "lr": 5e-3, "warmup": 2, "seed": 0, "eval_every": 30},
        "output_dir": str(root / "out"),
        "tensorboard": False,
    }
    (root / "cfg.yaml").write_text(json.dumps(config), encoding="utf-8")
    home = root / "home"
    done = run_cli("train", root / "cfg.yaml", home=home)
    assert done.returncode == 0, done.stderr[-2000:]
    listed = run_cli("runs", "list", "--json", home=home)
    return home, json.loads(listed.stdout)[0]["id"]
