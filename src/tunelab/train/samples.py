"""Sample answers while training: a few fixed prompts answered greedily every ``train.sample_every`` steps.

Loss says a run is learning; a handful of answers says *what* it is learning (the format, the
facts, the stop token).  The prompts go through the run's own prompt format, as `tunelab generate`
builds it, so a sample at the last step is what the finished run answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunelab.backends.base import Backend


@dataclass(frozen=True)
class Sampler:
    """Fixed prompts (their text and token ids) and how to answer them."""

    texts: tuple[str, ...]
    prompts: tuple[tuple[int, ...], ...]
    stops: tuple[int, ...]
    max_new_tokens: int
    tokenizer: Any

    def __call__(self, backend: Backend) -> list[dict[str, str]]:
        """Each prompt's greedy answer from the model as it is now."""
        out = []
        for text, ids in zip(self.texts, self.prompts, strict=True):
            tokens: list[int] = []
            generated = backend.generate(
                list(ids), max_new_tokens=self.max_new_tokens, temperature=0.0, top_p=1.0, stop_ids=self.stops, seed=0
            )
            for token in generated:
                if token in self.stops:
                    break
                tokens.append(token)
            close = getattr(generated, "close", None)  # a generator: stop its loop now (and free its cache)
            if close is not None:
                close()
            out.append({"prompt": text, "answer": str(self.tokenizer.decode(tokens, skip_special_tokens=True))})
        return out


def build_sampler(
    prompts: Sequence[str], *, tokenizer: Any, chat: bool, template: str | None, max_new_tokens: int
) -> Sampler:
    """Token ids for ``prompts``: a user turn through the chat ``template``, or the plain text after BOS."""
    from tunelab.data.tokenize import special_prefix
    from tunelab.inference import stop_ids

    ids = []
    for text in prompts:
        if chat:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], chat_template=template, tokenize=False, add_generation_prompt=True
            )
            ids.append(tuple(tokenizer(rendered, add_special_tokens=False)["input_ids"]))
        else:
            ids.append(tuple(special_prefix(tokenizer) + list(tokenizer(text, add_special_tokens=False)["input_ids"])))
    return Sampler(tuple(prompts), tuple(ids), tuple(stop_ids(tokenizer)), max_new_tokens, tokenizer)
