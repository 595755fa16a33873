"""Record formats beyond the basics: ShareGPT, OpenAI-style tool calls, forced formats, dataset folders.

Masking of these formats is checked token by token in ``test_masking.py``;
here: what is accepted, what it becomes, and how mistakes are reported.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.config.schema import DataCfg
from tunelab.data.formats import detect_format, to_samples
from tunelab.data.sources import Record, read_records, resolve_files
from tunelab.errors import DataError

SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Sum two and two?"},
        {"from": "gpt", "value": "Four."},
    ]
}


def records(*items: dict) -> list[Record]:
    return [Record(item, "f.jsonl", index + 1) for index, item in enumerate(items)]


def test_sharegpt_is_detected_and_becomes_chat_messages() -> None:
    assert detect_format(records(SHAREGPT)[0]) == "sharegpt"
    (sample,) = to_samples(records(SHAREGPT), "auto")
    assert sample.kind == "chat"
    assert sample.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sum two and two?"},
        {"role": "assistant", "content": "Four."},
    )


def test_data_format_sharegpt_is_accepted_by_the_config() -> None:
    assert DataCfg(train="x.jsonl", format="sharegpt").format == "sharegpt"


def test_sharegpt_function_call_becomes_a_tool_call_with_object_arguments() -> None:
    record = {
        "conversations": [
            {"from": "human", "value": "Weather?"},
            {"from": "function_call", "value": '[{"name": "weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}]'},
            {"from": "observation", "value": "rain"},
            {"from": "gpt", "value": "Rain."},
        ]
    }
    (sample,) = to_samples(records(record), "sharegpt")
    assert [m["role"] for m in sample.messages] == ["user", "assistant", "tool", "assistant"]
    assert sample.messages[1]["tool_calls"] == [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    ]


@pytest.mark.parametrize(
    ("turn", "fragment"),
    [
        ({"from": "robot", "value": "hi"}, "conversations[1]: from 'robot' is not one of human, user, gpt"),
        ({"from": "human", "value": 3}, "conversations[1]: value must be a string"),
        (
            {"from": "function_call", "value": "not json"},
            'conversations[1]: a function_call value must be JSON {"name"',
        ),
        ("hello", "conversations[1] must be an object"),
    ],
)
def test_bad_sharegpt_turns_name_file_line_and_turn(turn: object, fragment: str) -> None:
    bad = {"conversations": [{"from": "human", "value": "Hi"}, turn, {"from": "gpt", "value": "Yes."}]}
    with pytest.raises(DataError) as info:
        to_samples(records(SHAREGPT, bad), "sharegpt")
    assert str(info.value).startswith("f.jsonl:2: ")
    assert fragment in str(info.value)


def test_sharegpt_without_an_answer_is_refused() -> None:
    with pytest.raises(DataError, match="no assistant message"):
        to_samples(records({"conversations": [{"from": "human", "value": "Hi"}]}), "sharegpt")


def test_tool_calls_are_normalised_and_tools_kept() -> None:
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    record = {
        "tools": tools,
        "messages": [
            {"role": "user", "content": "Add 2 and 2."},
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "add", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "4"},
            {"role": "assistant", "content": "4."},
        ],
    }
    (sample,) = to_samples(records(record), "chat")
    assert sample.tools == tuple(tools)
    assert sample.messages[1]["tool_calls"] == [{"type": "function", "function": {"name": "add", "arguments": {}}}]
    assert sample.messages[2] == {"role": "tool", "tool_call_id": "c1", "content": "4"}


@pytest.mark.parametrize(
    ("calls", "fragment"),
    [
        ([{"function": {"arguments": "{}"}}], "messages[1].tool_calls[0] must be"),
        ([{"function": {"name": "add", "arguments": "{oops"}}], "arguments are not valid JSON"),
        ([{"function": {"name": "add", "arguments": "[1, 2]"}}], "arguments must be a JSON object"),
        ({"function": {"name": "add"}}, "tool_calls must be a list"),
    ],
)
def test_bad_tool_calls_are_refused_with_their_line(calls: object, fragment: str) -> None:
    record = {
        "messages": [
            {"role": "user", "content": "Add."},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "assistant", "content": "Done."},
        ]
    }
    first = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]}
    with pytest.raises(DataError) as info:
        to_samples(records(first, record), "chat")
    assert str(info.value).startswith("f.jsonl:2: ") and fragment in str(info.value)


def test_tools_given_as_json_text_or_garbage() -> None:
    base = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]}
    (sample,) = to_samples(records({**base, "tools": '[{"name": "add"}]'}), "chat")
    assert sample.tools == ({"name": "add"},)
    with pytest.raises(DataError, match='"tools" must be a list'):
        to_samples(records({**base, "tools": {"name": "add"}}), "chat")


def test_forcing_a_format_checks_every_record_against_it() -> None:
    with pytest.raises(DataError) as info:
        to_samples(records(SHAREGPT, {"messages": [{"role": "assistant", "content": "x"}]}), "sharegpt")
    assert str(info.value).startswith("f.jsonl:2: ") and '"conversations" must be' in str(info.value)


# --------------------------------------------------------------------------- dataset folders (load_dataset, offline)


@pytest.fixture
def dataset_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A hub-style dataset repo on disk: two subsets (configs), each with its own splits, declared in the card."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    root = tmp_path / "repo"
    rows = {
        "en/train.jsonl": [{"q": "Hi", "a": "Hello."}, {"q": "Bye", "a": "Goodbye."}],
        "en/test.jsonl": [{"q": "Yes", "a": "No."}],
        "fr/train.jsonl": [{"q": "Salut", "a": "Bonjour."}],
    }
    for name, items in rows.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    configs = "\n".join(
        f"- config_name: {lang}\n  data_files:\n"
        + "".join(f"  - split: {split}\n    path: {lang}/{split}.jsonl\n" for split in splits)
        for lang, splits in (("en", ("train", "test")), ("fr", ("train",)))
    )
    (root / "README.md").write_text(f"---\nconfigs:\n{configs}---\n# A tiny dataset\n", encoding="utf-8")
    return root


def test_dataset_folder_loads_by_split_and_subset(dataset_folder: Path) -> None:
    train, valid = resolve_files(str(dataset_folder), None)
    assert train == str(dataset_folder) and valid is None
    columns = {"prompt": "q", "completion": "a"}
    fr = read_records(train, subset="fr", columns=columns)
    assert [r.data for r in fr] == [{"prompt": "Salut", "completion": "Bonjour."}]
    test = read_records(train, subset="en", split="test", columns=columns)
    assert [r.data for r in test] == [{"prompt": "Yes", "completion": "No."}] and test[0].line == 1
    assert detect_format(test[0]) == "completion"


@pytest.mark.parametrize(
    ("split", "subset", "fragment"),
    [("train", "de", "'de' not found"), ("validation", "en", 'Unknown split "validation"')],
)
def test_dataset_folder_with_a_wrong_split_or_subset(
    dataset_folder: Path, split: str, subset: str, fragment: str
) -> None:
    with pytest.raises(DataError) as info:
        read_records(str(dataset_folder), split=split, subset=subset)
    message = str(info.value)
    assert f"split {split!r}, subset {subset!r}" in message and fragment in message
    assert info.value.hint and "data.subset" in info.value.hint
