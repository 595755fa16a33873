"""`data preview` (library and CLI), the richer `data validate` report, and the mistakes users make with them."""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tunelab.data.formats import to_samples
from tunelab.data.preview import preview_dataset, token_texts
from tunelab.data.sources import Record
from tunelab.data.templates import BUILTIN_NAME, render, template_for
from tunelab.data.tokenize import tokenize_samples
from tunelab.data.validate import duplicates, length_histogram, validate_dataset
from tunelab.errors import ConfigError, DataError
from tunelab.vocab import IGNORE

CHAT = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is two and two?"},
        {"role": "assistant", "content": "Four, the answer is four."},
        {"role": "user", "content": "And the weather today?"},
        {"role": "assistant", "content": "Sunny in the café today!"},
    ]
}
SHORT = {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."}]}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def run_main(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str]]:
    """The CLI entry point in this process: (exit code, stdout + stderr + any traceback)."""
    from tunelab.cli.main import main

    def invoke(*argv: str | Path) -> tuple[int, str]:
        capsys.readouterr()
        crash, code = "", 0
        try:
            main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception:
            code, crash = 1, traceback.format_exc()
        out = capsys.readouterr()
        return code, out.out + out.err + crash

    return invoke


# --------------------------------------------------------------------------- preview, the library


@pytest.mark.parametrize("train_on", ["last_assistant", "all_assistant", "everything"])
def test_preview_shows_the_tokens_and_labels_training_uses(
    tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer: Any, train_on: str
) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [CHAT, SHORT, SHORT])
    result = preview_dataset(str(path), model=str(tiny_model_dir), n=2, train_on=train_on)
    assert result.format == "chat" and result.chat_template == "tokenizer" and len(result.examples) == 2

    template = template_for(tiny_tokenizer)[0]
    samples = to_samples([Record(CHAT, str(path), 1), Record(SHORT, str(path), 2)], "chat")
    trained = tokenize_samples(
        samples, tiny_tokenizer, template=template, max_seq_len=1024, mask_prompt=True, train_on=train_on
    )
    for example, sample, ids, labels in zip(result.examples, samples, trained.input_ids, trained.labels, strict=True):
        assert [token_id for _, token_id, _ in example.tokens] == ids.tolist()
        # Trained = carries a label the loss uses (the first position never does).
        assert [flag for _, _, flag in example.tokens] == [i > 0 and lab != IGNORE for i, lab in enumerate(labels)]
        # The token texts, put back together, are the rendered conversation the model reads.
        assert "".join(text for text, _, _ in example.tokens) == render(
            tiny_tokenizer, template, sample.messages, generation_prompt=False
        )
        assert example.total == len(ids) and example.trained == int((labels[1:] != IGNORE).sum())
        assert not example.truncated and not example.dropped
    assert result.examples[0].line == 1 and result.examples[1].line == 2
    json.dumps(result.to_dict())  # the --json output and the API payload


def test_preview_marks_truncation_and_examples_left_with_nothing_to_train(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [CHAT])
    full = preview_dataset(str(path), model=str(tiny_model_dir), n=1).examples[0]
    first_trained = next(i for i, (_, _, trained) in enumerate(full.tokens) if trained)
    cut = preview_dataset(str(path), model=str(tiny_model_dir), n=1, max_seq_len=first_trained + 3).examples[0]
    assert cut.truncated and cut.full_length == full.total and cut.total == first_trained + 3
    assert cut.tokens == full.tokens[: first_trained + 3] and cut.trained == 3
    gone = preview_dataset(str(path), model=str(tiny_model_dir), n=1, max_seq_len=first_trained).examples[0]
    assert gone.dropped and gone.trained == 0 and gone.total == first_trained


