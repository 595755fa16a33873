"""The base model's greedy answers, kept so that evaluating another run on the same base does not generate them again.

The key is everything the answers depend on: the base model's folder and the size and modification time of each
of its files (a hub snapshot's folder names its revision), the examples themselves (their prompts and references,
hashed), the answer length, whether prompts go through the chat template, and the backend asked for.  Answers,
not scores, are kept: any metric (a user's own included) is scored afresh on them, so a metric changes no key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunelab.evaluate.examples import EvalExample

VERSION = 1  # bump when how answers are generated changes: older entries then miss


def key(model_dir: Path, examples: Sequence[EvalExample], *, max_new_tokens: int, chat: bool, backend: str) -> str:
    """sha256 of what the base's answers to ``examples`` depend on."""
    folder = model_dir.expanduser().resolve()
    files = sorted(
        (p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    )
    asked = [[list(e.messages) if e.messages else e.prompt, e.reference] for e in examples]
    content = {
        "version": VERSION, "model": str(folder), "files": files, "examples": asked,
        "max_new_tokens": max_new_tokens, "chat": chat, "backend": backend,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def path_for(folder: Path, digest: str) -> Path:
    return folder / f"{digest[:32]}.json"


def load(folder: Path, digest: str, count: int) -> list[str] | None:
    """The cached answers for ``digest`` (``count`` of them), or None when there are none (or they are unreadable)."""
    path = path_for(folder, digest)
    try:
        entry: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    answers = entry.get("answers")
    if entry.get("key") != digest or not isinstance(answers, list) or len(answers) != count:
        return None
    return [str(a) for a in answers]


def save(folder: Path, digest: str, answers: Sequence[str], *, model: str) -> Path:
    """Keep ``answers`` under ``digest``, written whole or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    path = path_for(folder, digest)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": digest, "model": model, "answers": list(answers)}, ensure_ascii=False),
                   encoding="utf-8")  # fmt: skip
    os.replace(tmp, path)
    return path
