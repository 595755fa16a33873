"""The metrics `tunelab eval` scores with: built-ins by name, or a user's own as ``module:function``.

Each metric turns (prediction, reference) pairs into one score.  Most are the mean of a
per-example score (so the per-example file can show which examples failed); BLEU is
corpus-level, as sacrebleu defines it.  BLEU and ROUGE-L come from sacrebleu and
rouge-score rather than being re-derived here, so the numbers match what others report.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tunelab.errors import ConfigError, DataError

PerExample = Callable[[str, str, dict[str, Any]], float]


@dataclass(frozen=True)
class Metric:
    """A named metric: ``per_example`` scores are averaged unless ``corpus`` scores the whole set at once."""

    name: str
    per_example: PerExample | None = None
    corpus: Callable[[Sequence[str], Sequence[str]], float] | None = None

    def score(self, predictions: Sequence[str], references: Sequence[str], fields: Sequence[dict[str, Any]]) -> Scored:
        if self.corpus is not None:
            return Scored(self.corpus(predictions, references), None)
        assert self.per_example is not None
        values = [
            _checked(self, self.per_example(p, r, f), i)
            for i, (p, r, f) in enumerate(zip(predictions, references, fields, strict=True))
        ]
        return Scored(sum(values) / len(values) if values else math.nan, values)


@dataclass(frozen=True)
class Scored:
    value: float
    per_example: list[float] | None


def normalise(text: str) -> str:
    """Case, surrounding space and runs of whitespace don't count: ``" Paris.\\n"`` and ``"paris."`` match."""
    return " ".join(text.split()).casefold()


def _exact(prediction: str, reference: str, _fields: dict[str, Any]) -> float:
    return float(normalise(prediction) == normalise(reference))


def _exact_raw(prediction: str, reference: str, _fields: dict[str, Any]) -> float:
    return float(prediction.strip() == reference.strip())


def _contains(prediction: str, reference: str, _fields: dict[str, Any]) -> float:
    return float(normalise(reference) in normalise(prediction))


def _regex(prediction: str, reference: str, _fields: dict[str, Any]) -> float:
    """The reference is a regular expression the whole (stripped) prediction must match."""
    try:
        return float(re.fullmatch(reference, prediction.strip(), flags=re.DOTALL) is not None)
    except re.error as exc:
        raise DataError(f"regex_match: the reference {reference!r} is not a regular expression ({exc})") from None


def _json_valid(prediction: str, _reference: str, _fields: dict[str, Any]) -> float:
    try:
        json.loads(prediction)
    except ValueError:
        return 0.0
    return 1.0


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _numeric(prediction: str, reference: str, _fields: dict[str, Any]) -> float:
    """The first number in the prediction equals the reference's first number (relative tolerance 1e-6)."""
    want, got = _NUMBER.search(reference), _NUMBER.search(prediction.replace(",", ""))
    if want is None:
        raise DataError(f"numeric: the reference {reference[:60]!r} holds no number")
    return float(got is not None and math.isclose(float(got.group()), float(want.group()), rel_tol=1e-6, abs_tol=1e-9))


def _bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def _rouge_l(prediction: str, reference: str, _fields: dict[str, Any]) -> float:
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


BUILT_IN: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("exact_match", _exact),
        Metric("exact_match_raw", _exact_raw),
        Metric("contains", _contains),
        Metric("regex_match", _regex),
        Metric("json_valid", _json_valid),
        Metric("numeric", _numeric),
        Metric("bleu", corpus=_bleu),
        Metric("rouge_l", _rouge_l),
    )
}
DEFAULT = ("exact_match", "contains", "bleu", "rouge_l")
TOKEN_METRICS = ("perplexity", "token_loss")
"""Measured on the examples' tokens rather than on generations: see :mod:`tunelab.evaluate.perplexity`."""
_NEEDS = {"bleu": "sacrebleu", "rouge_l": "rouge_score"}


def resolve(names: Sequence[str]) -> list[Metric]:
    """The metrics named, checked before any model loads: unknown names and unimportable functions are errors."""
    if not names:
        raise ConfigError("--metrics: name at least one metric", hint=f"built in: {', '.join(BUILT_IN)}")
    out = []
    for name in dict.fromkeys(n.strip() for n in names):
        if ":" in name:
            out.append(Metric(name, _user_metric(name)))
            continue
        metric = BUILT_IN.get(name)
        if metric is None:
            raise ConfigError(
                f"--metrics: no metric named {name!r}",
                hint=f"use one of {', '.join([*BUILT_IN, *TOKEN_METRICS])}, or your own as module:function",
            )
        _require(name)
        out.append(metric)
    return out


def _require(name: str) -> None:
    module = _NEEDS.get(name)
    if module is None:
        return
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"the {name} metric needs {module}", hint="pip install 'tunelab[eval]'") from None


def _user_metric(spec: str) -> PerExample:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of the user's module is theirs to fix
        raise ConfigError(
            f"--metrics: could not import {module_name!r} for {spec} ({type(exc).__name__}: {exc})",
            hint="the module must be importable from here (on PYTHONPATH or installed)",
        ) from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ConfigError(f"--metrics: {module_name} has no function {attr!r}", hint="name it as module:function")

    def call(prediction: str, reference: str, fields: dict[str, Any]) -> float:
        try:
            return function(prediction, reference, fields)  # type: ignore[no-any-return]
        except Exception as exc:  # the user's code: name it and the example, never a bare traceback
            raise DataError(
                f"metric {spec} raised {type(exc).__name__}: {exc}",
                hint="it is called as function(prediction, reference, record) and must return a number",
            ) from None

    return call


def _checked(metric: Metric, value: Any, index: int) -> float:
    if not isinstance(value, int | float) or math.isnan(float(value)):  # a bool counts: True is 1.0
        raise DataError(
            f"metric {metric.name} returned {value!r} for example {index + 1}, not a number",
            hint="a metric returns an int or float (1.0 for right, 0.0 for wrong)",
        )
    return float(value)
