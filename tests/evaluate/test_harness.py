"""`tunelab eval RUN --harness TASKS`: lm-evaluation-harness on local task files, nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import run_cli
from tests.evaluate.conftest import ANSWER, COLOURS

pytestmark = pytest.mark.slow


def _colour_task(folder: Path) -> Path:
    """A multiple-choice task of the run's own questions; its data file named relative to the YAML."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"question": f"what is {c}?", "choices": [ANSWER, "a stone"], "answer": 0} for c in COLOURS]
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "colours.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "colours.yaml").write_text(
        "task: colours\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data/colours.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n",
        encoding="utf-8",
    )
    return folder


def test_local_tasks_run_on_the_merged_model_and_are_stored_on_the_run(
    trained: tuple[Path, str], tmp_path: Path
) -> None:
    home, _ = trained
    root = home.parent
    config = json.loads((root / "cfg.yaml").read_text(encoding="utf-8"))
    config["method"] = {"name": "lora", "rank": 4}  # an adapter run: merged once into an HF folder for the harness
    config["train"].update(steps=2, eval_every=0)
    config["output_dir"] = str(tmp_path / "lora")
    (tmp_path / "lora.yaml").write_text(json.dumps(config), encoding="utf-8")
    assert run_cli("train", tmp_path / "lora.yaml", home=home).returncode == 0
    run_id = next(
        r["id"]
        for r in json.loads(run_cli("runs", "list", "--json", home=home).stdout)
        if r["output_dir"] == config["output_dir"]
    )

    tasks = _colour_task(tmp_path / "tasks")
    done = run_cli(
        "eval", run_id, "--harness", "tunelab_basic_facts,colours", "--harness-path", tasks, "--json", home=home
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert set(results) == {"tunelab_basic_facts", "colours"}
    assert 0.0 <= results["tunelab_basic_facts"]["acc"] <= 1.0 and "acc_norm" in results["tunelab_basic_facts"]
    assert 0.0 <= results["colours"]["acc"] <= 1.0
    assert (tmp_path / "lora" / "eval" / "merged" / "config.json").is_file()
    shown = json.loads(run_cli("runs", "show", run_id, "--json", home=home).stdout)
    assert shown["metrics"]["harness/colours/acc"] == results["colours"]["acc"]

    unknown = run_cli("eval", run_id, "--harness", "hellaswag", home=home)
    assert unknown.returncode == 2 and "no task named 'hellaswag'" in unknown.stderr, unknown.stderr[-2000:]
    assert "tunelab_basic_facts" in unknown.stderr and "Traceback" not in unknown.stderr
