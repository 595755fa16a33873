"""train.sample_every: greedy answers while training, in metrics.jsonl, TensorBoard, the events and the dashboard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tests.conftest import run_cli
from tests.integration.conftest import base_config, chat_data, e2e_model  # noqa: F401  (fixtures reused here)
from tests.ui.conftest import page_test

pytestmark = pytest.mark.slow


def test_samples_are_logged_at_their_steps_and_the_last_is_what_generate_answers(
    e2e_model: Path,  # noqa: F811
    chat_data: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = base_config(e2e_model, chat_data, tmp_path / "out", steps=4, sample_every=2, sample_max_new_tokens=6)
    raw["tensorboard"] = True
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    home = tmp_path / "home"
    done = run_cli("train", tmp_path / "cfg.yaml", home=home)
    assert done.returncode == 0, done.stderr[-2000:]

    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    sampled = [r for r in rows if "samples" in r]
    assert [r["step"] for r in sampled] == [2, 4]
    first_valid = json.loads((chat_data / "valid.jsonl").read_text(encoding="utf-8").splitlines()[0])
    question = [m["content"] for m in first_valid["messages"] if m["role"] == "user"][-1]
    assert len(sampled[-1]["samples"]) == 3 and sampled[-1]["samples"][0]["prompt"] == question
    run_id = json.loads(run_cli("runs", "list", "--json", home=home).stdout)[0]["id"]
    generated = run_cli("generate", question, "--run", run_id, "--max-new-tokens", "6", home=home)
    assert generated.stdout.rstrip("\n") == sampled[-1]["samples"][0]["answer"]  # the finished run's own answer

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "out" / "tensorboard"), size_guidance={"tensors": 0})
    board.Reload()
    assert [t.step for t in board.Tensors("samples")] == [2, 4]

    monkeypatch.setenv("TUNELAB_HOME", str(home))
    from tunelab.registry.db import close_registries

    close_registries()
    page = page_test("run", run=run_id).run()  # the run page, as the dashboard renders it
    assert not page.exception
    table = next(d.value for d in page.dataframe if "answer" in d.value.columns)
    assert list(table["step"]) == [2, 2, 2, 4, 4, 4] and question in set(table["prompt"])
    close_registries()
