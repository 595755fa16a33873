"""`tunelab init` writes a commented config that loads as is and never overwrites a file silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.cli.main import main
from tunelab.config.load import load_config


def _init(*args: str) -> int:
    try:
        main(["init", *args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_init_writes_a_valid_commented_config(tmp_path: Path) -> None:
    out = tmp_path / "run.yaml"
    assert (
        _init("--yes", "--model", "org/model", "--data", "data/", "--method", "dora", "--steps", "50", "-o", str(out))
        == 0
    )
    text = out.read_text(encoding="utf-8")
    assert "# lora | dora | full" in text  # commented, so a person can edit it
    cfg = load_config(out)
    assert (cfg.model.path, cfg.data.train, cfg.method.name, cfg.train.steps) == ("org/model", "data/", "dora", 50)


def test_init_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run.yaml"
    out.write_text("mine", encoding="utf-8")
    assert _init("--yes", "--model", "m", "--data", "d", "-o", str(out)) == 2
    assert out.read_text(encoding="utf-8") == "mine"
    assert "already exists" in capsys.readouterr().err


def test_init_without_answers_says_what_to_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _init("--yes", "-o", str(tmp_path / "x.yaml")) == 2
    assert "--model and --data" in capsys.readouterr().err
