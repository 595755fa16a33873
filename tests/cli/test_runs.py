"""`tunelab train` names its run before anything loads; `runs show` on a run that failed early reads as such."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import yaml

Cli = Callable[..., CompletedProcess]


def test_a_run_that_failed_before_loading_shows_no_none(
    cli: Cli, tokenizer_only_model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
    cfg = tmp_path / "cfg.yaml"
    raw = {
        "model": {"path": str(tokenizer_only_model_dir)},
        "data": {"train": str(data)},
        "output_dir": str(tmp_path / "o"),
    }
    cfg.write_text(yaml.safe_dump(raw), encoding="utf-8")
    trained = cli("train", cfg)
    assert trained.returncode == 3 and "not valid JSON" in trained.stderr
    run_id = trained.stdout.split()[1]  # "run ID → folder": printed before the data was read
    shown = cli("runs", "show", run_id)
    assert shown.returncode == 0, shown.stderr
    assert "failed" in shown.stdout and "None" not in shown.stdout, shown.stdout
    assert "backend not chosen: the run ended before loading the model" in shown.stdout
    assert "step 0/?" in shown.stdout
