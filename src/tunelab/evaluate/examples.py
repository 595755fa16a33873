"""Held-out records as eval examples: the prompt a model is asked, and the answer the data expects.

A chat's prompt is every message before its last assistant turn, and the reference is that turn; a
completion's prompt and reference are its two fields (an instruction record is a chat).  Plain text has
no answer to compare with, and preference/KTO data is scored by its own objective, so both are refused.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.formats import detect_format, to_sample
from tunelab.data.sources import iter_records, resolve_files
from tunelab.errors import DataError

GENERATIVE = ("chat", "completion")


@dataclass(frozen=True)
class EvalExample:
    """One question: ``messages`` for a chat (ending before the answer), else ``prompt``; ``where`` is file:line."""

    reference: str
    where: str
    prompt: str = ""
    messages: tuple[dict[str, Any], ...] = ()
    fields: dict[str, Any] | None = None  # the record's other fields, for user metrics (e.g. an "answer" column)


def _source(name: Path | str) -> Path | str:
    path = Path(name).expanduser()
    if path.is_dir():
        _train, valid = resolve_files(str(path), None)
        if valid is None:
            raise DataError(f"folder {path} has no validation file", hint="give the held-out file itself")
        return valid
    if path.exists():
        return path
    text = str(name)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.suffix:
        return text  # owner/name: a hub dataset
    raise DataError(f"{name} does not exist", hint="give a held-out file (JSONL, JSON, CSV, Parquet) or a folder")


def load_examples(path: Path | str, *, fmt: str = "auto", limit: int | None = None) -> list[EvalExample]:
    """The first ``limit`` examples of ``path`` (all by default), each with its reference answer.

    ``path`` is a file, a folder (its validation file: valid.*, validation.*, …) or a hub dataset name.
    """
    records = iter_records(_source(path), split="validation")
    out: list[EvalExample] = []
    chosen = fmt
    for record in itertools.islice(records, limit):
        if chosen == "auto":
            chosen = detect_format(record)
        sample = to_sample(record, chosen)
        where = f"{record.path}:{record.line}"
        if sample.kind not in GENERATIVE:
            raise DataError(
                f"{sample.kind} examples have no reference answer to score a generation against",
                path=record.path,
                line=record.line,
                hint="evaluate on chat ({messages}) or completion ({prompt, completion}) data",
            )
        if sample.kind == "completion":
            out.append(EvalExample(sample.completion, where, prompt=sample.prompt, fields=record.data))
            continue
        last = max((i for i, m in enumerate(sample.messages) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            raise DataError("a chat needs a turn before its last assistant answer", path=record.path, line=record.line)
        content = sample.messages[last].get("content")
        if not isinstance(content, str):
            raise DataError("the last assistant turn has no text to compare with", path=record.path, line=record.line)
        out.append(EvalExample(content, where, messages=sample.messages[:last], fields=record.data))
    return out
