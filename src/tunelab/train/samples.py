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


def build_sampler(prompts: Sequence[str], *, tokenizer: Any, chat: bool, max_new_tokens: int) -> Sampler:
    """Token ids for ``prompts``, each a user turn, as `tunelab generate` builds them for this run's format."""
    from tunelab.inference import prompt_token_ids, stop_ids

    ids = tuple(tuple(prompt_token_ids(tokenizer, [{"role": "user", "content": t}], chat=chat)) for t in prompts)
    return Sampler(tuple(prompts), ids, tuple(stop_ids(tokenizer)), max_new_tokens, tokenizer)
