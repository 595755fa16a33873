"""Data: reading files, detecting and validating formats, templates, tokenization and masking.

Masking is checked by decoding what carries a label: the strings that come back
must be exactly what the model should learn to write.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tunelab.config.schema import DataCfg
from tunelab.data.formats import Sample, detect_format, to_samples
from tunelab.data.prepare import load_records, prepare_data
from tunelab.data.sources import Record, iter_records, read_records, resolve_files
from tunelab.data.templates import BUILTIN_NAME, CHATML, TOKENIZER_NAME, render, template_for
from tunelab.data.tokenize import tokenize_samples
from tunelab.data.validate import validate_dataset
from tunelab.errors import DataError
from tunelab.vocab import IGNORE

END = "<|im_end|>"

CHAT = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is two and two?"},
        {"role": "assistant", "content": "Four, the answer is four."},
        {"role": "user", "content": "And the weather today?"},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny in the city today!"},
    ]
}
ASSISTANT_TURNS = ["Four, the answer is four.", "Sunny in the city today!"]
COMPLETION = {"prompt": "Tell me a red tree: ", "completion": "the big red tree sat near the river."}
TEXT = {"text": "The quiet cat reads the data slowly."}
INSTRUCTION = {"instruction": "Name a bird.", "input": "Be short.", "output": "The blue bird."}


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def labelled_spans(tokenizer: Any, ids: np.ndarray, labels: np.ndarray) -> list[str]:
    """Decode every maximal run of labelled tokens (labels must equal the ids they sit on)."""
    spans: list[list[int]] = []
    previous = False
    for token, label in zip(ids.tolist(), labels.tolist(), strict=True):
        labelled = label != IGNORE
        if labelled:
            assert label == token, "a label differs from the token at its position"
            if not previous:
                spans.append([])
            spans[-1].append(token)
        previous = labelled
    return [tokenizer.decode(span) for span in spans]


def tokenize_one(tokenizer: Any, sample: Sample, *, mask_prompt: bool = True, max_seq_len: int = 512) -> tuple:
    template, _ = template_for(tokenizer)
    split = tokenize_samples([sample], tokenizer, template=template, max_seq_len=max_seq_len, mask_prompt=mask_prompt)
    assert len(split) == 1
    return split.input_ids[0], split.labels[0]


def chat_sample(record: dict = CHAT) -> Sample:
    return to_samples([Record(record, "<test>", 1)], "chat")[0]


# --------------------------------------------------------------------------- tokenizer forms


@pytest.fixture(scope="module")
def tokenizer_forms(
    tiny_tokenizer: Any, tiny_corpus: list[str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The same chat tokenizer in its three on-disk forms, each loaded through tunelab.hub."""
    from tunelab.hub import load_tokenizer
    from tunelab.tiny import train_sentencepiece_tokenizer, write_tiktoken_tokenizer

    root = tmp_path_factory.mktemp("tokenizer_forms")
    return {
        "bpe": tiny_tokenizer,
        "sentencepiece": load_tokenizer(train_sentencepiece_tokenizer(tiny_corpus, root / "sp", vocab_size=400)),
        "tiktoken": load_tokenizer(write_tiktoken_tokenizer(tiny_corpus, root / "tt", vocab_size=400)),
    }


FORMS = ["bpe", "sentencepiece", "tiktoken"]


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("record", "expected"),
    [(TEXT, "text"), (COMPLETION, "completion"), (INSTRUCTION, "instruction"), (CHAT, "chat")],
)
def test_format_is_detected_from_the_keys(tmp_path: Path, record: dict, expected: str) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [record, record])
    loaded = load_records(DataCfg(train=str(path)))
    assert loaded.format == expected
    assert len(loaded.train) == 2 and loaded.valid is None


