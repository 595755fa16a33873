"""An LLM judge: another model, behind any OpenAI-compatible endpoint, grades each answer against the reference.

Exact match and ROUGE miss answers that are right in other words; a capable model asked "how good is this
answer, 0 to 10?" catches them.  The judge is whatever serves ``/v1/chat/completions``: tunelab's own
`serve` (model ``run:ID``), Ollama, llama.cpp's server, a hosted API.  It is off unless asked for, it is
reached before any answer is generated (so a wrong URL fails in a second, not after the whole eval), and
its replies are kept beside the scores so a surprising grade can be read.  The standard library's HTTP
client is enough for two JSON routes, so the judge needs no extra package.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunelab.errors import ConfigError, DataError
from tunelab.evaluate.examples import EvalExample
from tunelab.evaluate.runner import EvalOutcome

KEY_ENV = "TUNELAB_JUDGE_KEY"
"""The judge's API key (sent as a Bearer token) comes from this variable, never from the command line."""

NAME = "judge"
_SCORE = re.compile(r"\b(10|[0-9])\b")


@dataclass(frozen=True)
class Judge:
    """A reachable endpoint (``base`` ends in /v1) and the model on it that grades."""

    base: str
    model: str
    key: str | None = None
    timeout: float = 120.0


def connect(url: str, model: str | None = None, *, key: str | None = None, timeout: float = 120.0) -> Judge:
    """Reach ``url``'s ``/v1/models`` and settle the judge's model (the only one listed, unless ``model`` names it).

    ``key`` defaults to the ``TUNELAB_JUDGE_KEY`` environment variable.
    """
    key = key if key is not None else (os.environ.get(KEY_ENV) or None)
    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ConfigError(f"--judge {url!r} is not an http(s) URL", hint="e.g. --judge http://127.0.0.1:8000")
    base = base if base.endswith("/v1") else base + "/v1"
    listed = _call(base + "/models", None, key, timeout)
    ids = [str(m.get("id")) for m in listed.get("data", []) if isinstance(m, dict)]
    if model is None:
        if len(ids) != 1:
            raise ConfigError(
                f"the judge at {url} serves {len(ids)} models; say which one grades",
                hint="--judge-model NAME" + (f" (one of {', '.join(ids[:8])})" if ids else ""),
            )
        model = ids[0]
    elif ids and model not in ids:
        raise ConfigError(f"the judge at {url} has no model {model!r}", hint=f"it serves {', '.join(ids[:8])}")
    return Judge(base, model, key, timeout)


def prompt(question: str, reference: str, answer: str) -> str:
    """What the judge is asked for one example (the candidate last, nearest the reply)."""
    return (
        "Grade an answer to a question against a reference answer. Reply with one whole number from 0 "
        "(wrong or unrelated) to 10 (as correct and complete as the reference), and nothing else.\n\n"
        f"Question:\n{question}\n\nReference answer:\n{reference}\n\nAnswer to grade:\n{answer}"
    )


def question_of(example: EvalExample) -> str:
    """The question as the judge reads it: the prompt, or the conversation before the answer."""
    if not example.messages:
        return example.prompt
    if len(example.messages) == 1:
        return str(example.messages[0].get("content", ""))
    return "\n".join(f"{m.get('role')}: {m.get('content', '')}" for m in example.messages)


def grade(judge: Judge, question: str, reference: str, answer: str) -> tuple[float | None, str]:
    """(the judge's score scaled to 0-1, or None when its reply holds no 0-10 number; the reply itself)."""
    body = {"model": judge.model, "messages": [{"role": "user", "content": prompt(question, reference, answer)}],
            "temperature": 0.0, "max_tokens": 16}  # fmt: skip
    reply = _call(judge.base + "/chat/completions", body, judge.key, judge.timeout)
    try:
        text = str(reply["choices"][0]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError):
        raise ConfigError(f"the judge at {judge.base} did not answer as an OpenAI chat completion") from None
    found = _SCORE.search(text)
    return (int(found.group(1)) / 10 if found else None), text


def add_judge(judge: Judge, examples: Sequence[EvalExample], outcome: EvalOutcome) -> int:
    """Grade each answer in ``outcome`` and add ``judge`` to its scores and rows; returns how many replies held
    no score (left out of the mean).  Nothing is written here: a failure leaves the caller nothing to undo."""
    scores, replies = [], []
    for example, row in zip(examples, outcome.rows, strict=True):
        score, reply = grade(judge, question_of(example), example.reference, row["prediction"])
        scores.append(score)
        replies.append(reply)
    counted = [s for s in scores if s is not None]
    if scores and not counted:
        raise DataError(
            f"none of the judge's {len(scores)} replies held a score from 0 to 10 (the first: {replies[0][:80]!r})",
            hint=f"choose a judge model that follows instructions (--judge-model); {judge.model} does not",
        )
    outcome.scores[NAME] = sum(counted) / len(counted) if counted else float("nan")
    for row, score, reply in zip(outcome.rows, scores, replies, strict=True):
        row["scores"][NAME] = score
        row["judge_reply"] = reply
    return len(scores) - len(counted)


def _call(url: str, body: dict[str, Any] | None, key: str | None, timeout: float) -> dict[str, Any]:
    """GET (no body) or POST JSON to the judge; every way it can fail is an error naming the endpoint."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode("utf-8", "replace")
        hint = f"set {KEY_ENV} to a key the server accepts" if exc.code in (401, 403) else "check --judge"
        raise ConfigError(f"the judge at {url} answered HTTP {exc.code}: {detail}", hint=hint) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"the judge endpoint {url} can't be reached ({reason})",
            hint="start it (tunelab serve, ollama serve, llama-server) or fix --judge URL",
        ) from None
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise ConfigError(f"the judge at {url} did not answer JSON: {raw[:120]!r}") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"the judge at {url} did not answer a JSON object")
    return parsed
