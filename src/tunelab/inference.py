"""Generate with a base model or a base model plus an adapter — streaming text out."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.backends.base import Backend, ModelSpec
from tunelab.backends.select import choose_backend, is_mlx_quantized, make_backend, model_type_of
from tunelab.data.templates import template_for
from tunelab.data.tokenize import special_prefix
from tunelab.errors import ModelError
from tunelab.hub import load_tokenizer, resolve_model_path

# End-of-turn markers of common chat templates; generation stops on any that the vocabulary has.
_TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


@dataclass
class Usage:
    """Token counts and why generation ended (OpenAI's ``usage`` and ``finish_reason``)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"


@dataclass
class Generator:
    """A loaded model ready to answer prompts."""

    backend: Backend
    tokenizer: Any
    chat: bool

    def stream(
        self, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0
    ) -> Iterator[str]:
        """Yield pieces of text as tokens are generated (decoded incrementally, so UTF-8 stays whole)."""
        ids = self.prompt_ids(prompt)
        stops = stop_ids(self.tokenizer)
        tokens = self.backend.generate(
            ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop_ids=stops, seed=seed
        )

        def until_stop() -> Iterator[int]:
            for token in tokens:
                if token in stops:
                    tokens.close()  # type: ignore[attr-defined]
                    return
                yield token

        yield from decode_pieces(self.tokenizer, until_stop())

    def stream_chat(
        self, messages: list[dict[str, str]], usage: Usage, *, max_tokens: int, **sampling: Any
    ) -> Iterator[str]:
        """Answer a conversation (the last message alone for a plain-text model), counting into ``usage``."""
        ids = self.conversation_ids(messages)
        usage.prompt_tokens = len(ids)
        stops = stop_ids(self.tokenizer)
        usage.finish_reason = "length"
        usage.completion_tokens = 0

        def until_stop() -> Iterator[int]:
            for token in self.backend.generate(ids, max_new_tokens=max_tokens, stop_ids=stops, **sampling):
                if token in stops:
                    usage.finish_reason = "stop"
                    return
                usage.completion_tokens += 1
                yield token

        yield from decode_pieces(self.tokenizer, until_stop())

    def conversation_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return prompt_token_ids(self.tokenizer, messages, chat=self.chat)

    def complete(self, prompt: str, **kwargs: Any) -> str:
        return "".join(self.stream(prompt, **kwargs))

    def prompt_ids(self, prompt: str) -> list[int]:
        return prompt_token_ids(self.tokenizer, [{"role": "user", "content": prompt}], chat=self.chat)


def decode_pieces(tokenizer: Any, tokens: Iterable[int]) -> Iterator[str]:
    """The text of ``tokens`` as it grows, one new piece per token (decoded whole each time, so UTF-8 stays whole).

    The one place generated ids become text: a streamed answer and a batched eval answer of the same tokens
    join to the same string.
    """
    out: list[int] = []
    shown = ""
    for token in tokens:
        out.append(token)
        text = tokenizer.decode(out, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            continue
        yield text[len(shown) :]
        shown = text


def prompt_token_ids(tokenizer: Any, messages: Sequence[dict[str, Any]], *, chat: bool) -> list[int]:
    """The ids a model is asked: the conversation through the chat template, ending on an open assistant turn,
    or for a plain-text model the last message's text after the tokenizer's special prefix (BOS).

    The one place prompts become ids, so `generate`, `chat`, `eval` and training samples ask alike.
    """
    if not chat:
        text = messages[-1]["content"]
        return special_prefix(tokenizer) + list(tokenizer(text, add_special_tokens=False)["input_ids"])
    template, _ = template_for(tokenizer)
    text = tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_ids(tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in _TURN_ENDS if t in vocab)
    return sorted(ids)


def load_generator(
    *, model: str, adapter: str | None = None, chat: bool | None = None, device: str = "auto", backend: str = "auto"
) -> Generator:
    """Load ``model`` (plus ``adapter``) for generation; ``chat`` defaults to "the tokenizer has a template"."""
    folder = resolve_model_path(model)
    adapter_dir = Path(adapter).expanduser() if adapter else None
    if adapter_dir is not None and not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"--adapter: {adapter_dir} has no adapter_config.json, so it is not a PEFT adapter")
    # A run's adapter folder carries the tokenizer (and chat template) used in training: prefer it.
    tok_dir = adapter_dir if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file() else folder
    tokenizer = load_tokenizer(tok_dir)
    method = _adapter_method(adapter_dir) if adapter_dir is not None else "full"
    choice = choose_backend(backend, method, model_type=model_type_of(folder), mlx_quantized=is_mlx_quantized(folder))
    engine = make_backend(choice)
    engine.load_inference(ModelSpec(str(folder), device=device), adapter_dir, tokenizer)
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    return Generator(engine, tokenizer, chat)


def _adapter_method(folder: Path) -> str:
    """The tunelab method an adapter folder holds (so a backend that can serve it is chosen)."""
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    kind = config.get("peft_type", "LORA")
    if kind == "LORA":
        return "dora" if config.get("use_dora") else "lora"
    return {"IA3": "ia3", "PREFIX_TUNING": "prefix"}.get(kind, kind.lower())


__all__ = ["Generator", "Usage", "decode_pieces", "load_generator", "stop_ids"]