def test_undetectable_format_names_file_line_and_keys(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as info:
        load_records(DataCfg(train=str(path)))
    assert f"{path}:1:" in str(info.value)
    assert "answer" in str(info.value) and "question" in str(info.value)
    assert info.value.hint and "data.format" in info.value.hint


def test_instruction_becomes_a_user_assistant_chat() -> None:
    with_input, without_input = to_samples(
        [Record(INSTRUCTION, "f", 1), Record({"instruction": "Name a bird.", "input": "", "output": "Owl."}, "f", 2)],
        "instruction",
    )
    assert with_input.kind == "chat"
    assert with_input.messages == (
        {"role": "user", "content": "Name a bird.\n\nBe short."},
        {"role": "assistant", "content": "The blue bird."},
    )
    assert without_input.messages[0] == {"role": "user", "content": "Name a bird."}


def test_every_record_is_validated_not_just_the_first(tmp_path: Path) -> None:
    records = [COMPLETION] * 4 + [{"prompt": "p", "completion": 5}]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    with pytest.raises(DataError) as info:
        load_records(DataCfg(train=str(path)))
    assert info.value.path == str(path) and info.value.line == 5
    assert '"completion" must be a string' in str(info.value)


def test_valid_split_is_validated_with_the_train_format(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [CHAT])
    valid = write_jsonl(tmp_path / "valid.jsonl", [CHAT, COMPLETION])
    with pytest.raises(DataError) as info:
        load_records(DataCfg(train=str(train), valid=str(valid)))
    assert info.value.path == str(valid) and info.value.line == 2
    assert "messages" in str(info.value)


@pytest.mark.parametrize(
    ("record", "fragment"),
    [
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "'robot'"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, "must be a string"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant message"),
        ({"messages": ["hello"]}, "messages[0]"),
    ],
)
def test_bad_chat_records_are_refused_with_their_line(record: dict, fragment: str) -> None:
    with pytest.raises(DataError) as info:
        to_samples([Record(CHAT, "f.jsonl", 1), Record(record, "f.jsonl", 2)], "chat")
    assert str(info.value).startswith("f.jsonl:2: ")
    assert fragment in str(info.value)


def test_system_tool_and_tool_call_messages_are_accepted() -> None:
    record = {
        "messages": [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Sum two and two."},
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "sum", "arguments": "{}"}}]},
            {"role": "tool", "content": "4"},
            {"role": "assistant", "content": "Four."},
        ]
    }
    sample = chat_sample(record)
    assert [m["role"] for m in sample.messages] == ["system", "user", "assistant", "tool", "assistant"]


# --------------------------------------------------------------------------- masking


@pytest.mark.parametrize("form", FORMS)
def test_chat_labels_only_the_assistant_turns(tokenizer_forms: dict[str, Any], form: str) -> None:
    tok = tokenizer_forms[form]
    ids, labels = tokenize_one(tok, chat_sample())
    spans = labelled_spans(tok, ids, labels)
    # One labelled run per assistant turn: its content and the end-of-turn marker, nothing else.
    # (The newline the template writes after <|im_end|> is checked strictly below.)
    assert [span.removesuffix("\n") for span in spans] == [turn + END for turn in ASSISTANT_TURNS]
    # Nothing of the system, user or tool turns, nor the assistant header, is trained.
    trained_text = "".join(spans)
    for hidden in ("helpful", "two and two", "weather", "sunny", "<|im_start|>", "assistant\n"):
        assert hidden not in trained_text
    assert (labels != IGNORE).sum() < len(ids) / 2


