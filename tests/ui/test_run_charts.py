"""The run page's evaluation views: eval/<metric> beside the loss, sample answers by step, GRPO's rewards.

Read from real runs: the shared registry's first run was trained with train.sample_every 3 and
train.eval_metrics (tests/ui/conftest.py); a GRPO run is trained here for its reward charts.
"""

from __future__ import annotations

import json
from pathlib import Path

from streamlit.testing.v1 import AppTest
from tests.ui.conftest import SAMPLE_EVERY, Registry, page_test


def _charts(at: AppTest) -> dict[str, dict[str, list[int]]]:
    """Chart title -> {series name: its steps}, as the page drew them."""
    out = {}
    for element in at.get("plotly_chart"):
        spec = json.loads(element.proto.spec)
        out[spec["layout"]["title"]["text"]] = {trace["name"]: trace["x"] for trace in spec["data"]}
    return out


def test_samples_and_eval_metrics_are_logged_at_their_steps_and_shown_on_the_run_page(in_registry: Registry) -> None:
    from tunelab import services

    run_id = in_registry.run_ids[0]
    output = Path(services.show_run(run_id).output_dir)
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    sampled = [r for r in rows if "samples" in r]
    assert [r["step"] for r in sampled] == [SAMPLE_EVERY, 2 * SAMPLE_EVERY]  # 6 steps: at 3 and at the end
    valid = [json.loads(line) for line in (in_registry.data / "valid.jsonl").read_text(encoding="utf-8").splitlines()]
    questions = [[m["content"] for m in r["messages"] if m["role"] == "user"][-1] for r in valid[:3]]
    assert all([s["prompt"] for s in r["samples"]] == questions for r in sampled)  # the same prompts each time
    assert [r["step"] for r in rows if "eval/exact_match" in r] == [3, 6]  # at each validation (eval_every 3)

    at = page_test("run", run=run_id).run()
    assert not at.exception
    charts = _charts(at)
    assert charts["Eval metrics"] == {"eval/exact_match": [3, 6]}
    assert charts["Loss"]["val_loss"] == [3, 6]
    assert "Reward" not in charts and "Reward by function" not in charts  # not a GRPO run
    table = next(d.value for d in at.dataframe if "answer" in d.value.columns)
    logged = [{"step": r["step"], **s} for r in sampled for s in r["samples"]]
    assert table.to_dict("records") == logged  # every answer at its step, as metrics.jsonl has it


def test_a_grpo_run_page_charts_its_rewards(registry_copy: Registry, tmp_path: Path) -> None:
    from tunelab import services
    from tunelab.config.load import load_config

    records = [{"messages": [{"role": "user", "content": f"Give {n} as JSON"}], "n": n} for n in range(6)]
    for name, part in (("train", records[:4]), ("valid", records[4:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    rewards = [{"name": "json_valid"}, {"name": "length_penalty", "limit": 20, "weight": 0.5}]
    cfg = load_config({
        "model": {"path": str(registry_copy.model)}, "data": {"train": str(tmp_path), "max_seq_len": 48},
        "objective": {"name": "grpo", "rewards": rewards, "num_generations": 3, "max_new_tokens": 6, "beta": 0},
        "train": {"steps": 2, "batch_size": 2, "eval_every": 1},
        "output_dir": str(tmp_path / "out"), "tensorboard": False,
    })  # fmt: skip
    outcome = services.start_run(cfg)
    assert outcome.status == "completed"

    at = page_test("run", run=outcome.run_id).run()
    assert not at.exception
    charts = _charts(at)
    assert charts["Reward"] == {"reward": [1, 2], "val_reward": [1, 2]}
    assert charts["Reward by function"] == {
        name: [1, 2]
        for name in ("reward/json_valid", "reward/length_penalty", "val_reward/json_valid", "val_reward/length_penalty")
    }  # the means only: reward/<fn>_std is not a curve of its own
    assert "Eval metrics" not in charts