def test_preview_switches_to_builtin_chatml_like_training_when_tools_cant_render(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    call = {"function": {"name": "sum", "arguments": {"a": 2}}}
    tool_chat = {
        "messages": [
            {"role": "user", "content": "Sum?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "2"},
            {"role": "assistant", "content": "Two."},
        ]
    }
    path = write_jsonl(tmp_path / "train.jsonl", [tool_chat, SHORT])
    preview = preview_dataset(str(path), model=str(tiny_model_dir), n=2)
    with_tools, plain = preview.examples
    assert "built-in ChatML" in preview.note and preview.chat_template == BUILTIN_NAME
    assert "".join(t for t, _, _ in plain.tokens).startswith("<|im_start|>")
    text = "".join(t for t, _, _ in with_tools.tokens)
    assert '<tool_call>{"name": "sum", "arguments": {"a": 2}}</tool_call>' in text


def test_token_texts_keep_characters_split_across_byte_tokens_whole(tiny_tokenizer: Any) -> None:
    text = "Café, naïve – 東京 ok"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    texts = token_texts(tiny_tokenizer, ids)
    assert len(texts) == len(ids) and "".join(texts) == text
    assert "\ufffd" not in "".join(texts)


def test_preview_reads_only_the_first_examples_and_applies_columns(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = [{"q": "Hi: ", "a": "the cat."}] * 2 + ["not an object"]  # the bad third line is never reached
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = preview_dataset(str(path), model=str(tiny_model_dir), n=2, columns={"prompt": "q", "completion": "a"})
    assert result.format == "completion" and len(result.examples) == 2


# --------------------------------------------------------------------------- validate: lengths, duplicates


def test_length_histogram_uses_fixed_power_of_two_bins() -> None:
    bins = length_histogram(np.array([3, 16, 17, 40, 100, 101, 500]), 100)
    assert [(b["low"], b["high"]) for b in bins] == [(1, 16), (17, 32), (33, 64), (65, 100), (101, None)]
    assert [b["count"] for b in bins] == [2, 1, 1, 1, 2]


def test_duplicates_are_found_whatever_the_key_order() -> None:
    rows = [{"prompt": "a", "completion": "b"}, {"completion": "b", "prompt": "a"}, {"prompt": "a", "completion": "c"}]
    rows += [{"prompt": "a", "completion": "b"}]
    report = duplicates([Record(r, "f", i + 2) for i, r in enumerate(rows)])
    assert report == {"count": 2, "first": [{"line": 3, "same_as": 2}, {"line": 5, "same_as": 2}]}


def test_validate_reports_histogram_truncation_and_duplicates(tmp_path: Path, tiny_model_dir: Path) -> None:
    long = {"prompt": "Hi: ", "completion": "the cat sat on the mat " * 12}
    short = {"prompt": "Hi: ", "completion": "the dog."}
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [short, long, short, {"prompt": "Yo: ", "completion": "a bird."}, short])
    write_jsonl(folder / "valid.jsonl", [short, {"prompt": "Yo: ", "completion": "a fish."}])
    report = validate_dataset(str(folder), model=str(tiny_model_dir), max_seq_len=32)
    train, valid = report["splits"]["train"], report["splits"]["valid"]
    assert train["duplicates"] == {"count": 2, "first": [{"line": 3, "same_as": 1}, {"line": 5, "same_as": 1}]}
    assert valid["duplicates"]["count"] == 0 and valid["duplicates"]["also_in_train"] == 1
    assert train["tokens"]["truncated"] == 1 and train["tokens"]["max"] == 32
    histogram = train["histogram"]
    assert sum(b["count"] for b in histogram) == 5 and histogram[-1] == {"low": 33, "high": None, "count": 1}
    json.dumps(report)


def test_validate_reads_in_chunks_with_the_same_report(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tunelab.data import validate

    rows = [{"prompt": "Hi: ", "completion": f"the {word}."} for word in ("cat", "dog", "cat", "bird", "dog", "cat")]
    rows.append({"prompt": "Hi: ", "completion": "the cat sat " * 20})
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "valid.jsonl", [*rows[1:3], {"prompt": "Yo: ", "completion": "a fish."}])
    whole = validate_dataset(str(folder), model=str(tiny_model_dir), max_seq_len=24)
    monkeypatch.setattr(validate, "CHUNK", 2)  # duplicates and lengths must add up across chunk boundaries
    assert validate_dataset(str(folder), model=str(tiny_model_dir), max_seq_len=24) == whole
    assert whole["splits"]["train"]["duplicates"]["count"] == 3
    assert whole["splits"]["valid"]["duplicates"]["also_in_train"] == 2


# --------------------------------------------------------------------------- CLI


def test_preview_cli_prints_each_example_with_its_counts(
    run_main: Callable[..., tuple[int, str]], tmp_path: Path, tiny_model_dir: Path
) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [CHAT, SHORT, SHORT])
    rc, out = run_main("data", "preview", path, "--model", tiny_model_dir, "--n", "2", "--train-on", "last_assistant")
    assert rc == 0, out
    assert "example 1" in out and "example 2" in out and "example 3" not in out
    expected = preview_dataset(str(path), model=str(tiny_model_dir), n=2, train_on="last_assistant")
    for example in expected.examples:
        assert f"{example.total} tokens, {example.trained} trained, not truncated" in out
    assert "Sunny in the café today!" in out  # token texts are shown as text, not as byte symbols
    rc, out = run_main("data", "preview", path, "--model", tiny_model_dir, "--n", "1", "--json")
    assert rc == 0 and json.loads(out)["examples"][0]["tokens"][0][1] == expected.examples[0].tokens[0][1]


def test_validate_cli_prints_the_histogram_and_duplicates(
    run_main: Callable[..., tuple[int, str]], tmp_path: Path, tiny_model_dir: Path
) -> None:
    short = {"prompt": "Hi: ", "completion": "the dog."}
    path = write_jsonl(tmp_path / "train.jsonl", [short, {"prompt": "Hi: ", "completion": "the cat " * 30}, short])
    rc, out = run_main("data", "validate", path, "--model", tiny_model_dir, "--max-seq-len", "32")
    assert rc == 0, out
    assert "tokens per example" in out and ">32" in out and "█" in out
    assert "1 example(s) exceed 32 tokens" in out and "1 exact duplicate(s) (line 3 = line 1)" in out
    rc, out = run_main("data", "validate", path, "--json", "-c", "completion=completion")
    assert rc == 0 and json.loads(out)["splits"]["train"]["duplicates"]["count"] == 1


def test_sharegpt_unknown_role_through_the_real_command(cli: Callable[..., Any], tmp_path: Path) -> None:
    bad = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yes."}]}
    path = write_jsonl(tmp_path / "train.jsonl", [{"conversations": [{"from": "gpt", "value": "ok"}]}, bad])
    proc = cli("data", "validate", path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == DataError.exit_code and "Traceback" not in output
    assert f"{path}:2: conversations[1]: from 'bot' is not one of" in output


@pytest.mark.parametrize(
    ("args", "error", "fragments"),
    [
        (["--column", "prompt=query"], DataError, [":1: data.columns.prompt", "'query'", "'answer', 'question'"]),
        (["--column", "prompt"], ConfigError, ["--column takes tunelab_field=your_field"]),
        (["--train-on", "assistant"], ConfigError, ["--train-on must be one of last_assistant"]),
        (["--format", "alpaca"], ConfigError, ["--format must be one of", "sharegpt"]),
    ],
)
@pytest.mark.parametrize("command", ["validate", "preview"])
def test_cli_mistakes_are_clear_and_traceback_free(
    run_main: Callable[..., tuple[int, str]],
    tmp_path: Path,
    tokenizer_only_model_dir: Path,
    command: str,
    args: list[str],
    error: type[Exception],
    fragments: list[str],
) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "Hi", "answer": "Yo."}])
    model = ["--model", str(tokenizer_only_model_dir)] if command == "preview" else []
    rc, out = run_main("data", command, path, *model, *args)
    assert "Traceback" not in out and rc == error.exit_code, out  # type: ignore[attr-defined]
    assert "error:" in out and all(fragment in out for fragment in fragments), out