TOOL_CHAT = {
    "tools": [{"type": "function", "function": {"name": "sum"}}],
    "messages": [
        {"role": "user", "content": "What is two and two?"},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "sum", "arguments": '{"a": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "4"},
        {"role": "assistant", "content": "Four, the answer is four."},
    ],
}
CALL_TEXT = '<tool_call>{"name": "sum", "arguments": {"a": 2}}</tool_call>'


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    ("train_on", "expected"),
    [
        ("all_assistant", [CALL_TEXT + END, "Four, the answer is four." + END]),
        ("last_assistant", ["Four, the answer is four." + END]),
    ],
)
def test_tool_call_turns_are_trained_with_every_tokenizer_form(
    tokenizer_forms: dict[str, Any], form: str, train_on: str, expected: list[str]
) -> None:
    tok = tokenizer_forms[form]
    sample = chat_sample(TOOL_CHAT)
    # The tiny tokenizers' ChatML can't render tools, so prepare_data tokenizes such a dataset with the built-in one.
    template = CHATML
    split = tokenize_samples([sample], tok, template=template, max_seq_len=512, mask_prompt=True, train_on=train_on)
    spans = labelled_spans(tok, split.input_ids[0], split.labels[0])
    assert [span.removesuffix("\n") for span in spans] == expected
    assert "sum" not in "".join(spans[1:]) and "4<" not in "".join(spans)  # the tool result is never trained


def test_chat_labels_are_exactly_content_and_end_of_turn(tiny_tokenizer: Any) -> None:
    ids, labels = tokenize_one(tiny_tokenizer, chat_sample())
    assert labelled_spans(tiny_tokenizer, ids, labels) == [turn + END for turn in ASSISTANT_TURNS]


@pytest.mark.parametrize(
    "form",
    [
        "bpe",
        "tiktoken",
        pytest.param(
            "sentencepiece",
        ),
    ],
)
def test_chat_tokens_decode_to_the_rendered_conversation(tokenizer_forms: dict[str, Any], form: str) -> None:
    tok = tokenizer_forms[form]
    sample = chat_sample()
    ids, _ = tokenize_one(tok, sample)
    rendered = render(tok, template_for(tok)[0], sample.messages, generation_prompt=False)
    assert tok.decode(ids.tolist()) == rendered


@pytest.mark.parametrize("form", FORMS)
def test_completion_tokens_and_labels(tokenizer_forms: dict[str, Any], form: str) -> None:
    tok = tokenizer_forms[form]
    sample = Sample("completion", prompt=COMPLETION["prompt"], completion=COMPLETION["completion"])
    ids, labels = tokenize_one(tok, sample)
    prompt_ids = tok(COMPLETION["prompt"])["input_ids"]  # with the tokenizer's own specials (e.g. BOS)
    completion_ids = tok(COMPLETION["completion"], add_special_tokens=False)["input_ids"]
    assert ids.tolist() == [*prompt_ids, *completion_ids, tok.eos_token_id]
    assert labels.tolist() == [IGNORE] * len(prompt_ids) + [*completion_ids, tok.eos_token_id]
    assert labelled_spans(tok, ids, labels) == [tok.decode([*completion_ids, tok.eos_token_id])]


def test_completion_with_empty_prompt_trains_everything(tiny_tokenizer: Any) -> None:
    ids, labels = tokenize_one(tiny_tokenizer, Sample("completion", prompt="", completion="The cat."))
    assert labels.tolist() == ids.tolist() and ids[-1] == tiny_tokenizer.eos_token_id


def test_text_is_fully_labelled_and_ends_with_eos(tokenizer_forms: dict[str, Any]) -> None:
    for tok in tokenizer_forms.values():
        ids, labels = tokenize_one(tok, Sample("text", text=TEXT["text"]))
        body = tok(TEXT["text"], add_special_tokens=False)["input_ids"]
        assert ids.tolist()[-len(body) - 1 :] == [*body, tok.eos_token_id]
        start = len(ids) - len(body) - 1  # a BOS the tokenizer adds itself carries no label
        assert labels.tolist() == [IGNORE] * start + ids.tolist()[start:]


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_mask_prompt_false_labels_everything(tiny_tokenizer: Any, kind: str) -> None:
    sample = chat_sample() if kind == "chat" else Sample("completion", **COMPLETION)
    masked_ids, masked = tokenize_one(tiny_tokenizer, sample, mask_prompt=True)
    ids, labels = tokenize_one(tiny_tokenizer, sample, mask_prompt=False)
    assert ids.tolist() == masked_ids.tolist()  # masking never changes the tokens
    assert labels.tolist() == ids.tolist()
    assert (masked == IGNORE).any()


