"""Record formats: detect which one a file uses and validate every record against it.

Each record becomes a :class:`Sample`, the one normalised shape the tokenizer
sees: either plain text, a prompt/completion pair, or a list of chat messages
(alpaca-style instructions are turned into a two-message chat so they use the
model's own chat template, exactly as at inference time).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunelab.data.sources import Record
from tunelab.errors import DataError
from tunelab.vocab import DATA_FORMATS

FORMATS = tuple(f for f in DATA_FORMATS if f != "auto")  # what "auto" chooses between
ROLES = ("system", "user", "assistant", "tool")
NO_ANSWER = "has no assistant message"  # a conversation without one: nothing to learn for SFT (GRPO: a prompt)
# ShareGPT speakers -> chat roles.  `function_call` turns hold a JSON call the assistant makes and
# `observation` turns the tool's answer (the LLaMA-Factory flavour); user/assistant are common aliases.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function_call": "assistant",
}


@dataclass(frozen=True)
class Sample:
    """A validated example: ``kind`` is text, completion, chat, pair or prompt (``tools`` only for chats that
    declare them; a ``prompt`` is a GRPO prompt: ``prompt`` text, or ``messages`` that end before the reply).

    A ``pair`` (preference data) holds its chosen and rejected sequences in ``pair``, each a completion or a
    chat; a KTO example is a completion or chat with ``label`` set.  In a chat from preference or KTO data,
    the first ``prompt_turns`` messages are the prompt and carry no loss, whatever role they have.
    """

    kind: str
    text: str = ""
    prompt: str = ""
    completion: str = ""
    messages: tuple[dict[str, Any], ...] = ()
    tools: tuple[dict[str, Any], ...] = ()
    pair: tuple[Sample, Sample] | None = None
    label: bool | None = None
    prompt_turns: int = 0


def detect_format(record: Record) -> str:
    """Guess the format from the keys of the first record."""
    keys = set(record.data)
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"completion", "label"} <= keys:
        return "kto"
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if {"prompt", "completion"} <= keys:
        return "completion"
    if "prompt" in keys:  # a prompt and no response: GRPO samples the responses
        return "grpo"
    if {"instruction", "output"} <= keys:
        return "instruction"
    if "text" in keys:
        return "text"
    raise DataError(
        f"can't tell the format from the keys {sorted(keys)}",
        path=record.path,
        line=record.line,
        hint='use {"text"}, {"prompt","completion"}, {"instruction","input","output"}, {"messages":[…]}, '
        '{"conversations":[{"from","value"}…]}, {"prompt","chosen","rejected"}, {"prompt","completion","label"} or '
        '{"prompt", …} (grpo), '
        "map your fields with data.columns, or set data.format",
    )


def to_sample(record: Record, fmt: str) -> Sample:
    """Validate one record as ``fmt`` (not ``auto``) and normalise it."""
    convert = _CONVERTERS.get(fmt)
    if convert is None:
        raise DataError(f"unknown data format {fmt!r}", hint=f"use one of auto, {', '.join(FORMATS)}")
    return convert(record)


def to_samples(records: Sequence[Record], fmt: str) -> list[Sample]:
    """Validate every record as ``fmt`` and normalise it; the first bad record raises."""
    if fmt == "auto":
        fmt = detect_format(records[0])
    return [to_sample(record, fmt) for record in records]


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
    return Sample("chat", messages=_clean_messages(messages, r, "messages"), tools=_tools(r))


def _sharegpt(r: Record) -> Sample:
    turns = r.data.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError('"conversations" must be a non-empty list of {from, value}', path=r.path, line=r.line)
    messages: list[dict[str, Any]] = []
    system = r.data.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for index, turn in enumerate(turns):
        where = f"conversations[{index}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where} must be an object with from and value", path=r.path, line=r.line)
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise DataError(
                f"{where}: from {speaker!r} is not one of {', '.join(SHAREGPT_ROLES)}",
                path=r.path,
                line=r.line,
                hint="rename the speaker, or convert the file to chat messages",
            )
        value = turn.get("value")
        if speaker != "function_call" and not isinstance(value, str):
            raise DataError(f"{where}: value must be a string", path=r.path, line=r.line)
        if speaker == "function_call":
            messages.append({"role": "assistant", "content": None, "tool_calls": _sharegpt_calls(value, where, r)})
        else:
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return Sample("chat", messages=_clean_messages(messages, r, "conversations"), tools=_tools(r))


def _sharegpt_calls(value: Any, where: str, r: Record) -> list[dict[str, Any]]:
    """A function_call turn's value: JSON ``{name, arguments}`` (or a list of them) as OpenAI tool calls."""
    try:
        parsed = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        parsed = None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls or not all(isinstance(c, dict) and "name" in c for c in calls):
        raise DataError(
            f'{where}: a function_call value must be JSON {{"name": …, "arguments": {{…}}}}', path=r.path, line=r.line
        )
    return [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}} for c in calls]


