"""The tokenization cache, streaming preparation, parallel tokenization and the carved validation split.

A hit must skip the tokenizer entirely; anything the token ids depend on must
miss (one test per key component, a changed tokenizer above all); the cached
split must be indistinguishable from tokenizing in memory.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tunelab.config.schema import DataCfg
from tunelab.data import arrow_split, cache, prepare
from tunelab.data.formats import to_samples
from tunelab.data.prepare import PreparedData, prepare_data
from tunelab.data.sources import read_records
from tunelab.data.templates import BUILTIN_NAME, CHATML, TOKENIZER_NAME, template_for
from tunelab.data.tokenize import TokenizedSplit, tokenize_samples
from tunelab.errors import DataError
from tunelab.hub import load_tokenizer

WORDS = ["the", "cat", "dog", "sat", "on", "a", "mat", "ran", "fast", "big", "red", "tree"]
WORDS += ["river", "model", "data", "answer", "question", "hello"]


def _chat(rng: random.Random, turns: int) -> dict[str, Any]:
    messages = [{"role": "system", "content": "Be brief."}]
    for _ in range(turns):
        messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 12)))})
        messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 30)))})
    return {"messages": messages}


def write_chats(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps(_chat(rng, rng.randint(1, 3))) + "\n" for _ in range(n)), encoding="utf-8")
    return path


@pytest.fixture
def chats(tmp_path: Path) -> Path:
    return write_chats(tmp_path / "train.jsonl", 60)


@pytest.fixture
def calls(tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Counts every call of the tokenizer class (the session tokenizer's too)."""
    counter = {"n": 0}
    original = type(tiny_tokenizer).__call__

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        counter["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_tokenizer), "__call__", counting)
    return lambda: counter["n"]


def rows(split: TokenizedSplit) -> list[tuple[list[int], list[int]]]:
    return [(split.input_ids[i].tolist(), split.labels[i].tolist()) for i in range(len(split))]


def entries(home: Path) -> list[str]:
    root = home / "cache" / "tokenized"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# --------------------------------------------------------------------------- hits


def test_second_run_hits_and_never_calls_the_tokenizer(
    chats: Path, tiny_tokenizer: Any, calls: Callable[[], int], tunelab_home: Path
) -> None:
    cfg = DataCfg(train=str(chats), max_seq_len=64)
    first = prepare_data(cfg, tiny_tokenizer)
    assert first.cache_status == "miss" and calls() > 0
    assert entries(tunelab_home) == [first.cache_key]
    before = calls()
    second = prepare_data(cfg, tiny_tokenizer)
    assert calls() == before, "a cache hit must not tokenize anything"
    assert second.cache_status == "hit" and second.cache_key == first.cache_key
    assert rows(second.train) == rows(first.train)


def test_cached_split_equals_tokenizing_in_memory(chats: Path, tiny_tokenizer: Any) -> None:
    """Rows, lengths (from Arrow offsets), supervised tokens and truncation counts all match."""
    records = read_records(chats)
    template, _ = template_for(tiny_tokenizer)
    expected = tokenize_samples(
        to_samples(records, "chat"),
        tiny_tokenizer,
        template=template,
        max_seq_len=48,
        mask_prompt=True,
        sources=[(r.path, r.line) for r in records],
    )
    assert expected.truncated > 0  # the comparison covers truncation too
    prepare_data(DataCfg(train=str(chats), max_seq_len=48), tiny_tokenizer)
    cached = prepare_data(DataCfg(train=str(chats), max_seq_len=48), tiny_tokenizer).train
    assert rows(cached) == rows(expected)
    np.testing.assert_array_equal(cached.lengths, expected.lengths)
    assert cached.supervised_tokens == TokenizedSplit(list(expected.input_ids), list(expected.labels)).supervised_tokens
    assert (cached.truncated, cached.dropped) == (expected.truncated, expected.dropped)
    assert isinstance(cached.input_ids, arrow_split.RaggedColumn)  # memory-mapped rows, not a list in memory
    assert cached.input_ids[-1].dtype == np.int32 and cached.input_ids[-1].ndim == 1


def test_copied_model_folder_hits(chats: Path, tiny_model_dir: Path, tiny_tokenizer: Any, tmp_path: Path) -> None:
    """The key hashes the tokenizer's bytes, not where they live."""
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "elsewhere"))
    cfg = DataCfg(train=str(chats), max_seq_len=64)
    assert prepare_data(cfg, tiny_tokenizer).cache_status == "miss"
    assert prepare_data(cfg, load_tokenizer(copy)).cache_status == "hit"