def test_mask_prompt_false_works_with_any_chat_template(tiny_tokenizer: Any) -> None:
    # The generation prompt (<|assistant|>) differs from the assistant header (<|bot|>).
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}<|bot|>{% else %}<|{{ m['role'] }}|>{% endif %}"
        "{{ m['content'] }}<|im_end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    sample = chat_sample({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]})
    with pytest.raises(DataError, match="mask_prompt=false"):
        tokenize_samples([sample], tiny_tokenizer, template=template, max_seq_len=64, mask_prompt=True)
    split = tokenize_samples([sample], tiny_tokenizer, template=template, max_seq_len=64, mask_prompt=False)
    assert split.labels[0].tolist() == split.input_ids[0].tolist()


def test_truncation_and_dropping(tiny_tokenizer: Any) -> None:
    long_prompt = "the cat sat on the mat " * 20
    samples = [
        Sample("completion", prompt="Hi: ", completion="the dog ran " * 20),  # completion cut short
        Sample("completion", prompt=long_prompt, completion="yes."),  # prompt fills the window: dropped
        Sample("completion", prompt="Hi: ", completion="no."),  # fits
    ]
    template, _ = template_for(tiny_tokenizer)
    split = tokenize_samples(samples, tiny_tokenizer, template=template, max_seq_len=16, mask_prompt=True)
    assert len(split) == 2 and split.dropped == 1 and split.truncated == 2
    assert split.lengths.tolist()[0] == 16 and split.lengths.max() <= 16
    assert split.labels[0][-1] != IGNORE  # the cut completion still trains on what is left
    assert split.labels[1][-1] == tiny_tokenizer.eos_token_id
    assert split.supervised_tokens > 0


def test_prepare_refuses_data_with_nothing_left_to_train(tmp_path: Path, tiny_tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "the cat sat on the mat " * 10, "completion": "yes."}])
    with pytest.raises(DataError) as info:
        prepare_data(DataCfg(train=str(path), max_seq_len=8), tiny_tokenizer)
    assert str(path) in str(info.value) and "max_seq_len" in (info.value.hint or "")


# --------------------------------------------------------------------------- templates


def test_builtin_chatml_is_used_and_recorded_without_a_tokenizer_template(
    tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer: Any
) -> None:
    from tunelab.hub import load_tokenizer

    bare = load_tokenizer(tiny_model_dir)  # a fresh copy: the session tokenizer stays untouched
    bare.chat_template = None
    assert template_for(bare) == (CHATML, BUILTIN_NAME)
    assert template_for(tiny_tokenizer)[1] == TOKENIZER_NAME

    path = write_jsonl(tmp_path / "train.jsonl", [CHAT] * 3)
    cfg = DataCfg(train=str(path))
    own, builtin = prepare_data(cfg, tiny_tokenizer), prepare_data(cfg, bare)
    assert own.template_name == "tokenizer" and builtin.template_name == "chatml-builtin"
    assert own.format == builtin.format == "chat"
    # tiny.CHATML and the built-in template render the same text, so both masks agree.
    ids, labels = builtin.train.input_ids[0], builtin.train.labels[0]
    assert ids.tolist() == own.train.input_ids[0].tolist()
    assert [s.removesuffix("\n") for s in labelled_spans(bare, ids, labels)] == [t + END for t in ASSISTANT_TURNS]


# --------------------------------------------------------------------------- sources


def test_folder_with_train_and_valid_files(tmp_path: Path, tiny_tokenizer: Any) -> None:
    folder = tmp_path / "dataset"
    write_jsonl(folder / "train.jsonl", [COMPLETION] * 3)
    write_jsonl(folder / "validation.jsonl", [COMPLETION] * 2)
    train, valid = resolve_files(str(folder), None)
    assert train == folder / "train.jsonl" and valid == folder / "validation.jsonl"

    prepared = prepare_data(DataCfg(train=str(folder)), tiny_tokenizer)
    assert len(prepared.train) == 3 and prepared.valid is not None and len(prepared.valid) == 2
    assert prepared.train_path == str(folder / "train.jsonl")
    assert prepared.valid_path == str(folder / "validation.jsonl")
    assert len(prepared.content_hash) == 64