def _clean_messages(messages: list[Any], r: Record, field: str, *, learn: bool = True) -> tuple[dict[str, Any], ...]:
    clean: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise DataError(f"{where} must be an object with role and content", path=r.path, line=r.line)
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}", path=r.path, line=r.line)
        content = message.get("content")
        calls = message.get("tool_calls") if role == "assistant" else None
        if not isinstance(content, str) and not (content is None and calls):
            raise DataError(f"{where}: content must be a string", path=r.path, line=r.line)
        entry = {k: v for k, v in message.items() if v is not None or k == "content"}
        if calls:
            entry["tool_calls"] = _tool_calls(calls, where, r)
        clean.append(entry)
    if learn and not any(m["role"] == "assistant" for m in clean):
        what = "conversation" if field in ("messages", "conversations") else f'"{field}"'
        raise DataError(f"{what} {NO_ANSWER}, so there is nothing to learn", path=r.path, line=r.line)
    return tuple(clean)


def _tool_calls(calls: Any, where: str, r: Record) -> list[dict[str, Any]]:
    """OpenAI-style calls, with ``arguments`` always an object (templates expect a mapping to render)."""
    if not isinstance(calls, list):
        raise DataError(f"{where}: tool_calls must be a list", path=r.path, line=r.line)
    out = []
    for index, call in enumerate(calls):
        at = f"{where}.tool_calls[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise DataError(
                f'{at} must be {{"type": "function", "function": {{"name", "arguments"}}}}', path=r.path, line=r.line
            )
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise DataError(f"{at}: arguments are not valid JSON ({exc.msg})", path=r.path, line=r.line) from None
        if not isinstance(arguments, dict):
            raise DataError(f"{at}: arguments must be a JSON object", path=r.path, line=r.line)
        normal = {"type": call.get("type", "function"), "function": {"name": function["name"], "arguments": arguments}}
        if call.get("id") is not None:
            normal["id"] = call["id"]
        out.append(normal)
    return out


def _tools(r: Record) -> tuple[dict[str, Any], ...]:
    """A record's top-level tool list (JSON text is accepted: ShareGPT exports often store it so)."""
    tools = r.data.get("tools")
    if tools is None or tools == "":
        return ()
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise DataError(f'"tools" is not valid JSON ({exc.msg})', path=r.path, line=r.line) from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError('"tools" must be a list of tool definitions (objects)', path=r.path, line=r.line)
    return tuple(tools)


def _string(r: Record, key: str, *, allow_empty: bool = False) -> str:
    if key not in r.data or r.data[key] is None:
        raise DataError(f'missing field "{key}"', path=r.path, line=r.line)
    value = r.data[key]
    if not isinstance(value, str):
        raise DataError(f'field "{key}" must be a string, got {type(value).__name__}', path=r.path, line=r.line)
    if not allow_empty and not value.strip():
        raise DataError(f'field "{key}" is empty', path=r.path, line=r.line)
    return value


