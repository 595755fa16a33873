"""Loss masking, token by token, for every format and every ``data.train_on`` choice.

The tokenizer here is built so that each token can be spelled out: one token
per word, per whitespace character and per punctuation mark, plus the ChatML
markers as special tokens.  Each test writes down the exact token sequence the
trainer must see and which of those tokens carry a label (``L``) or not
(``M``), then compares ids and labels with what :func:`tokenize_samples` made.
"""

from __future__ import annotations

from typing import Any

import pytest

from tunelab.data.formats import to_samples
from tunelab.data.sources import Record
from tunelab.data.templates import CHATML, TemplateLacksTools, template_for_sample
from tunelab.data.tokenize import tokenize_samples
from tunelab.errors import ConfigError
from tunelab.vocab import IGNORE

SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "[CALL]", "[/CALL]"]
WORDS = "system user assistant tool Hi Yes Sum two and Four Tools name add arguments a 2 4 # ( )"
PUNCT = ["\n", " ", "{", "}", '"', ":", ",", ".", "?"]
VOCAB = {token: index for index, token in enumerate(SPECIAL + WORDS.split() + PUNCT)}

Spelled = list[tuple[str, bool]]


def M(*tokens: str) -> Spelled:
    """Tokens the model reads but is not trained on (label -100)."""
    return [(t, False) for t in tokens]


def L(*tokens: str) -> Spelled:
    """Tokens that carry loss (label = the token itself)."""
    return [(t, True) for t in tokens]


def head(role: str) -> tuple[str, ...]:
    return ("<|im_start|>", role, "\n")