def test_content_hash_follows_the_bytes(tmp_path: Path, tiny_tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [TEXT])
    first = prepare_data(DataCfg(train=str(path)), tiny_tokenizer).content_hash
    assert prepare_data(DataCfg(train=str(path)), tiny_tokenizer).content_hash == first
    write_jsonl(path, [TEXT, TEXT])
    assert prepare_data(DataCfg(train=str(path)), tiny_tokenizer).content_hash != first


def test_folder_without_train_file_is_refused(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "valid.jsonl", [TEXT])
    with pytest.raises(DataError, match="no train file"):
        resolve_files(str(tmp_path), None)


def test_missing_train_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as info:
        resolve_files(str(tmp_path / "nope.jsonl"), None)
    assert "data.train" in str(info.value)


def test_missing_valid_file_next_to_a_folder_is_refused(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [TEXT])
    with pytest.raises(DataError, match=r"data\.valid"):
        resolve_files(str(tmp_path), str(tmp_path / "nope.jsonl"))


def test_missing_relative_file_is_not_taken_for_a_hub_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        resolve_files("data/trian.jsonl", None)


def test_csv_is_read_with_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text('prompt,completion\nHi,there\n"two\nlines",ok\nlast,\n', encoding="utf-8")
    records = read_records(path)
    assert [r.data for r in records[:2]] == [
        {"prompt": "Hi", "completion": "there"},
        {"prompt": "two\nlines", "completion": "ok"},
    ]
    assert [r.line for r in records] == [2, 3, 5]  # a quoted newline makes row 2 span lines 3-4
    with pytest.raises(DataError) as info:
        to_samples(records, detect_format(records[0]))
    assert info.value.line == 5 and '"completion" is empty' in str(info.value)


