"""`tunelab data preview`: the first examples of a dataset exactly as the trainer will see them.

Examples go through the same reader, format conversion, chat template and
:func:`tokenize_samples` as training; the result is a plain structure (each
token's text, id and whether it carries loss) that the CLI colours and the
API or dashboard can serve as it is.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tunelab.data.formats import Sample, detect_format, to_sample
from tunelab.data.sources import Record, iter_records, resolve_files
from tunelab.data.templates import BUILTIN_NAME, CHATML, needs_builtin, template_for
from tunelab.data.tokenize import tokenize_samples
from tunelab.vocab import IGNORE

# Decoding a token alone garbles characters split across tokens (byte-level BPE) and drops the leading
# space of SentencePiece pieces, so each token's text is read off a short window of tokens before it.
_DECODE_WINDOW = 8
_UNCUT = 1_048_576


@dataclass(frozen=True)
class PreviewExample:
    """One example as trained: ``tokens`` holds ``(text, id, trained)`` for each token the model reads."""

    path: str
    line: int
    tokens: list[tuple[str, int, bool]]
    full_length: int
    truncated: bool
    dropped: bool
    role: str = ""  # preference data: chosen or rejected (a pair shows both); kto: desirable or undesirable
    total: int = field(init=False)
    trained: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", len(self.tokens))
        object.__setattr__(self, "trained", sum(1 for _, _, trained in self.tokens if trained))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tokens as ``[text, id, trained]`` lists)."""
        return {**asdict(self), "tokens": [list(token) for token in self.tokens]}


@dataclass(frozen=True)
class Preview:
    """What `data preview` shows: the examples, the format they were read as and the chat template used."""

    format: str
    chat_template: str
    examples: list[PreviewExample]
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "format": self.format,
            "chat_template": self.chat_template,
            "examples": [e.to_dict() for e in self.examples],
            "note": self.note,
        }


def preview_dataset(
    path: str,
    *,
    model: str,
    n: int = 3,
    fmt: str = "auto",
    train_on: str = "all_assistant",
    max_seq_len: int = 1024,
    mask_prompt: bool = True,
    columns: Mapping[str, str] | None = None,
    split: str = "train",
    subset: str | None = None,
) -> Preview:
    """Read the first ``n`` training examples of ``path`` and tokenize them with ``model``'s tokenizer."""
    from tunelab.hub import load_tokenizer, resolve_model_path

    train_path, _ = resolve_files(path, None)
    records = list(itertools.islice(iter_records(train_path, split=split, columns=columns, subset=subset), n))
    fmt = fmt if fmt != "auto" else detect_format(records[0])
    samples = [to_sample(record, fmt) for record in records]
    tokenizer = load_tokenizer(resolve_model_path(model))
    template, template_name = template_for(tokenizer)
    note = ""
    sequences = [part for s in samples for part in (s.pair or (s,))]
    if any(s.kind == "chat" and needs_builtin(template, s.messages, s.tools) for s in sequences):
        template, template_name = CHATML, BUILTIN_NAME  # what training does for such a dataset
        note = "the model's chat template can't render tool calls: the dataset is trained with the built-in ChatML"
    examples = preview_examples(
        samples,
        records,
        tokenizer,
        template=template,
        max_seq_len=max_seq_len,
        mask_prompt=mask_prompt,
        train_on=train_on,
    )
    return Preview(fmt, template_name, examples, note)


def preview_examples(
    samples: Sequence[Sample],
    records: Sequence[Record],
    tokenizer: Any,
    *,
    template: str,
    max_seq_len: int,
    mask_prompt: bool = True,
    train_on: str = "all_assistant",
) -> list[PreviewExample]:
    """Tokenize each sample as training does and label every token trained or not.

    A token counts as trained when it carries a label and is not the first of
    the sequence (nothing predicts the first token).  Examples are tokenized
    uncut, then cut at ``max_seq_len`` exactly as :func:`tokenize_samples` cuts.
    """
    out = []
    for sample, record in zip(samples, records, strict=True):
        for part, role in _parts(sample):
            ids, labels = _uncut(part, record, tokenizer, template, mask_prompt, train_on)
            cut_ids, cut_labels = ids[:max_seq_len], labels[:max_seq_len]
            trained = [index > 0 and label != IGNORE for index, label in enumerate(cut_labels)]
            texts = token_texts(tokenizer, cut_ids)
            out.append(
                PreviewExample(
                    path=record.path,
                    line=record.line,
                    tokens=list(zip(texts, cut_ids, trained, strict=True)),
                    full_length=len(ids),
                    truncated=len(ids) > max_seq_len,
                    dropped=not any(trained) and part.kind != "prompt",  # a GRPO prompt trains nothing itself
                    role=role,
                )
            )
    return out


def _parts(sample: Sample) -> list[tuple[Sample, str]]:
    """The sequences a sample trains: a preference pair's chosen and rejected, else the sample itself."""
    if sample.pair is not None:
        return [(sample.pair[0], "chosen"), (sample.pair[1], "rejected")]
    if sample.label is not None:
        return [(sample, "desirable" if sample.label else "undesirable")]
    return [(sample, "")]


def _uncut(
    sample: Sample, record: Record, tokenizer: Any, template: str, mask_prompt: bool, train_on: str
) -> tuple[list[int], list[int]]:
    def run(mask: bool) -> Any:
        return tokenize_samples(
            [sample],
            tokenizer,
            template=template,
            max_seq_len=_UNCUT,
            mask_prompt=mask,
            sources=[(record.path, record.line)],
            train_on=train_on,
        )

    split = run(mask_prompt)
    if len(split):
        return split.input_ids[0].tolist(), split.labels[0].tolist()
    # Nothing to train at all: show the tokens anyway (masking never changes them), all untrained.
    ids = run(False).input_ids[0].tolist()
    return ids, [IGNORE] * len(ids)


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded sequence (special tokens included)."""
    texts = []
    for index in range(len(ids)):
        start = max(0, index - _DECODE_WINDOW)
        # U+FFFD at the end means a character continues in the next token: it is shown on the token
        # that completes it, and this one shows nothing.
        before = tokenizer.decode(ids[start:index], skip_special_tokens=False).rstrip("\ufffd") if index > start else ""
        through = tokenizer.decode(ids[start : index + 1], skip_special_tokens=False)
        if through.endswith("\ufffd") and index + 1 < len(ids):
            texts.append("")
        elif through.startswith(before):
            texts.append(through[len(before) :])
        else:  # the window starts inside a character: fall back to the token alone
            texts.append(tokenizer.decode([ids[index]], skip_special_tokens=False))
    return texts


__all__ = ["Preview", "PreviewExample", "preview_dataset", "preview_examples", "token_texts"]
