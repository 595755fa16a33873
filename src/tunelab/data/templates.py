"""Chat templates and which spans of a rendered conversation carry loss.

The tokenizer's own template is used when it has one; otherwise a built-in
ChatML template, and the run records which (a wrong template after export is
the most common way a fine-tune "talks garbage").  Assistant spans are found
by rendering growing prefixes of the conversation, so masking is correct for
any template that renders a conversation as a prefix of its continuation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunelab.errors import DataError

# ChatML, extended so tool use reads plainly: declared tools in a leading system block, each call
# as a <tool_call> JSON line inside the assistant turn, tool results as `tool` turns.  Conversations
# without tools render exactly as plain ChatML.
CHATML = (
    "{% if tools %}{{ '<|im_start|>system\\n# Tools\\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson)"
    " + '</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BUILTIN_NAME = "chatml-builtin"
TOKENIZER_NAME = "tokenizer"


def template_for(tokenizer: Any) -> tuple[str, str]:
    """Return ``(template, name)``: the tokenizer's own, or the built-in ChatML one."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own.strip():
        return own, TOKENIZER_NAME
    return CHATML, BUILTIN_NAME


class TemplateLacksTools(DataError):
    """A conversation uses tools that the dataset's chat template can't render.

    Raised while tokenizing; :func:`tunelab.data.prepare.prepare_data` catches
    it and tokenizes the whole dataset with the built-in template instead, so
    every example (and the template saved with the adapter) agrees.
    """


def needs_builtin(template: str, messages: Sequence[dict[str, Any]], tools: Sequence[Any] = ()) -> bool:
    """Whether ``template`` would silently drop this conversation's tool calls or tool list."""
    return template_for_sample(template, messages, tools) != template


def template_for_sample(template: str, messages: Sequence[dict[str, Any]], tools: Sequence[Any] = ()) -> str:
    """``template``, unless the sample uses tools it can't render: then the built-in ChatML.

    A template that never mentions ``tool_calls`` (or ``tools``) silently drops
    them, so the model would be trained on turns missing what it should learn.
    """
    if any(m.get("tool_calls") for m in messages) and "tool_calls" not in template:
        return CHATML
    if tools and "tools" not in template:
        return CHATML
    return template


def render(
    tokenizer: Any,
    template: str,
    messages: Sequence[dict[str, Any]],
    *,
    generation_prompt: bool,
    tools: Sequence[dict[str, Any]] = (),
) -> str:
    """Render messages (and the tools they may call) to text with ``template`` (never tokenizes)."""
    out = tokenizer.apply_chat_template(
        list(messages),
        tools=list(tools) or None,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )
    return str(out)


def chat_segments(
    tokenizer: Any,
    template: str,
    messages: Sequence[dict[str, Any]],
    *,
    where: tuple[str, int],
    train_on: str = "all_assistant",
    tools: Sequence[dict[str, Any]] = (),
    skip: int = 0,
) -> list[tuple[str, bool]]:
    """Split a rendered conversation into ``(text, trained)`` pieces.

    Each assistant turn (only the final one with ``train_on="last_assistant"``),
    including the end-of-turn marker the template puts after it, is a trained
    piece; everything else (system, user, tool turns and the assistant header)
    is not.  ``train_on="everything"`` trains the whole rendered text.  The
    first ``skip`` messages (a preference pair's shared prompt) are never trained.
    """
    full = render(tokenizer, template, messages, generation_prompt=False, tools=tools)
    if train_on == "everything":
        return [(full, True)] if full else []
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= skip]
    trained = assistants[-1:] if train_on == "last_assistant" else assistants
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for index in trained:
        before = render(tokenizer, template, messages[:index], generation_prompt=True, tools=tools) if index else ""
        through = render(tokenizer, template, messages[: index + 1], generation_prompt=False, tools=tools)
        if not through.startswith(before) or not full.startswith(through) or len(before) < cursor:
            raise DataError(
                "the chat template does not render this conversation as a prefix of its continuation, "
                "so assistant turns can't be located for masking",
                path=where[0],
                line=where[1],
                hint="set data.mask_prompt=false to train on every token",
            )
        # The turn's end marker is trained (it is how the model learns to stop); whitespace the
        # template adds after it is not, as generation never reaches it.
        end = len(before) + len(through[len(before) :].rstrip())
        pieces.append((full[cursor : len(before)], False))
        pieces.append((full[len(before) : end], True))
        cursor = end
    pieces.append((full[cursor:], False))
    return [(text, trained) for text, trained in pieces if text]