def test_csv_with_a_bom_and_too_many_fields(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_bytes("\ufefftext\nhello\n".encode())
    assert read_records(path)[0].data == {"text": "hello"}
    path.write_text("text\nhello\na,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="more fields") as info:
        read_records(path)
    assert info.value.line == 3


def test_parquet_is_read(tmp_path: Path, tiny_tokenizer: Any) -> None:
    pd = pytest.importorskip("pandas")
    path = tmp_path / "train.parquet"
    pd.DataFrame({"prompt": ["Hi: ", "Yo: "], "completion": ["the cat.", "the dog."]}).to_parquet(path)
    records = read_records(path)
    assert [r.data for r in records] == [
        {"prompt": "Hi: ", "completion": "the cat."},
        {"prompt": "Yo: ", "completion": "the dog."},
    ]
    assert [r.line for r in records] == [1, 2]
    prepared = prepare_data(DataCfg(train=str(path)), tiny_tokenizer)
    assert prepared.format == "completion" and len(prepared.train) == 2


def test_corrupt_parquet_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="Parquet") as info:
        read_records(path)
    assert str(path) in str(info.value)


def test_json_array_is_read_with_item_lines(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text(
        '[\n  {"text": "a {tricky} [string]"},\n\n'
        '  {"text": "b",\n   "meta": {"x": [1, {"y": 2}]}},\n'
        '  {"txt": "c"}\n]\n',
        encoding="utf-8",
    )
    records = read_records(path)
    assert [r.line for r in records] == [2, 4, 6]
    assert records[0].data["text"] == "a {tricky} [string]"
    with pytest.raises(DataError) as info:
        to_samples(records, "text")
    assert info.value.line == 6 and 'missing field "text"' in str(info.value)


def test_json_array_item_lines_survive_escaped_quotes(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text('[\n  {"text": "a 5\\" pipe"},\n  {"text": "b"},\n  {"txt": "c"}\n]\n', encoding="utf-8")
    records = read_records(path)
    assert records[0].data["text"] == 'a 5" pipe'
    assert [r.line for r in records] == [2, 3, 4]


def test_wrapped_json_array_reports_item_lines(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text('{"meta": {"n": 2},\n "data": [\n  {"text": "a"},\n  {"txt": "b"}\n]}\n', encoding="utf-8")
    records = read_records(path)
    assert [r.data for r in records] == [{"text": "a"}, {"txt": "b"}]
    assert [r.line for r in records] == [3, 4]


@pytest.mark.parametrize(
    ("name", "content", "fragment", "line"),
    [
        ("bad.jsonl", b'{"text": "a"}\n\n{"text": "b",}\n', "not valid JSON", 3),
        ("list.jsonl", b'{"text": "a"}\n["text"]\n', "JSON object", 2),
        ("latin1.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', "not UTF-8", 2),
        ("latin1.csv", b"text\nok\ncaf\xe9\n", "not UTF-8", 3),
        ("bad.json", b'[\n  {"text": "a"},\n  {"text": }\n]\n', "not valid JSON", 3),
        ("empty.jsonl", b"", "empty", None),
        ("blank.jsonl", b"\n\n  \n", "no records", None),
        ("data.txt", b"hello\n", "unsupported file type .txt", None),
    ],
)
def test_unreadable_files_name_file_and_line(
    tmp_path: Path, name: str, content: bytes, fragment: str, line: int | None
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_records(path)
    assert fragment in str(info.value)
    assert info.value.path == str(path) and info.value.line == line
    assert str(info.value).startswith(f"{path}:{line}: " if line else f"{path}: ")


def test_iter_records_streams_lazily_and_stops_at_the_first_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\nnot json\n', encoding="utf-8")
    stream = iter_records(path)
    assert next(stream).data == {"text": "a"} and next(stream).line == 2  # read before the bad line is reached
    with pytest.raises(DataError) as info:
        next(stream)
    assert info.value.line == 3


ROWS = {"prompt": ["Hi: ", "Yo: ", "Hey: "], "completion": ["the cat.", "the dog.", "the bird."]}
AS_RECORDS = [{"prompt": p, "completion": c} for p, c in zip(ROWS["prompt"], ROWS["completion"], strict=True)]


@pytest.mark.parametrize("layout", ["file", "stream"])
@pytest.mark.parametrize("suffix", [".arrow", ".feather"])
def test_arrow_ipc_files_and_streams_are_read(tmp_path: Path, layout: str, suffix: str) -> None:
    import pyarrow as pa

    table = pa.table(ROWS)
    path = tmp_path / f"train{suffix}"
    with pa.OSFile(str(path), "wb") as sink:
        open_writer = pa.ipc.new_file if layout == "file" else pa.ipc.new_stream
        with open_writer(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=2):  # two record batches: rows span them
                writer.write_batch(batch)
    records = read_records(path)
    assert [r.data for r in records] == AS_RECORDS and [r.line for r in records] == [1, 2, 3]
    assert load_records(DataCfg(train=str(path))).format == "completion"


def test_corrupt_arrow_file_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "train.arrow"
    path.write_bytes(b"definitely not arrow")
    with pytest.raises(DataError, match="Arrow") as info:
        read_records(path)
    assert info.value.path == str(path)


def test_hdf5_compound_table_and_column_group(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    text = h5py.string_dtype()
    compound = tmp_path / "compound.h5"
    with h5py.File(compound, "w") as fh:
        rows = np.array(
            list(zip(ROWS["prompt"], ROWS["completion"], strict=True)), dtype=[("prompt", text), ("completion", text)]
        )
        fh.create_dataset("train", data=rows)
    columns = tmp_path / "columns.hdf5"
    with h5py.File(columns, "w") as fh:
        for split, n in (("train", 3), ("validation", 1)):
            group = fh.create_group(split)
            for name, values in ROWS.items():
                group.create_dataset(name, data=values[:n], dtype=text)
    assert [r.data for r in read_records(compound)] == AS_RECORDS
    assert [r.data for r in read_records(columns)] == AS_RECORDS
    assert [r.data for r in read_records(columns, split="validation")] == AS_RECORDS[:1]


def test_hdf5_with_several_tables_and_no_split_name_is_refused(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "many.h5"
    with h5py.File(path, "w") as fh:
        for name in ("a", "b"):
            fh.create_group(name).create_dataset("text", data=["x"], dtype=h5py.string_dtype())
    with pytest.raises(DataError, match="which table") as info:
        read_records(path)
    assert "'a', 'b'" in str(info.value) and info.value.hint and "'train'" in info.value.hint


def test_columns_rename_fields_before_detection(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "Hi: ", "answer": "the cat.", "id": 1}])
    records = read_records(path, columns={"prompt": "question", "completion": "answer"})
    assert records[0].data == {"prompt": "Hi: ", "completion": "the cat.", "id": 1}
    assert detect_format(records[0]) == "completion"


def test_unknown_column_mapping_names_the_key_and_the_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as info:
        read_records(path, columns={"prompt": "query", "completion": "answer"})
    message = str(info.value)
    assert message.startswith(f"{path}:1: ") and "data.columns.prompt" in message and "'query'" in message
    assert "'answer', 'question'" in message


# --------------------------------------------------------------------------- validate_dataset


def test_validate_dataset_report_without_a_model(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    write_jsonl(folder / "train.jsonl", [CHAT] * 3)
    write_jsonl(folder / "valid.jsonl", [CHAT])
    report = validate_dataset(str(folder))
    assert report["format"] == "chat" and "chat_template" not in report
    assert set(report["splits"]) == {"train", "valid"}
    train = report["splits"]["train"]
    assert train["path"] == str(folder / "train.jsonl") and train["records"] == 3
    assert set(train["chars"]) == {"min", "mean", "max"} and "tokens" not in train
    assert report["splits"]["valid"]["records"] == 1
    json.dumps(report)  # the --json output


def test_conversations_without_answers_are_pointed_at_grpo(tmp_path: Path) -> None:
    # GRPO's prompts as messages look like chat with no assistant turn: auto-detect can't tell, the hint can.
    prompts = [{"messages": [{"role": "user", "content": f"{a}+{a}?"}], "answer": str(2 * a)} for a in range(3)]
    write_jsonl(tmp_path / "sums.jsonl", prompts)
    with pytest.raises(DataError) as caught:
        validate_dataset(str(tmp_path / "sums.jsonl"))
    assert "--format grpo" in (caught.value.hint or "") and "lines 1, 2, 3" in str(caught.value)
    assert validate_dataset(str(tmp_path / "sums.jsonl"), fmt="grpo")["splits"]["train"]["records"] == 3
    mixed = [CHAT, *prompts]  # some answered, some not: a broken SFT file, told as one
    write_jsonl(tmp_path / "mixed.jsonl", mixed)
    with pytest.raises(DataError) as caught:
        validate_dataset(str(tmp_path / "mixed.jsonl"))
    assert "grpo" not in (caught.value.hint or "")


def test_validate_dataset_report_with_a_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [COMPLETION, {"prompt": "Hi: ", "completion": "the cat " * 40}])
    report = validate_dataset(str(path), model=str(tiny_model_dir), max_seq_len=32)
    assert report["format"] == "completion" and report["chat_template"] == "tokenizer"
    assert set(report["splits"]) == {"train"}
    stats = report["splits"]["train"]["tokens"]
    assert set(stats) >= {"count", "min", "mean", "p50", "p95", "max", "supervised_tokens", "truncated", "dropped"}
    assert stats["count"] == 2 and stats["truncated"] == 1 and stats["dropped"] == 0
    assert stats["max"] == 32 and 0 < stats["min"] <= stats["mean"] <= stats["max"]
    assert stats["supervised_tokens"] > 0
    json.dumps(report)


def test_validate_dataset_raises_on_the_first_bad_record(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [CHAT, CHAT, {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError) as info:
        validate_dataset(str(path))
    assert info.value.line == 3 and "no assistant message" in str(info.value)
