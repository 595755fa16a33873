"""Record formats: detect which one a file uses and validate every record against it.

Each record becomes a :class:`Sample`, the one normalised shape the tokenizer
sees: either plain text, a prompt/completion pair, or a list of chat messages
(alpaca-style instructions are turned into a two-message chat so they use the
model's own chat template, exactly as at inference time).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunelab.data.sources import Record
from tunelab.errors import DataError

FORMATS = ("text", "completion", "instruction", "chat")
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Sample:
    """A validated example: ``kind`` is text, completion or chat."""

    kind: str
    text: str = ""
    prompt: str = ""
    completion: str = ""
    messages: tuple[dict[str, Any], ...] = ()


def detect_format(record: Record) -> str:
    """Guess the format from the keys of the first record."""
    keys = set(record.data)
    if "messages" in keys:
        return "chat"
    if {"prompt", "completion"} <= keys:
        return "completion"
    if {"instruction", "output"} <= keys:
        return "instruction"
    if "text" in keys:
        return "text"
    raise DataError(
        f"can't tell the format from the keys {sorted(keys)}",
        path=record.path,
        line=record.line,
        hint='use {"text"}, {"prompt","completion"}, {"instruction","input","output"} or {"messages":[…]}, '
        "or set data.format",
    )


def to_samples(records: Sequence[Record], fmt: str) -> list[Sample]:
    """Validate every record as ``fmt`` and normalise it; the first bad record raises."""
    if fmt == "auto":
        fmt = detect_format(records[0])
    convert = {"text": _text, "completion": _completion, "instruction": _instruction, "chat": _chat}[fmt]
    return [convert(record) for record in records]


def _text(r: Record) -> Sample:
    return Sample("text", text=_string(r, "text"))


def _completion(r: Record) -> Sample:
    return Sample("completion", prompt=_string(r, "prompt", allow_empty=True), completion=_string(r, "completion"))


def _instruction(r: Record) -> Sample:
    instruction = _string(r, "instruction")
    extra = r.data.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(f'field "input" must be a string, got {type(extra).__name__}', path=r.path, line=r.line)
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    messages = ({"role": "user", "content": user}, {"role": "assistant", "content": _string(r, "output")})
    return Sample("chat", messages=messages)


def _chat(r: Record) -> Sample:
    messages = r.data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError('"messages" must be a non-empty list of {role, content}', path=r.path, line=r.line)
    clean: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise DataError(f"{where} must be an object with role and content", path=r.path, line=r.line)
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}", path=r.path, line=r.line)
        content = message.get("content")
        has_calls = role == "assistant" and bool(message.get("tool_calls"))
        if not isinstance(content, str) and not (content is None and has_calls):
            raise DataError(f"{where}: content must be a string", path=r.path, line=r.line)
        clean.append({k: v for k, v in message.items() if v is not None or k == "content"})
    if not any(m["role"] == "assistant" for m in clean):
        raise DataError("conversation has no assistant message, so there is nothing to learn", path=r.path, line=r.line)
    return Sample("chat", messages=tuple(clean))


def _string(r: Record, key: str, *, allow_empty: bool = False) -> str:
    if key not in r.data or r.data[key] is None:
        raise DataError(f'missing field "{key}"', path=r.path, line=r.line)
    value = r.data[key]
    if not isinstance(value, str):
        raise DataError(f'field "{key}" must be a string, got {type(value).__name__}', path=r.path, line=r.line)
    if not allow_empty and not value.strip():
        raise DataError(f'field "{key}" is empty', path=r.path, line=r.line)
    return value
