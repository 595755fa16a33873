"""Chat: a conversation with a loaded model that keeps its history, for `tunelab chat` and `generate --system`.

The conversation is rendered through the model's own chat template (a run's is the one it
trained with, saved next to its adapter) and each answer stops on that template's end-of-turn
tokens, exactly as the API's chat completions do; this module only keeps the turns.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import ConfigError
from tunelab.services.models import generator_for_run, load_generator, new_usage, stream_chat
from tunelab.services.runs import show_run


@dataclass(frozen=True)
class Sampling:
    """How each answer is drawn: at most ``max_tokens`` tokens; temperature 0 is greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class ChatSession:
    """The turns so far and an optional system prompt; :meth:`send` streams the next answer."""

    generator: Any
    label: str
    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)

    @property
    def keeps_history(self) -> bool:
        """False for a model without a chat template: each message is then a fresh plain-text prompt."""
        return bool(self.generator.chat)

    def set_system(self, text: str | None) -> None:
        """Use ``text`` as the system prompt from the next answer on (None or empty: none)."""
        if text and not self.keeps_history:
            raise ConfigError(
                f"{self.label} has no chat template (it trained on plain text), so it has no system prompt",
                hint="put the instruction in the prompt itself",
            )
        self.system = text or None

    def reset(self) -> int:
        """Forget the turns (the system prompt stays); returns how many exchanges were forgotten."""
        forgotten = len(self.turns) // 2
        self.turns.clear()
        return forgotten

    def messages(self, text: str) -> list[dict[str, str]]:
        """What the model sees for the next answer: the system prompt, the turns so far, then ``text``."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        history = self.turns if self.keeps_history else []
        return [*head, *history, {"role": "user", "content": text}]

    def send(self, text: str, sampling: Sampling = Sampling()) -> Iterator[str]:
        """Stream the answer to ``text``; the turn joins the history once the answer is complete."""
        pieces: list[str] = []
        sampler = dict(temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed)
        for piece in stream_chat(
            self.generator, self.messages(text), new_usage(), max_tokens=sampling.max_tokens, **sampler
        ):
            pieces.append(piece)
            yield piece
        self.turns += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces)}]


def open_chat(
    *,
    run: str | None = None,
    model: str | None = None,
    adapter: str | None = None,
    system: str | None = None,
    backend: str | None = None,
    chat: bool | None = None,
) -> ChatSession:
    """Load a finished run's model (or ``model`` plus an ``adapter``) and start an empty conversation.

    ``chat`` forces the chat template on or off (default: a run's trained format, else whether the
    tokenizer has a template).
    """
    if run:
        generator = generator_for_run(run, backend=backend)
        if chat is not None:
            generator.chat = chat
        label = f"run {show_run(run).id}"
    elif model:
        generator = load_generator(model=model, adapter=adapter, chat=chat, backend=backend or "auto")
        label = model + (f" + {adapter}" if adapter else "")
    else:
        raise ConfigError("give a run id (tunelab chat RUN_ID), or --model PATH (optionally with --adapter PATH)")
    session = ChatSession(generator, label)
    session.set_system(system)
    return session


__all__ = ["ChatSession", "Sampling", "open_chat"]