def _preference(r: Record) -> Sample:
    """``{"prompt", "chosen", "rejected"}``: strings (the completion convention) or message lists (chat)."""
    values = [r.data.get(key) for key in ("prompt", "chosen", "rejected")]
    if not any(isinstance(v, list) for v in values):
        prompt = _string(r, "prompt", allow_empty=True) if "prompt" in r.data else ""
        chosen, rejected = _string(r, "chosen"), _string(r, "rejected")
        _differ(chosen.strip() == rejected.strip(), r)
        pair = (
            Sample("completion", prompt=prompt, completion=chosen),
            Sample("completion", prompt=prompt, completion=rejected),
        )
        return Sample("pair", pair=pair)
    if values[0] is None:  # no prompt: the turns chosen and rejected share are the prompt
        full = [_turns(r, key, "assistant", learn=False) for key in ("chosen", "rejected")]
        shared = next((i for i, (a, b) in enumerate(zip(*full, strict=False)) if a != b), min(map(len, full)))
        prompt_turns, responses = full[0][:shared], [side[shared:] for side in full]
    else:
        prompt_turns = _turns(r, "prompt", "user", learn=False)
        responses = [_turns(r, key, "assistant", learn=False) for key in ("chosen", "rejected")]
    _differ(responses[0] == responses[1], r)
    for key, turns in zip(("chosen", "rejected"), responses, strict=True):
        if not any(m["role"] == "assistant" for m in turns):
            raise DataError(f'"{key}" has no assistant message after the prompt', path=r.path, line=r.line)
    tools, n = _tools(r), len(prompt_turns)
    chosen_chat, rejected_chat = (
        Sample("chat", messages=prompt_turns + t, tools=tools, prompt_turns=n) for t in responses
    )
    return Sample("pair", pair=(chosen_chat, rejected_chat))


def _differ(same: bool, r: Record) -> None:
    if same:
        raise DataError(
            '"chosen" and "rejected" are the same response, so there is nothing to prefer',
            path=r.path,
            line=r.line,
            hint="drop the record or give a rejected response that differs",
        )


def _kto(r: Record) -> Sample:
    """``{"prompt", "completion", "label": true|false}``: strings or message lists, labelled desirable or not."""
    label = r.data.get("label")
    if not isinstance(label, bool):
        raise DataError(
            f'field "label" must be true or false (a JSON boolean), got {label!r}',
            path=r.path,
            line=r.line,
            hint="true marks a desirable completion, false an undesirable one",
        )
    prompt, completion = r.data.get("prompt"), r.data.get("completion")
    if not isinstance(prompt, list) and not isinstance(completion, list):
        text = _string(r, "prompt", allow_empty=True) if "prompt" in r.data else ""
        return Sample("completion", prompt=text, completion=_string(r, "completion"), label=label)
    turns = _turns(r, "prompt", "user", learn=False) if prompt is not None else ()
    answer = _turns(r, "completion", "assistant")
    return Sample("chat", messages=turns + answer, tools=_tools(r), prompt_turns=len(turns), label=label)


def _turns(r: Record, key: str, role: str, *, learn: bool = True) -> tuple[dict[str, Any], ...]:
    """A field that is a message list, or a string taken as one ``role`` message."""
    value = r.data.get(key)
    if isinstance(value, list):
        if not value:
            raise DataError(f'"{key}" is an empty list of messages', path=r.path, line=r.line)
        return _clean_messages(value, r, key, learn=learn)
    return ({"role": role, "content": _string(r, key, allow_empty=role == "user")},)


def _grpo(r: Record) -> Sample:
    """``{"prompt": text or messages}`` or ``{"messages"}``: what GRPO samples completions for.

    The record's other fields (an ``answer``…) are for the reward functions and are not checked here.
    """
    key = "prompt" if "prompt" in r.data else "messages"
    value = r.data.get(key)
    if not isinstance(value, list):
        if key == "messages":
            raise DataError('missing field "prompt" (text or messages) or "messages"', path=r.path, line=r.line)
        return Sample("prompt", prompt=_string(r, "prompt"))
    turns = _turns(r, key, "user", learn=False)
    if turns[-1]["role"] == "assistant":
        raise DataError(
            f'"{key}" ends with an assistant message; grpo samples the assistant\'s reply',
            path=r.path,
            line=r.line,
            hint="end the prompt with the user's turn (move the reference answer to a field such as answer)",
        )
    return Sample("prompt", messages=turns, tools=_tools(r), prompt_turns=len(turns))


_CONVERTERS = {
    "text": _text,
    "completion": _completion,
    "instruction": _instruction,
    "chat": _chat,
    "sharegpt": _sharegpt,
    "preference": _preference,
    "kto": _kto,
    "grpo": _grpo,
}
