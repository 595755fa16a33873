"""The base model's answers are generated once per (base, examples, answer length, prompt format, backend):
evaluating a second run on the same base reads them back instead of asking the base again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def _eval(home: Path, run_id: str, *args: str) -> tuple[dict, str]:
    done = run_cli("eval", run_id, "--json", *args, home=home, env={"COLUMNS": "200"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout), done.stderr


def _base_answers(report: dict) -> list[str]:
    lines = Path(report["examples_file"]).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["base_prediction"] for line in lines]


def test_a_second_run_on_the_same_base_reuses_the_bases_answers(
    trained: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tunelab import services
    from tunelab.config.load import load_config

    shared, first = trained
    home = tmp_path / "home"
    shutil.copytree(shared, home)  # a registry of our own, whose cache starts empty
    shutil.rmtree(home / "cache" / "eval-base", ignore_errors=True)
    config = json.loads(run_cli("runs", "show", first, "--json", home=home).stdout)["config"]
    second_cfg = {
        **config,
        "train": {**config["train"], "steps": 2, "eval_every": 2},
        "output_dir": str(tmp_path / "two"),
    }
    monkeypatch.setenv("TUNELAB_HOME", str(home))  # trained in this process, into the copied registry: a CLI start less
    trained_two = services.start_run(load_config(second_cfg))
    assert trained_two.status == "completed" and trained_two.run_id != first, trained_two
    second = trained_two.run_id
    cache = home / "cache" / "eval-base"

    one, said = _eval(home, first, "--metrics", "exact_match,contains", "--max-new-tokens", "8")
    assert not one["base_cached"] and "answering with the base model" in said, said
    [entry] = cache.glob("*.json")
    written = (entry.read_bytes(), entry.stat().st_mtime_ns)
    assert json.loads(written[0])["answers"] == _base_answers(one)

    # Another run, other metrics: the base's answers are read back, never generated, and score the same.
    two, said = _eval(home, second, "--metrics", "exact_match", "--max-new-tokens", "8")
    assert two["base_cached"] and "answering with the base model" not in said, said
    assert f"the base model's answers from the cache: {entry}" in said.replace("\n", ""), said
    assert _base_answers(two) == _base_answers(one)
    assert two["base_scores"]["exact_match"] == one["base_scores"]["exact_match"]
    assert (entry.read_bytes(), entry.stat().st_mtime_ns) == written and list(cache.glob("*.json")) == [entry]

    # A setting the answers depend on (their length) is a new entry, generated afresh.
    three, said = _eval(home, second, "--metrics", "exact_match", "--max-new-tokens", "4", "--limit", "3")
    assert not three["base_cached"] and "answering with the base model" in said, said
    assert len(list(cache.glob("*.json"))) == 2
