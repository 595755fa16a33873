"""`tunelab init` writes a commented config that loads as is and never overwrites a file silently."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from tunelab.cli.main import main
from tunelab.config.load import load_config

Cli = Callable[..., CompletedProcess]


def _init(*args: str) -> int:
    try:
        main(["init", *args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_init_writes_a_valid_commented_config(tmp_path: Path) -> None:
    out, data = tmp_path / "run.yaml", tmp_path / "data"
    data.mkdir()
    args = ("--yes", "--model", "org/model", "--data", str(data), "--method", "dora", "--steps", "50", "-o", str(out))
    assert _init(*args) == 0
    text = out.read_text(encoding="utf-8")
    assert "# lora | dora | qlora | full | freeze | prefix | ia3" in text  # every method, commented to edit
    cfg = load_config(out)
    assert (cfg.model.path, cfg.data.train, cfg.method.name, cfg.train.steps) == ("org/model", str(data), "dora", 50)


def test_init_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run.yaml"
    out.write_text("mine", encoding="utf-8")
    assert _init("--yes", "--model", "m", "--data", "d", "-o", str(out)) == 2
    assert out.read_text(encoding="utf-8") == "mine"
    assert "already exists" in capsys.readouterr().err


def test_init_without_answers_says_what_to_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _init("--yes", "-o", str(tmp_path / "x.yaml")) == 2
    assert "--model and --data" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model", "data", "named"),
    [
        ("./no-such-model", "DATA", "--model"),
        ("org/model", "no-such-dir/", "--data"),
        ("org/model", "x.jsonl", "--data"),
    ],
)
def test_init_refuses_paths_that_do_not_exist(cli: Cli, tmp_path: Path, model: str, data: str, named: str) -> None:
    """Through the real CLI: a typo is caught by init, not by the first train (issue 22 item 21)."""
    out = tmp_path / "run.yaml"
    data = str(tmp_path) if data == "DATA" else data
    result = cli("init", "--yes", "--model", model, "--data", data, "-o", out, cwd=tmp_path)
    assert result.returncode == 2 and f"{named}: " in result.stderr and "does not exist" in result.stderr
    assert not out.exists() and "Traceback" not in result.stderr