# --------------------------------------------------------------------------- misses, one per key component


def _changed_tokenizer(model_dir: Path, tmp_path: Path) -> Any:
    """Same folder layout, its most frequent merge dropped from tokenizer.json: it tokenizes differently."""
    copy = Path(shutil.copytree(model_dir, tmp_path / "changed-tokenizer"))
    spec = json.loads((copy / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["merges"] = spec["model"]["merges"][1:]
    (copy / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return load_tokenizer(copy)


def _other_template(tokenizer: Any) -> Any:
    other = load_tokenizer(Path(tokenizer.name_or_path))
    other.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    return other


CHANGES: dict[str, Callable[[dict[str, Any], Path, Any, Path], tuple[dict[str, Any], Any, int]]] = {
    "data content": lambda cfg, data, tok, tmp: (
        {**cfg, "train": str(write_chats(tmp / "other.jsonl", 60, seed=1))},
        tok,
        0,
    ),
    "tokenizer files": lambda cfg, data, tok, tmp: (cfg, _changed_tokenizer(Path(tok.name_or_path), tmp), 0),
    "chat template": lambda cfg, data, tok, tmp: (cfg, _other_template(tok), 0),
    "max_seq_len": lambda cfg, data, tok, tmp: ({**cfg, "max_seq_len": 32}, tok, 0),
    "mask_prompt": lambda cfg, data, tok, tmp: ({**cfg, "mask_prompt": False}, tok, 0),
    "train_on": lambda cfg, data, tok, tmp: ({**cfg, "train_on": "last_assistant"}, tok, 0),
    "format": lambda cfg, data, tok, tmp: ({**cfg, "format": "chat"}, tok, 0),
    "columns": lambda cfg, data, tok, tmp: ({**cfg, "columns": {"messages": "messages"}}, tok, 0),
    "valid_split": lambda cfg, data, tok, tmp: ({**cfg, "valid_split": 0.2}, tok, 0),
    "seed (when carving)": lambda cfg, data, tok, tmp: ({**cfg, "valid_split": 0.3}, tok, 1),
}


@pytest.mark.parametrize("component", sorted(CHANGES))
def test_changing_any_key_component_misses(
    component: str, chats: Path, tiny_tokenizer: Any, tmp_path: Path, tunelab_home: Path
) -> None:
    base: dict[str, Any] = {"train": str(chats), "max_seq_len": 64}
    if component == "seed (when carving)":
        base["valid_split"] = 0.3
    if component == "format":
        base["format"] = "auto"
        # A record that is both a completion and a chat: the format decides what is trained.
        chats.write_text(
            json.dumps({**_chat(random.Random(0), 1), "prompt": "the cat", "completion": "sat on a mat"}) + "\n",
            encoding="utf-8",
        )
        base["format"] = "completion"
    first = prepare_data(DataCfg(**base), tiny_tokenizer, seed=0)
    assert prepare_data(DataCfg(**base), tiny_tokenizer, seed=0).cache_status == "hit"
    cfg, tokenizer, seed = CHANGES[component](base, chats, tiny_tokenizer, tmp_path)
    changed = prepare_data(DataCfg(**cfg), tokenizer, seed=seed)
    assert changed.cache_status == "miss", f"changing {component} must miss"
    assert changed.cache_key != first.cache_key
    assert len(entries(tunelab_home)) == 2


def test_new_tokenization_version_misses(chats: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DataCfg(train=str(chats), max_seq_len=64)
    prepare_data(cfg, tiny_tokenizer)
    monkeypatch.setattr(cache, "TOKENIZATION_VERSION", cache.TOKENIZATION_VERSION + 1)
    assert prepare_data(cfg, tiny_tokenizer).cache_status == "miss"


def test_changed_tokenizer_really_tokenizes_differently(chats: Path, tiny_tokenizer: Any, tmp_path: Path) -> None:
    """Guards the test above: a hit there would have served wrong token ids."""
    cfg = DataCfg(train=str(chats), max_seq_len=64)
    before = prepare_data(cfg, tiny_tokenizer)
    after = prepare_data(cfg, _changed_tokenizer(Path(tiny_tokenizer.name_or_path), tmp_path))
    assert rows(before.train) != rows(after.train)


# --------------------------------------------------------------------------- off, corrupt, streaming errors


def test_cache_false_bypasses(chats: Path, tiny_tokenizer: Any, tunelab_home: Path, calls: Callable[[], int]) -> None:
    cfg = DataCfg(train=str(chats), max_seq_len=64, cache=False)
    first = prepare_data(cfg, tiny_tokenizer)
    used = calls()
    second = prepare_data(cfg, tiny_tokenizer)
    assert (first.cache_status, second.cache_status) == ("off", "off")
    assert calls() == 2 * used and first.cache_key is None
    assert entries(tunelab_home) == []  # nothing left behind, not even temporary folders
    assert rows(first.train) == rows(second.train)


@pytest.mark.parametrize("damage", ["no meta", "truncated arrow", "garbage meta", "row count"])
def test_corrupt_entry_is_ignored_and_rebuilt(
    damage: str, chats: Path, tiny_tokenizer: Any, tunelab_home: Path
) -> None:
    cfg = DataCfg(train=str(chats), max_seq_len=64)
    good = prepare_data(cfg, tiny_tokenizer)
    expected = rows(good.train)
    folder = tunelab_home / "cache" / "tokenized" / str(good.cache_key)
    if damage == "no meta":
        (folder / "meta.json").unlink()
    elif damage == "garbage meta":
        (folder / "meta.json").write_text("{not json", encoding="utf-8")
    elif damage == "truncated arrow":
        data = (folder / "train.arrow").read_bytes()
        (folder / "train.arrow").write_bytes(data[: len(data) // 2])
    else:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        meta["splits"]["train"]["rows"] += 1
        (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    rebuilt = prepare_data(cfg, tiny_tokenizer)
    assert rebuilt.cache_status == "miss"
    assert rows(rebuilt.train) == expected
    assert prepare_data(cfg, tiny_tokenizer).cache_status == "hit"


def test_a_bad_record_in_big_data_fails_with_its_line(
    chats: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch, tunelab_home: Path
) -> None:
    """Past the up-front check's size limit, validation happens while streaming; nothing is cached."""
    monkeypatch.setattr(prepare, "CHECK_FIRST_BYTES", 0)
    lines = chats.read_text(encoding="utf-8").splitlines()
    lines[41] = json.dumps({"messages": [{"role": "user", "content": 3}]})
    chats.write_text("\n".join(lines) + "\n", encoding="utf-8")
    source = prepare.scan_data(DataCfg(train=str(chats)))
    assert source.train_count is None  # not checked up front
    with pytest.raises(DataError, match=rf"{chats.name}:42"):
        prepare_data(DataCfg(train=str(chats), max_seq_len=64), tiny_tokenizer, source)
    assert entries(tunelab_home) == []


def test_small_data_is_checked_before_any_tokenizer(chats: Path) -> None:
    lines = chats.read_text(encoding="utf-8").splitlines()
    lines[9] = "{broken"
    chats.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{chats.name}:10"):
        prepare.scan_data(DataCfg(train=str(chats)))


# --------------------------------------------------------------------------- parallel


def test_output_is_the_same_for_any_num_proc(
    tmp_path: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three chunks tokenized by two worker processes give exactly the rows of one process."""
    data = write_chats(tmp_path / "train.jsonl", 2 * 512 + 100, seed=5)
    monkeypatch.setattr(prepare, "PARALLEL_MIN_BYTES", 0)
    results: dict[int, PreparedData] = {}
    for num_proc in (1, 2):
        cfg = DataCfg(train=str(data), max_seq_len=64, cache=False, num_proc=num_proc, valid_split=0.1)
        results[num_proc] = prepare_data(cfg, tiny_tokenizer, seed=7)
    assert rows(results[1].train) == rows(results[2].train)
    assert results[1].valid is not None and results[2].valid is not None
    assert rows(results[1].valid) == rows(results[2].valid)


def test_worker_errors_reach_the_caller_with_their_line(
    tmp_path: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_chats(tmp_path / "train.jsonl", 700)
    lines = data.read_text(encoding="utf-8").splitlines()
    lines[599] = json.dumps({"messages": []})
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.setattr(prepare, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(prepare, "CHECK_FIRST_BYTES", 0)
    with pytest.raises(DataError, match=r"train.jsonl:600"):
        prepare_data(DataCfg(train=str(data), num_proc=2, max_seq_len=64), tiny_tokenizer)


# --------------------------------------------------------------------------- held-out split


def _carve(data: Path, tokenizer: Any, fraction: float, seed: int) -> PreparedData:
    return prepare_data(DataCfg(train=str(data), max_seq_len=512, valid_split=fraction), tokenizer, seed=seed)


def _firsts(split: TokenizedSplit | None) -> set[tuple[int, ...]]:
    assert split is not None
    return {tuple(split.input_ids[i].tolist()) for i in range(len(split))}


def test_valid_split_carves_a_seeded_fraction(chats: Path, tiny_tokenizer: Any) -> None:
    whole = prepare_data(DataCfg(train=str(chats), max_seq_len=512), tiny_tokenizer)
    carved = _carve(chats, tiny_tokenizer, 0.25, seed=3)
    assert carved.valid is not None and len(carved.valid) == 15  # exactly a quarter of 60
    assert len(carved.train) + len(carved.valid) == len(whole.train)
    assert not _firsts(carved.train) & _firsts(carved.valid)
    assert _firsts(carved.train) | _firsts(carved.valid) == _firsts(whole.train)
    assert carved.valid_split == 0.25 and carved.stats["valid_split"] == 0.25
    again = _carve(chats, tiny_tokenizer, 0.25, seed=3)
    assert _firsts(again.valid) == _firsts(carved.valid)
    assert _firsts(_carve(chats, tiny_tokenizer, 0.25, seed=4).valid) != _firsts(carved.valid)


def test_valid_split_is_ignored_when_a_valid_set_exists(chats: Path, tiny_tokenizer: Any, tmp_path: Path) -> None:
    valid = write_chats(tmp_path / "valid.jsonl", 7, seed=9)
    data = prepare_data(DataCfg(train=str(chats), valid=str(valid), max_seq_len=512, valid_split=0.5), tiny_tokenizer)
    assert data.valid is not None and len(data.valid) == 7 and len(data.train) == 60
    assert data.valid_split == 0.0


def test_carver_without_a_count_is_close_to_the_fraction() -> None:
    """Big data (count unknown) is carved record by record; the share is still about right."""
    carver = prepare._Carver(seed=1, fraction=0.1, count=None)
    mask = np.concatenate([carver.select(start, 1000) for start in range(0, 100_000, 1000)])
    assert abs(mask.mean() - 0.1) < 0.005
    np.testing.assert_array_equal(mask[:3000], carver.select(0, 3000))  # chunking does not matter


# --------------------------------------------------------------------------- housekeeping


def test_data_cache_command_lists_and_clears(chats: Path, tiny_tokenizer: Any, cli: Callable[..., Any]) -> None:
    short = prepare_data(DataCfg(train=str(chats), max_seq_len=32), tiny_tokenizer)
    long = prepare_data(DataCfg(train=str(chats), max_seq_len=64, valid_split=0.5), tiny_tokenizer)
    listed = cli("data", "cache", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {e["key"]: e["rows"] for e in json.loads(listed.stdout)}
    assert rows == {short.cache_key: {"train": len(short.train)}, long.cache_key: {"train": 30, "valid": 30}}
    cleared = cli("data", "cache", "--clear", "--json")
    assert cleared.returncode == 0 and json.loads(cleared.stdout)["removed"] == 2
    assert prepare_data(DataCfg(train=str(chats), max_seq_len=32), tiny_tokenizer).cache_status == "miss"


# --------------------------------------------------------------------------- one template per dataset


@pytest.mark.parametrize("num_proc", [1, 2])
def test_tool_calls_the_template_cant_render_switch_the_whole_dataset_to_chatml(
    tmp_path: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch, num_proc: int
) -> None:
    """Every example, not only those with tools, is trained with the template saved with the adapter."""
    data = write_chats(tmp_path / "train.jsonl", 600, seed=3)
    call = {"type": "function", "function": {"name": "lookup", "arguments": {"q": "cat"}}}
    tool_chat = {
        "messages": [
            {"role": "user", "content": "find the cat"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "on a mat"},
            {"role": "assistant", "content": "the cat sat on a mat"},
        ]
    }
    with data.open("a", encoding="utf-8") as f:  # the only tool call comes last, in the last chunk
        f.write(json.dumps(tool_chat) + "\n")
    monkeypatch.setattr(prepare, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(prepare, "CHECK_FIRST_BYTES", 0)
    assert template_for(tiny_tokenizer)[1] == TOKENIZER_NAME and "tool_calls" not in tiny_tokenizer.chat_template
    out = prepare_data(DataCfg(train=str(data), max_seq_len=256, num_proc=num_proc), tiny_tokenizer)
    assert out.template_name == BUILTIN_NAME
    records = read_records(data)
    expected = tokenize_samples(
        to_samples(records, "chat"), tiny_tokenizer, template=CHATML, max_seq_len=256, mask_prompt=True
    )
    assert rows(out.train) == rows(expected)
    assert "<tool_call>" in tiny_tokenizer.decode(out.train.input_ids[len(out.train) - 1].tolist())
    assert (
        prepare_data(DataCfg(train=str(data), max_seq_len=256, num_proc=num_proc), tiny_tokenizer).cache_status == "hit"
    )
