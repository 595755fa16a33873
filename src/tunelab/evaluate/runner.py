"""Ask a loaded model every held-out question and score its answers.

Generation is greedy by default and goes through the same :class:`~tunelab.inference.Generator`
as `tunelab generate` and `tunelab chat`, with the same prompt format and stop tokens, so an
answer in the per-example file is exactly what those commands print for that prompt.  A
transformers model answers ``batch_size`` prompts at a time (:mod:`tunelab.evaluate.batched`),
token for token as it would one by one; a batch that runs out of memory is retried in halves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tunelab.evaluate import batched
from tunelab.evaluate.examples import EvalExample
from tunelab.evaluate.metrics import Metric
from tunelab.inference import Generator, Usage

_GREEDY = {"temperature": 0.0, "top_p": 1.0, "seed": 0}  # `tunelab generate`'s defaults


@dataclass
class EvalOutcome:
    """Scores by metric name, and one row per example (its answer and per-example scores)."""

    scores: dict[str, float]
    rows: list[dict[str, Any]] = field(default_factory=list)


def answer(generator: Generator, example: EvalExample, *, max_new_tokens: int) -> str:
    """The model's greedy answer to one example, as `tunelab generate` would print it."""
    if example.messages:
        usage = Usage()
        pieces = generator.stream_chat(list(example.messages), usage, max_tokens=max_new_tokens, **_GREEDY)
        return "".join(pieces)
    return generator.complete(example.prompt, max_new_tokens=max_new_tokens, **_GREEDY)


def evaluate(
    generator: Generator,
    examples: Sequence[EvalExample],
    metrics: Sequence[Metric],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    on_progress: Callable[[int, int], None] = lambda _done, _total: None,
    on_message: Callable[[str], None] = lambda _text: None,
) -> EvalOutcome:
    """Generate an answer for each example, then score them all with each metric."""
    predictions = answers(generator, examples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          on_progress=on_progress, on_message=on_message)  # fmt: skip
    return score(examples, predictions, metrics)


def answers(
    generator: Generator,
    examples: Sequence[EvalExample],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    on_progress: Callable[[int, int], None] = lambda _done, _total: None,
    on_message: Callable[[str], None] = lambda _text: None,
) -> list[str]:
    """The model's greedy answer to each example, in order (``batch_size`` at a time where the model batches).

    A batch that runs out of memory is retried in halves (``on_message`` says so); one prompt that
    doesn't fit alone is an :class:`~tunelab.evaluate.batched.EvalOutOfMemory`.
    """
    if batch_size > 1 and batched.can_batch(generator):
        prompts = [
            generator.conversation_ids(list(e.messages)) if e.messages else generator.prompt_ids(e.prompt)
            for e in examples
        ]
        return batched.greedy_texts(generator, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    on_progress=on_progress, on_message=on_message,
                                    labels=[e.where for e in examples])  # fmt: skip
    predictions = []
    for done, example in enumerate(examples, start=1):
        predictions.append(_alone(generator, example, max_new_tokens))
        on_progress(done, len(examples))
    return predictions


def _alone(generator: Generator, example: EvalExample, max_new_tokens: int) -> str:
    """:func:`answer`, with running out of memory on this one prompt told as the user's error it is."""
    try:
        return answer(generator, example, max_new_tokens=max_new_tokens)
    except Exception as exc:
        if not generator.backend.is_out_of_memory(exc):
            raise
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    raise batched.out_of_memory(example.where, reason)


def score(examples: Sequence[EvalExample], predictions: Sequence[str], metrics: Sequence[Metric]) -> EvalOutcome:
    """Each metric over the answers, and one row per example with its per-example scores."""
    references = [e.reference for e in examples]
    fields = [e.fields or {} for e in examples]
    scored = {m.name: m.score(predictions, references, fields) for m in metrics}
    rows = []
    for i, (example, prediction) in enumerate(zip(examples, predictions, strict=True)):
        row: dict[str, Any] = {"where": example.where, "reference": example.reference, "prediction": prediction}
        row["prompt"] = list(example.messages) if example.messages else example.prompt
        row["scores"] = {name: s.per_example[i] for name, s in scored.items() if s.per_example is not None}
        rows.append(row)
    return EvalOutcome({name: s.value for name, s in scored.items()}, rows)
