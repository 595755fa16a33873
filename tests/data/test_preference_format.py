"""Preference and KTO data: detection, validation with file and line, tokenization, cache, batching, preview."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import numpy as np
import pytest
import yaml

from tunelab.config.schema import DataCfg
from tunelab.data.formats import detect_format, to_samples
from tunelab.data.preference import KtoUnits, PairUnits
from tunelab.data.prepare import prepare_data
from tunelab.data.preview import preview_examples
from tunelab.data.sources import Record
from tunelab.data.templates import template_for
from tunelab.data.tokenize import tokenize_samples
from tunelab.errors import DataError
from tunelab.train.backoff import split_rows
from tunelab.vocab import IGNORE, ROLE_CHOSEN, ROLE_DESIRABLE, ROLE_KL, ROLE_REJECTED, ROLE_UNDESIRABLE

Cli = Callable[..., CompletedProcess]
PAIR = {"prompt": "Is the cat big?", "chosen": " yes it is", "rejected": " no"}
CHAT_PAIR = {
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
    "chosen": [{"role": "assistant", "content": "hi you"}],
    "rejected": [{"role": "assistant", "content": "go away"}],
}


def _records(*items: dict) -> list[Record]:
    return [Record(item, "f.jsonl", index + 1) for index, item in enumerate(items)]


def _tokenize(tokenizer: Any, items: list[dict], fmt: str = "auto", max_seq_len: int = 128) -> Any:
    template, _ = template_for(tokenizer)
    samples = to_samples(_records(*items), fmt)
    return tokenize_samples(samples, tokenizer, template=template, max_seq_len=max_seq_len, mask_prompt=True)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- formats


def test_preference_and_kto_records_are_detected() -> None:
    assert detect_format(_records(PAIR)[0]) == "preference"
    assert detect_format(_records(CHAT_PAIR)[0]) == "preference"
    assert detect_format(_records({"prompt": "a", "completion": "b", "label": True})[0]) == "kto"
    assert DataCfg(train="x.jsonl", format="preference").format == "preference"


def test_message_lists_share_the_prompt_turns_and_strings_become_turns() -> None:
    (pair,) = to_samples(_records(CHAT_PAIR), "preference")
    chosen, rejected = pair.pair
    assert chosen.kind == rejected.kind == "chat" and chosen.prompt_turns == rejected.prompt_turns == 2
    assert chosen.messages[:2] == rejected.messages[:2] == tuple(CHAT_PAIR["prompt"])
    (mixed,) = to_samples(
        _records({"prompt": "hello", "chosen": [{"role": "assistant", "content": "hi"}], "rejected": "no"}), "auto"
    )
    assert mixed.pair[1].messages == ({"role": "user", "content": "hello"}, {"role": "assistant", "content": "no"})


def test_without_a_prompt_the_turns_both_conversations_share_are_the_prompt() -> None:
    user = {"role": "user", "content": "hello"}
    record = {
        "chosen": [user, {"role": "assistant", "content": "hi"}],
        "rejected": [user, {"role": "assistant", "content": "go"}],
    }
    (pair,) = to_samples(_records(record), "auto")
    assert pair.pair[0].prompt_turns == 1 and pair.pair[0].messages[-1]["content"] == "hi"


@pytest.mark.parametrize(
    ("record", "says"),
    [
        ({"prompt": "q", "chosen": "  ", "rejected": "no"}, 'field "chosen" is empty'),
        ({"prompt": "q", "chosen": "yes", "rejected": ""}, 'field "rejected" is empty'),
        ({"prompt": "q", "chosen": "same", "rejected": "same "}, '"chosen" and "rejected" are the same response'),
        ({**CHAT_PAIR, "rejected": CHAT_PAIR["chosen"]}, '"chosen" and "rejected" are the same response'),
        ({**CHAT_PAIR, "rejected": [{"role": "user", "content": "x"}]}, '"rejected" has no assistant message'),
        ({"prompt": "q", "chosen": "yes", "rejected": 3}, 'field "rejected" must be a string'),
    ],
)
def test_a_bad_pair_names_its_file_line_and_problem(record: dict, says: str) -> None:
    with pytest.raises(DataError) as err:
        to_samples(_records(PAIR, record), "preference")
    assert err.value.line == 2 and err.value.message.startswith("f.jsonl:2: ") and says in err.value.message


@pytest.mark.parametrize("label", ["true", 1, None, "yes"])
def test_a_kto_label_must_be_a_json_boolean(label: object) -> None:
    with pytest.raises(DataError) as err:
        to_samples(_records({"prompt": "q", "completion": "a", "label": label}), "kto")
    assert "f.jsonl:1: " in str(err.value) and 'field "label" must be true or false' in str(err.value)


# --------------------------------------------------------------------------- tokenization


def test_a_string_pair_is_prompt_tokens_then_response_tokens_then_eos(tiny_tokenizer: Any) -> None:
    split = _tokenize(tiny_tokenizer, [PAIR])
    assert len(split) == 2 and split.roles.tolist() == [ROLE_CHOSEN, ROLE_REJECTED]
    prompt = tiny_tokenizer(PAIR["prompt"], add_special_tokens=True)["input_ids"]
    eos = tiny_tokenizer.eos_token_id
    for row, response in enumerate((PAIR["chosen"], PAIR["rejected"])):
        answer = tiny_tokenizer(response, add_special_tokens=False)["input_ids"]
        assert split.input_ids[row].tolist() == [*prompt, *answer, eos]
        assert split.labels[row].tolist() == [IGNORE] * len(prompt) + [*answer, eos]


def test_a_chat_pair_trains_only_the_responses_never_the_shared_turns(tiny_tokenizer: Any) -> None:
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    record = {**CHAT_PAIR, "prompt": [*history, {"role": "user", "content": "bye"}]}
    split = _tokenize(tiny_tokenizer, [record])
    for row, response in enumerate(("hi you", "go away")):
        trained = tiny_tokenizer.decode([t for t in split.labels[row][1:] if t != IGNORE])
        assert trained == response + "<|im_end|>"  # the prompt's assistant turn is not trained


def test_a_pair_is_dropped_whole_when_it_keeps_no_response_token(tiny_tokenizer: Any) -> None:
    prompt_len = len(tiny_tokenizer(PAIR["prompt"])["input_ids"])
    short = {"prompt": PAIR["prompt"], "chosen": " yes", "rejected": " no"}
    split = _tokenize(tiny_tokenizer, [short, PAIR], max_seq_len=prompt_len)
    assert len(split) == 0 and split.dropped == 2
    kept = _tokenize(tiny_tokenizer, [PAIR, short], max_seq_len=prompt_len + 1)
    assert len(kept) == 4 and kept.roles.tolist() == [1, 2, 1, 2] and kept.truncated == 4


def test_kto_rows_carry_their_label_as_a_role(tiny_tokenizer: Any) -> None:
    items = [
        {"prompt": "a cat", "completion": " sat", "label": True},
        {"prompt": "a dog", "completion": " ran", "label": False},
    ]
    assert _tokenize(tiny_tokenizer, items).roles.tolist() == [ROLE_DESIRABLE, ROLE_UNDESIRABLE]


def test_the_cache_keeps_the_roles(tiny_model_dir: Path, tiny_tokenizer: Any, tmp_path: Path) -> None:
    data = _write(tmp_path / "train.jsonl", [PAIR, CHAT_PAIR] * 3)
    cfg = DataCfg(train=str(data))
    first = prepare_data(cfg, tiny_tokenizer)
    second = prepare_data(cfg, tiny_tokenizer)
    assert (first.cache_status, second.cache_status) == ("miss", "hit") and second.format == "preference"
    assert second.train.roles.tolist() == [1, 2] * 6
    assert [r.tolist() for r in second.train.input_ids] == [r.tolist() for r in first.train.input_ids]


# --------------------------------------------------------------------------- batching


def _pairs(tokenizer: Any, n: int) -> Any:
    words = ["cat", "dog", "bird", "fish", "tree", "house", "river", "city"]
    items = [
        {"prompt": f"Name {i}:", "chosen": f" {words[i % 8]} " * (1 + i % 3), "rejected": f" {words[(i + 3) % 8]}"}
        for i in range(n)
    ]
    return _tokenize(tokenizer, items)


def _sequences(batch: dict[str, np.ndarray]) -> list[tuple[int, tuple[int, ...]]]:
    """(role, ids) of every sequence in a batch, in order, packed or not."""
    out = []
    segments = batch.get("segment_ids", batch["attention_mask"])
    for ids, roles, segs in zip(batch["input_ids"], batch["roles"], segments, strict=True):
        for seg in [s for s in dict.fromkeys(segs.tolist()) if s]:
            where = segs == seg
            out.append((int(roles[where][0]), tuple(ids[where].tolist())))
    return out


def test_a_micro_batch_holds_whole_pairs_chosen_then_rejected(tiny_tokenizer: Any) -> None:
    split = _pairs(tiny_tokenizer, 6)
    units = PairUnits(split, tiny_tokenizer.pad_token_id)
    assert units.lengths.tolist() == (split.lengths[0::2] + split.lengths[1::2]).tolist()
    batch = units.collate(np.array([4, 1]))
    assert batch["input_ids"].shape[0] == 4
    expected = [(int(split.roles[r]), tuple(split.input_ids[r].tolist())) for r in (8, 9, 2, 3)]
    assert _sequences(batch) == expected
    assert (batch["roles"][batch["attention_mask"] == 0] == 0).all()
    # Row splitting (out-of-memory back-off) never separates a pair.
    for piece in split_rows(batch, 4):
        assert piece["input_ids"].shape[0] == 2 and [r for r, _ in _sequences(piece)] == [ROLE_CHOSEN, ROLE_REJECTED]


def test_packing_puts_both_sides_of_a_pair_in_one_row(tiny_tokenizer: Any) -> None:
    from tunelab.data.batching import BatchPlan, MicroBatchStream

    split = _pairs(tiny_tokenizer, 10)
    units = PairUnits(split, tiny_tokenizer.pad_token_id)
    stream = MicroBatchStream(split, BatchPlan(2, 0, True, True), tiny_tokenizer.pad_token_id, pack_to=40, units=units)
    seen = []
    for cursor in range(stream.batches_per_epoch):
        batch = stream.get(cursor)
        for row in range(batch["input_ids"].shape[0]):
            one = {k: v[row : row + 1] for k, v in batch.items()}
            roles = [r for r, _ in _sequences(one)]
            assert roles == [ROLE_CHOSEN, ROLE_REJECTED] * (len(roles) // 2) and roles
            seen.extend(ids for _, ids in _sequences(one))
    assert sorted(seen) == sorted(tuple(r.tolist()) for r in split.input_ids)  # every sequence once per epoch


def test_kto_batches_pair_each_prompt_with_the_next_completion(tiny_tokenizer: Any) -> None:
    items = [
        {"prompt": f"{w} is", "completion": f" {c}", "label": i % 2 == 0}
        for i, (w, c) in enumerate([("cat", "big"), ("dog", "red"), ("bird", "blue")])
    ]
    split = _tokenize(tiny_tokenizer, items)
    batch = KtoUnits(split, tiny_tokenizer.pad_token_id, 64).collate(np.array([0, 1, 2]))
    roles = [r for r, _ in _sequences(batch)]
    assert roles == [ROLE_DESIRABLE, ROLE_KL, ROLE_UNDESIRABLE, ROLE_KL, ROLE_DESIRABLE, ROLE_KL]
    texts = [tiny_tokenizer.decode(ids) for _, ids in _sequences(batch)]
    assert (
        texts[1].startswith("cat is red") and texts[3].startswith("dog is blue") and texts[5].startswith("bird is big")
    )
    trained = tiny_tokenizer.decode([t for t in batch["labels"][1] if t != IGNORE])
    assert trained.startswith(" red")  # a KL row scores the borrowed completion, not the prompt


# --------------------------------------------------------------------------- preview and the CLI


def test_preview_shows_chosen_and_rejected_with_their_masks(tiny_tokenizer: Any) -> None:
    template, _ = template_for(tiny_tokenizer)
    records = _records(PAIR)
    shown = preview_examples(
        to_samples(records, "preference"), records, tiny_tokenizer, template=template, max_seq_len=64
    )
    assert [e.role for e in shown] == ["chosen", "rejected"]
    assert "".join(text for text, _, trained in shown[0].tokens if trained).startswith(" yes it is")


def test_data_validate_lists_every_bad_pair_and_label_by_line(cli: Cli, tmp_path: Path) -> None:
    rows = [PAIR, {**PAIR, "chosen": ""}, PAIR, {**PAIR, "rejected": PAIR["chosen"]}, {**PAIR, "chosen": " "}]
    data = _write(tmp_path / "pairs.jsonl", rows)
    result = cli("data", "validate", data, env={"COLUMNS": "300"})
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert f'field "chosen" is empty (2): {data}: lines 2, 5' in result.stderr
    assert f"the same response, so there is nothing to prefer (1): {data}: line 4" in result.stderr
    kto = _write(
        tmp_path / "kto.jsonl",
        [{"prompt": "q", "completion": "a", "label": True}, {"prompt": "q", "completion": "a", "label": "false"}],
    )
    result = cli("data", "validate", kto, env={"COLUMNS": "300"})
    assert result.returncode == 3 and f"{kto}: line 2" in result.stderr and "must be true or false" in result.stderr


def test_train_refuses_a_bad_pair_before_the_model_loads(
    cli: Cli, tmp_path: Path, tokenizer_only_model_dir: Path
) -> None:
    data = _write(tmp_path / "pairs.jsonl", [PAIR, PAIR, {**PAIR, "rejected": PAIR["chosen"]}])
    config = {
        "model": {"path": str(tokenizer_only_model_dir)},
        "data": {"train": str(data)},
        "objective": {"name": "dpo"},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    result = cli("train", tmp_path / "cfg.yaml")
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    assert f"{data}:3:" in result.stderr and "nothing to prefer" in result.stderr
    # The objective and the detected format must agree, before the model loads too.
    chat = _write(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
    )
    config["data"] = {"train": str(chat)}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    result = cli("train", tmp_path / "cfg.yaml")
    assert result.returncode == 2 and "objective dpo trains on data format preference (got chat)" in result.stderr
