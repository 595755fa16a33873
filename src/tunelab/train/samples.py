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
        return [
            {"prompt": text, "answer": _greedy(backend, ids, self.stops, self.max_new_tokens, self.tokenizer)}
            for text, ids in zip(self.texts, self.prompts, strict=True)
        ]


@dataclass(frozen=True)
class Scorer:
    """``train.eval_metrics``: the first validation examples, their prompts as ids, and the metrics to score."""

    examples: tuple[Any, ...]  # tunelab.evaluate.examples.EvalExample
    prompts: tuple[tuple[int, ...], ...]
    metrics: tuple[Any, ...]  # tunelab.evaluate.metrics.Metric
    stops: tuple[int, ...]
    max_new_tokens: int
    tokenizer: Any

    def __call__(self, backend: Backend) -> dict[str, float]:
        """``eval/<metric>`` of the model as it is now, scored as `tunelab eval` scores its answers."""
        from tunelab.evaluate.runner import score

        answers = [_greedy(backend, ids, self.stops, self.max_new_tokens, self.tokenizer) for ids in self.prompts]
        return {f"eval/{name}": value for name, value in score(self.examples, answers, self.metrics).scores.items()}


def build_scorer(examples: Sequence[Any], metrics: Sequence[Any], *, tokenizer: Any, chat: bool,
                 max_new_tokens: int) -> Scorer:  # fmt: skip
    """Prompt ids for ``examples`` (a chat's turns before its answer, or a completion's prompt), as eval asks them."""
    from tunelab.inference import prompt_token_ids, stop_ids

    asked = [list(e.messages) if e.messages else [{"role": "user", "content": e.prompt}] for e in examples]
    ids = tuple(tuple(prompt_token_ids(tokenizer, messages, chat=chat)) for messages in asked)
    return Scorer(tuple(examples), ids, tuple(metrics), tuple(stop_ids(tokenizer)), max_new_tokens, tokenizer)


def _greedy(backend: Backend, ids: Sequence[int], stops: Sequence[int], max_new_tokens: int, tokenizer: Any) -> str:
    """The greedy answer to ``ids``, up to its first stop token, decoded."""
    tokens: list[int] = []
    generated = backend.generate(
        list(ids), max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, stop_ids=list(stops), seed=0
    )
    for token in generated:
        if token in stops:
            break
        tokens.append(token)
    close = getattr(generated, "close", None)  # a generator: stop its loop now (and free its cache)
    if close is not None:
        close()
    return str(tokenizer.decode(tokens, skip_special_tokens=True))


def build_sampler(prompts: Sequence[str], *, tokenizer: Any, chat: bool, max_new_tokens: int) -> Sampler:
    """Token ids for ``prompts``, each a user turn, as `tunelab generate` builds them for this run's format."""
    from tunelab.inference import prompt_token_ids, stop_ids

    ids = tuple(tuple(prompt_token_ids(tokenizer, [{"role": "user", "content": t}], chat=chat)) for t in prompts)
    return Sampler(tuple(prompts), ids, tuple(stop_ids(tokenizer)), max_new_tokens, tokenizer)
