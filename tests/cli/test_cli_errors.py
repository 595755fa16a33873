"""Every user mistake reaches the terminal as one clear message, a specific exit code and no traceback.

The important paths go through the real command in a subprocess (``cli``); the
remaining combinations call ``tunelab.cli.main.main(argv)`` in-process, which
is the same code minus the interpreter start-up.  Train commands point
``model.path`` at a checkpoint folder *without weights*, so they can only pass
if the input is refused before the model is loaded.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from tunelab.errors import (
    BackendError,
    ConfigError,
    DataError,
    ModelError,
    NotFoundError,
    StateError,
    TunelabError,
)

Cli = Callable[..., CompletedProcess]

CHAT_OK = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
COMPLETION_OK = {"prompt": "Hi: ", "completion": "there."}


@dataclass(frozen=True)
class BadInput:
    """A dataset file with one problem: where it is and what the message must say."""

    path: Path
    line: int | None
    fragment: str
    fmt: str = "auto"

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}: " if self.line is not None else f"{self.path}: "


def _jsonl(*records: object) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


# name -> (file name, content, line, message fragment, data.format)
_BAD: dict[str, tuple[str, bytes, int | None, str, str]] = {
    "malformed_json": (
        "train.jsonl",
        _jsonl(COMPLETION_OK, COMPLETION_OK) + b'{"prompt": "a", "completion": "b",}\n',
        3,
        "not valid JSON",
        "auto",
    ),
    "missing_field": (
        "train.jsonl",
        _jsonl(COMPLETION_OK, {"prompt": "only"}),
        2,
        'missing field "completion"',
        "auto",
    ),
    "wrong_role": (
        "train.jsonl",
        _jsonl(CHAT_OK, {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        2,
        "'robot'",
        "auto",
    ),
    "not_utf8": (
        "train.jsonl",
        _jsonl(COMPLETION_OK, COMPLETION_OK, COMPLETION_OK) + b'{"prompt": "caf\xe9", "completion": "x"}\n',
        4,
        "not UTF-8",
        "auto",
    ),
    "empty_file": ("train.jsonl", b"", None, "empty", "auto"),
    "no_assistant_turn": (
        "train.jsonl",
        _jsonl(CHAT_OK, CHAT_OK, {"messages": [{"role": "user", "content": "Anyone?"}]}),
        3,
        "no assistant message",
        "auto",
    ),
    "csv_missing_column": ("train.csv", b"prompt,answer\nHi,there\n", 2, 'missing field "completion"', "completion"),
}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BadInput]:
    root = tmp_path_factory.mktemp("bad_inputs")
    out = {}
    for name, (file_name, content, line, fragment, fmt) in _BAD.items():
        path = root / name / file_name
        path.parent.mkdir()
        path.write_bytes(content)
        out[name] = BadInput(path, line, fragment, fmt)
    return out


def write_config(folder: Path, model: Path | str, data: Path | str, fmt: str = "auto", **extra: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "model:",
        f"  path: {json.dumps(str(model))}",
        "data:",
        f"  train: {json.dumps(str(data))}",
        f"  format: {fmt}",
        "train:",
        "  steps: 2",
        "  batch_size: 1",
        "device: cpu",
        f"output_dir: {json.dumps(str(folder / 'out'))}",
        *(f"{key}: {value}" for key, value in extra.items()),
    ]
    path = folder / "cfg.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def assert_clean_failure(rc: int, output: str, error: type[TunelabError], *fragments: str) -> None:
    """Exit code of ``error``, an ``error:`` line holding every fragment, and no traceback."""
    assert "Traceback" not in output, output
    assert rc == error.exit_code, output
    assert "error:" in output, output
    for fragment in fragments:
        assert fragment in output, output


def proc_output(proc: CompletedProcess) -> str:
    return proc.stdout + proc.stderr


@pytest.fixture
def run_main(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[int, str]]:
    """Call the CLI entry point in this process; return (exit code, stdout+stderr, with any traceback)."""
    from tunelab.cli.main import main

    for var in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "TOKENIZERS_PARALLELISM"):
        monkeypatch.setenv(var, "error" if var == "TRANSFORMERS_VERBOSITY" else "1")  # main() setdefault()s these

    def invoke(*argv: str | Path) -> tuple[int, str]:
        capsys.readouterr()
        crash = ""
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception:
            code, crash = 1, traceback.format_exc()
        captured = capsys.readouterr()
        return code, captured.out + captured.err + crash

    return invoke


def test_exit_codes_are_the_documented_contract() -> None:
    codes = {cls.__name__: cls.exit_code for cls in (ConfigError, DataError, ModelError, BackendError)}
    codes |= {cls.__name__: cls.exit_code for cls in (NotFoundError, StateError)}
    assert codes == {
        "ConfigError": 2,
        "DataError": 3,
        "ModelError": 4,
        "BackendError": 5,
        "NotFoundError": 6,
        "StateError": 7,
    }


# --------------------------------------------------------------------------- bad data


@pytest.mark.parametrize("kind", list(_BAD))
def test_data_validate_names_file_and_line(cli: Cli, bad_inputs: dict[str, BadInput], kind: str) -> None:
    bad = bad_inputs[kind]
    proc = cli("data", "validate", bad.path, *(["--format", bad.fmt] if bad.fmt != "auto" else []))
    assert_clean_failure(proc.returncode, proc_output(proc), DataError, bad.where, bad.fragment)
    assert "ok" not in proc.stdout


@pytest.mark.parametrize("kind", list(_BAD))
def test_train_refuses_bad_data_before_loading_the_model(
    run_main: Callable[..., tuple[int, str]],
    bad_inputs: dict[str, BadInput],
    tokenizer_only_model_dir: Path,
    tmp_path: Path,
    kind: str,
) -> None:
    from tunelab import services

    bad = bad_inputs[kind]
    cfg = write_config(tmp_path, tokenizer_only_model_dir, bad.path, bad.fmt)
    rc, output = run_main("train", cfg)
    assert_clean_failure(rc, output, DataError, bad.where, bad.fragment)
    # The run is on record as failed, with the same reason the user saw.
    (run,) = services.list_runs()
    assert run["status"] == "failed" and bad.where in run["error"]
    assert not (tmp_path / "out" / "adapter").exists()


@pytest.mark.parametrize("kind", ["malformed_json", "not_utf8"])
def test_train_subprocess_refuses_bad_data(
    cli: Cli, bad_inputs: dict[str, BadInput], tokenizer_only_model_dir: Path, tmp_path: Path, kind: str
) -> None:
    bad = bad_inputs[kind]
    proc = cli("train", write_config(tmp_path, tokenizer_only_model_dir, bad.path, bad.fmt))
    assert_clean_failure(proc.returncode, proc_output(proc), DataError, bad.where, bad.fragment)


@pytest.mark.parametrize(
    ("folder", "record", "fragment"),
    [
        ("data[v2]", {"prompt": "only"}, 'missing field "completion"'),
        ("data", {"messages": [{"role": "[/bold]", "content": "x"}]}, "role '[/bold]' is not one of"),
    ],
    ids=["bracket-in-path", "closing-tag-in-value"],
)
def test_messages_are_printed_verbatim(
    run_main: Callable[..., tuple[int, str]], tmp_path: Path, folder: str, record: dict, fragment: str
) -> None:
    path = tmp_path / folder / "train.jsonl"
    path.parent.mkdir()
    path.write_bytes(_jsonl(CHAT_OK if "messages" in record else COMPLETION_OK, record))
    rc, output = run_main("data", "validate", path)
    assert_clean_failure(rc, output, DataError, f"{path}:2: ", fragment)


# --------------------------------------------------------------------------- config, model and data paths


def test_config_errors_name_the_key_with_a_suggestion_and_the_range(
    cli: Cli, tokenizer_only_model_dir: Path, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, tokenizer_only_model_dir, tmp_path / "train.jsonl")
    proc = cli("train", cfg, "train.lrr=1e-4", "data.max_seq_len=2")
    assert_clean_failure(
        proc.returncode,
        proc_output(proc),
        ConfigError,
        "train.lrr: unknown key; did you mean train.lr?",
        "data.max_seq_len: must be >= 8 and <= 1048576 (got 2)",
    )


def test_bad_value_in_yaml_names_allowed_values(
    run_main: Callable[..., tuple[int, str]], tokenizer_only_model_dir: Path, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, tokenizer_only_model_dir, tmp_path / "train.jsonl")
    cfg.write_text(cfg.read_text().replace("steps: 2", "steps: 2\n  lr: -1") + "method:\n  name: lorra\n")
    rc, output = run_main("train", cfg)
    assert_clean_failure(rc, output, ConfigError, "train.lr: must be > 0 and <= 10.0 (got -1)", "method.name:")
    assert "lora, dora, qlora, full, freeze, prefix or ia3" in output


def test_missing_config_file(cli: Cli, tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    proc = cli("train", missing)
    assert_clean_failure(proc.returncode, proc_output(proc), ConfigError, str(missing), "does not exist")


def test_nonexistent_model_path(cli: Cli, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_bytes(_jsonl(COMPLETION_OK))
    missing_model = tmp_path / "no-such-model"
    proc = cli("train", write_config(tmp_path, missing_model, data))
    assert_clean_failure(proc.returncode, proc_output(proc), ModelError, "model.path", str(missing_model))


def test_nonexistent_data_path(
    run_main: Callable[..., tuple[int, str]], tokenizer_only_model_dir: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere" / "train.jsonl"
    rc, output = run_main("train", write_config(tmp_path, tokenizer_only_model_dir, missing))
    assert_clean_failure(rc, output, DataError, "data.train", str(missing), "does not exist")


def test_train_needs_a_config_or_resume(run_main: Callable[..., tuple[int, str]], tmp_path: Path) -> None:
    rc, output = run_main("train")
    assert_clean_failure(rc, output, ConfigError, "--resume")
    rc, output = run_main("train", tmp_path / "cfg.yaml", "--resume", "abc123")
    assert_clean_failure(rc, output, ConfigError, "--resume")


def test_data_validate_refuses_an_unknown_format(run_main: Callable[..., tuple[int, str]], tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(_jsonl(COMPLETION_OK))
    rc, output = run_main("data", "validate", path, "--format", "jsonl")
    assert_clean_failure(rc, output, ConfigError, "--format", "jsonl", "completion")


# --------------------------------------------------------------------------- runs


def test_runs_show_unknown_id(cli: Cli) -> None:
    proc = cli("runs", "show", "nosuchid")
    assert_clean_failure(proc.returncode, proc_output(proc), NotFoundError, "nosuchid", "tunelab runs list")


def test_resume_unknown_id(cli: Cli) -> None:
    proc = cli("train", "--resume", "nosuchid")
    assert_clean_failure(proc.returncode, proc_output(proc), NotFoundError, "nosuchid")


# --------------------------------------------------------------------------- usage mistakes


@pytest.mark.parametrize(
    "argv",
    [("data", "validate"), ("data", "validate", "x.jsonl", "--bogus"), ("nosuchcommand",)],
    ids=["missing-argument", "unknown-option", "unknown-command"],
)
def test_usage_mistakes_get_a_usage_message(run_main: Callable[..., tuple[int, str]], argv: tuple[str, ...]) -> None:
    rc, output = run_main(*argv)
    assert "Traceback" not in output, output
    assert rc == 2 and "Usage" in output


def test_version_flag(run_main: Callable[..., tuple[int, str]]) -> None:
    from tunelab import __version__

    rc, output = run_main("--version")
    assert rc == 0 and output.strip() == __version__