END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok() -> Any:
    """A word-level fast tokenizer with BOS added on its own (like Llama) and </s> as EOS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|\s|[^\w\s]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", VOCAB["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tokenize(tok: Any, record: dict, fmt: str, train_on: str, template: str = CHATML) -> tuple[list[int], list[int]]:
    samples = to_samples([Record(record, "t.jsonl", 1)], fmt)
    split = tokenize_samples(samples, tok, template=template, max_seq_len=512, mask_prompt=True, train_on=train_on)
    assert len(split) == 1
    return split.input_ids[0].tolist(), split.labels[0].tolist()


def assert_tokens(actual: tuple[list[int], list[int]], expected: Spelled) -> None:
    ids, labels = actual
    spelled = {v: k for k, v in VOCAB.items()}
    # Compare spelled tokens first: a failure then reads as text, not as numbers.
    assert [spelled[i] for i in ids] == [t for t, _ in expected]
    assert ids == [VOCAB[t] for t, _ in expected]
    assert labels == [VOCAB[t] if trained else IGNORE for t, trained in expected]


ALL = ["last_assistant", "all_assistant", "everything"]

# --------------------------------------------------------------------------- text and completion


@pytest.mark.parametrize("train_on", ALL)
def test_text_trains_every_token_but_the_bos(tok: Any, train_on: str) -> None:
    expected = M("<s>") + L("Hi", " ", "Yes", ".", "</s>")
    assert_tokens(tokenize(tok, {"text": "Hi Yes."}, "text", train_on), expected)


@pytest.mark.parametrize(
    ("train_on", "expected"),
    [
        ("last_assistant", M("<s>", "Sum", " ", "two", "?", " ") + L("Four", ".", "</s>")),
        ("all_assistant", M("<s>", "Sum", " ", "two", "?", " ") + L("Four", ".", "</s>")),
        ("everything", M("<s>") + L("Sum", " ", "two", "?", " ", "Four", ".", "</s>")),
    ],
)
def test_completion(tok: Any, train_on: str, expected: Spelled) -> None:
    record = {"prompt": "Sum two? ", "completion": "Four."}
    assert_tokens(tokenize(tok, record, "completion", train_on), expected)


# --------------------------------------------------------------------------- instruction (a one-turn chat)

INSTRUCTION_PROMPT = (*head("user"), "Sum", " ", "two", " ", "and", " ", "two", "?", END, "\n", *head("assistant"))


@pytest.mark.parametrize(
    ("train_on", "expected"),
    [
        ("last_assistant", M(*INSTRUCTION_PROMPT) + L("Four", ".", END) + M("\n")),
        ("all_assistant", M(*INSTRUCTION_PROMPT) + L("Four", ".", END) + M("\n")),
        ("everything", L(*INSTRUCTION_PROMPT, "Four", ".", END, "\n")),
    ],
)
def test_instruction(tok: Any, train_on: str, expected: Spelled) -> None:
    record = {"instruction": "Sum two and two?", "input": "", "output": "Four."}
    assert_tokens(tokenize(tok, record, "instruction", train_on), expected)


# --------------------------------------------------------------------------- multi-turn chat and ShareGPT

CHAT = {
    "messages": [
        {"role": "system", "content": "Hi"},
        {"role": "user", "content": "Sum two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "Yes?"},
        {"role": "assistant", "content": "Yes."},
    ]
}
SHAREGPT = {
    "system": "Hi",
    "conversations": [
        {"from": "human", "value": "Sum two?"},
        {"from": "gpt", "value": "Four."},
        {"from": "human", "value": "Yes?"},
        {"from": "gpt", "value": "Yes."},
    ],
}
FIRST_PROMPT = (*head("system"), "Hi", END, "\n", *head("user"), "Sum", " ", "two", "?", END, "\n", *head("assistant"))
SECOND_PROMPT = ("\n", *head("user"), "Yes", "?", END, "\n", *head("assistant"))
MULTI_TURN = {
    "last_assistant": M(*FIRST_PROMPT, "Four", ".", END, *SECOND_PROMPT) + L("Yes", ".", END) + M("\n"),
    "all_assistant": M(*FIRST_PROMPT) + L("Four", ".", END) + M(*SECOND_PROMPT) + L("Yes", ".", END) + M("\n"),
    "everything": L(*FIRST_PROMPT, "Four", ".", END, *SECOND_PROMPT, "Yes", ".", END, "\n"),
}


@pytest.mark.parametrize("train_on", ALL)
def test_multi_turn_chat(tok: Any, train_on: str) -> None:
    assert_tokens(tokenize(tok, CHAT, "chat", train_on), MULTI_TURN[train_on])


@pytest.mark.parametrize("train_on", ALL)
def test_sharegpt_masks_exactly_like_the_same_chat(tok: Any, train_on: str) -> None:
    # Same conversation, ShareGPT spelling (system as a top-level field): same tokens, same labels.
    assert_tokens(tokenize(tok, SHAREGPT, "sharegpt", train_on), MULTI_TURN[train_on])


# --------------------------------------------------------------------------- tool calls

TOOL_CHAT = {
    "tools": [{"name": "add"}],
    "messages": [
        {"role": "user", "content": "Sum two?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "4"},
        {"role": "assistant", "content": "Four."},
    ],
}
TOOLS_BLOCK = (*head("system"), "#", " ", "Tools", "\n", "{", '"', "name", '"', ":", " ", '"', "add", '"', "}", "\n")
CALL_PROMPT = (*TOOLS_BLOCK, END, "\n", *head("user"), "Sum", " ", "two", "?", END, "\n", *head("assistant"))
CALL = ("<tool_call>", "{", '"', "name", '"', ":", " ", '"', "add", '"', ",", " ")
CALL += ('"', "arguments", '"', ":", " ", "{", '"', "a", '"', ":", " ", "2", "}", "}", "</tool_call>", END)
RESULT_PROMPT = ("\n", *head("tool"), "4", END, "\n", *head("assistant"))
TOOL_TURNS = {
    "last_assistant": M(*CALL_PROMPT, *CALL, *RESULT_PROMPT) + L("Four", ".", END) + M("\n"),
    "all_assistant": M(*CALL_PROMPT) + L(*CALL) + M(*RESULT_PROMPT) + L("Four", ".", END) + M("\n"),
    "everything": L(*CALL_PROMPT, *CALL, *RESULT_PROMPT, "Four", ".", END, "\n"),
}


@pytest.mark.parametrize("train_on", ALL)
def test_chat_with_tool_calls_trains_the_calls_not_the_results(tok: Any, train_on: str) -> None:
    assert_tokens(tokenize(tok, TOOL_CHAT, "chat", train_on), TOOL_TURNS[train_on])


@pytest.mark.parametrize("train_on", ALL)
def test_sharegpt_function_call_and_observation_are_tool_turns(tok: Any, train_on: str) -> None:
    record = {
        "tools": '[{"name": "add"}]',  # ShareGPT exports keep tools as JSON text
        "conversations": [
            {"from": "human", "value": "Sum two?"},
            {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 2}}'},
            {"from": "observation", "value": "4"},
            {"from": "gpt", "value": "Four."},
        ],
    }
    assert_tokens(tokenize(tok, record, "sharegpt", train_on), TOOL_TURNS[train_on])


# A model template with its own tool syntax: [CALL]name(args)[/CALL].
TOOL_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['tool_calls'] %}{% for c in m['tool_calls'] %}"
    "{{ '[CALL]' + c['function']['name'] + '(' + c['function']['arguments']['a'] | string + ')[/CALL]' }}"
    "{% endfor %}{% else %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_tool_calls_use_the_models_template_when_it_supports_them(tok: Any) -> None:
    record = {"messages": TOOL_CHAT["messages"]}
    expected = (
        M(*head("user"), "Sum", " ", "two", "?", END, "\n", *head("assistant"))
        + L("[CALL]", "add", "(", "2", ")", "[/CALL]", END)
        + M(*RESULT_PROMPT)
        + L("Four", ".", END)
        + M("\n")
    )
    assert_tokens(tokenize(tok, record, "chat", "all_assistant", template=TOOL_TEMPLATE), expected)


def test_a_template_without_tool_support_is_refused_per_sample_and_chatml_renders_the_calls(tok: Any) -> None:
    plain = "{% for m in messages %}{{ m['role'] + ': ' + (m['content'] or '') + '\\n' }}{% endfor %}"
    sample = to_samples([Record(TOOL_CHAT, "t.jsonl", 1)], "chat")[0]
    assert template_for_sample(plain, sample.messages, sample.tools) == CHATML
    assert template_for_sample(TOOL_TEMPLATE, sample.messages) == TOOL_TEMPLATE
    assert template_for_sample(plain, CHAT["messages"]) == plain  # no tools: the model's own template
    # Never silently dropped: tokenizing refuses the plain template (prepare_data then switches the whole
    # dataset to the built-in ChatML), and with it the calls are rendered and trained.
    with pytest.raises(TemplateLacksTools, match=r"tools that the model.s chat template can.t render"):
        tokenize(tok, TOOL_CHAT, "chat", "all_assistant", template=plain)
    assert_tokens(tokenize(tok, TOOL_CHAT, "chat", "all_assistant", template=CHATML), TOOL_TURNS["all_assistant"])


def test_mask_prompt_false_trains_every_token_whatever_train_on(tok: Any) -> None:
    samples = to_samples([Record(CHAT, "t.jsonl", 1)], "chat")
    split = tokenize_samples(
        samples, tok, template=CHATML, max_seq_len=512, mask_prompt=False, train_on="last_assistant"
    )
    ids, labels = split.input_ids[0].tolist(), split.labels[0].tolist()
    assert labels == ids == [VOCAB[t] for t, _ in MULTI_TURN["everything"]]


def test_unknown_train_on_is_a_config_error(tok: Any) -> None:
    samples = to_samples([Record(CHAT, "t.jsonl", 1)], "chat")
    with pytest.raises(ConfigError, match="last_assistant, all_assistant, everything"):
        tokenize_samples(samples, tok, template=CHATML, max_seq_len=512, mask_prompt=True, train_on="assistant")
