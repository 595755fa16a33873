"""A run never trains into a folder that holds a model or a dataset, its own or another."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.config.load import load_config
from tunelab.errors import StateError
from tunelab.train.recipe import check_fresh_output


def _cfg(model: Path, data: Path) -> object:
    return load_config({"model": {"path": str(model)}, "data": {"train": str(data)}})


def test_output_dir_may_not_be_or_hold_the_runs_model_or_data(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    data.write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n", encoding="utf-8")
    cfg = _cfg(tiny_model_dir, data)
    for folder, what in (
        (tiny_model_dir, "the run's model"),
        (data.parent, "the run's data"),
        (tmp_path, "the run's data"),
    ):
        with pytest.raises(StateError, match=f"holds {what}"):
            check_fresh_output(folder, cfg)  # type: ignore[arg-type]
    check_fresh_output(tmp_path / "new", cfg)  # type: ignore[arg-type]


def test_output_dir_may_not_hold_another_model_or_dataset(tiny_model_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-data"
    other.mkdir()
    (other / "chats.parquet").write_bytes(b"PAR1")
    with pytest.raises(StateError, match=r"holds data files \(chats.parquet\)"):
        check_fresh_output(other)
    with pytest.raises(StateError, match="holds a model checkpoint"):
        check_fresh_output(tiny_model_dir)
    stopped = tmp_path / "stopped-run"  # what a run that stopped before its first checkpoint leaves
    stopped.mkdir()
    (stopped / "metrics.jsonl").write_text("", encoding="utf-8")
    (stopped / "memory.json").write_text("{}", encoding="utf-8")
    check_fresh_output(stopped)
