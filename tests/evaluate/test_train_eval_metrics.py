"""train.eval_metrics: answer metrics at each validation, beside val_loss, on the first validation examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import run_cli
from tests.evaluate.conftest import _rows

pytestmark = pytest.mark.slow


def test_eval_metrics_are_logged_at_each_validation_and_match_tunelab_eval(tmp_path: Path) -> None:
    from tunelab.tiny import make_tiny_checkpoint

    rows = _rows()
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 8), encoding="utf-8")
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    texts = [m["content"] for r in rows for m in r["messages"]] * 20
    model = make_tiny_checkpoint(tmp_path / "model", texts, arch="llama", vocab_size=300, hidden_size=64,
                                 num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, seed=0)  # fmt: skip
    config = {
        "model": {"path": str(model)},
        "data": {"train": str(tmp_path / "train.jsonl"), "valid": str(tmp_path / "valid.jsonl"), "max_seq_len": 64},
        "method": {"name": "full"},
        "train": {
            "steps": 30,
            "batch_size": 8,
            "lr": 5e-3,
            "warmup": 2,
            "seed": 0,
            "eval_every": 10,
            "eval_metrics": ["exact_match", "contains"],
            "eval_metrics_samples": 4,
            "sample_max_new_tokens": 8,
        },
        "output_dir": str(tmp_path / "out"),
        "tensorboard": True,
    }
    (tmp_path / "cfg.yaml").write_text(json.dumps(config), encoding="utf-8")
    home = tmp_path / "home"
    done = run_cli("train", tmp_path / "cfg.yaml", home=home)
    assert done.returncode == 0, done.stderr[-2000:]

    logged = [
        json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    scored = {r["step"]: r for r in logged if "eval/exact_match" in r}
    validated = sorted(r["step"] for r in logged if "val_loss" in r)
    assert sorted(scored) == validated == [10, 20, 30], (sorted(scored), validated)
    assert all(set(r) >= {"eval/exact_match", "eval/contains"} for r in scored.values())

    # The last step's scores are `tunelab eval`'s on the same four examples with the same answer length.
    run_id = json.loads(run_cli("runs", "list", "--json", home=home).stdout)[0]["id"]
    evaluated = run_cli("eval", run_id, "--metrics", "exact_match,contains", "--limit", "4", "--max-new-tokens", "8",
                        "--no-base", "--json", home=home)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    scores = json.loads(evaluated.stdout)["scores"]
    assert scores["exact_match"] >= 0.75, scores  # the fine-tune learned the answer
    assert (scored[30]["eval/exact_match"], scored[30]["eval/contains"]) == (scores["exact_match"], scores["contains"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    board.Reload()
    tags = board.Tags()
    tag = next(t for t in (*tags.get("scalars", []), *tags.get("tensors", [])) if t.endswith("eval/exact_match"))
    points = board.Scalars(tag) if tag in tags.get("scalars", []) else board.Tensors(tag)
    assert [p.step for p in points] == [10, 20, 30]
