"""Prove an export right: run it in its own runtime and compare with the merged model.

Each target module provides a *runtime*: the exported artifact loaded by the
program people will run it with (transformers, llama.cpp, mlx-lm,
onnxruntime).  Against the merged model in float32 (the *reference*) the
verifier checks, on fixed prompts:

* tokenization: the runtime's tokenizer gives the reference's ids, specials and BOS included;
* logits: the largest absolute difference, also relative to the largest reference logit;
* greedy agreement: the reference continues each prompt greedily; the runtime,
  fed the same tokens, must pick the same next token at (nearly) every position;
* the template: one conversation rendered with the training template and with
  the exported template must tokenize to the same ids.

Tolerances depend on the precision written (a 4-bit export can't match to 1e-5).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tunelab.errors import TunelabError

PLAIN_PROMPTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Numbers 12345 and punctuation: (a, b); café — naïve?\n  indented line",
)
SYSTEM = {"role": "system", "content": "You write lists."}
CONVERSATION: tuple[dict[str, str], ...] = (
    SYSTEM,
    {"role": "user", "content": "List: tea, rice"},
    {"role": "assistant", "content": "- tea\n- rice"},
    {"role": "user", "content": "List: milk, eggs, honey"},
)
GREEDY_TOKENS = 8

# precision -> (largest logit difference relative to the largest reference logit, least greedy agreement)
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-3, 0.97),
    "float16": (2e-2, 0.9),
    "bfloat16": (6e-2, 0.85),
    "q8_0": (0.1, 0.8),
    "8bit": (0.1, 0.8),
    "q4_0": (0.3, 0.6),
    "4bit": (0.3, 0.6),
    # llama.cpp's K-quant mixes (relative logit diff / greedy agreement). A fully fine-tuned hidden-256 Llama
    # (tests/export/test_kquant.py) gives q6_k 2.1%/98%, q5_k_m 4.1%/97%, q4_k_m 4.8%/99%, q3_k_m 15%/93%,
    # q2_k 34%/89%; a barely trained LoRA one (near-flat logits) q4_k_m 27%/81%, q2_k 73%/54%, which these allow.
    "q6_k": (0.1, 0.9),
    "q5_k_m": (0.25, 0.85),
    "q5_k_s": (0.25, 0.85),
    "q4_k_m": (0.4, 0.7),
    "q4_k_s": (0.4, 0.7),
    "q3_k_m": (0.5, 0.65),
    "q2_k": (1.0, 0.4),
    # llama.cpp's i-quant mixes, by bits per weight: as the K type of about the same size, looser below 3 bits.
    "iq4_xs": (0.4, 0.7),
    "iq4_nl": (0.4, 0.7),
    "iq3_m": (0.5, 0.65),
    "iq3_s": (0.5, 0.65),
    "iq3_xs": (0.5, 0.65),
    "iq3_xxs": (0.6, 0.6),
    "iq2_m": (1.0, 0.4),
    "iq2_s": (1.0, 0.4),
    "iq2_xs": (1.2, 0.35),
    "iq2_xxs": (1.2, 0.35),
    "iq1_m": (1.5, 0.25),
    "iq1_s": (1.5, 0.25),
}


class VerificationError(TunelabError):
    """An export loaded but does not behave like the merged model."""

    exit_code = 8


class Runtime(Protocol):
    """An exported artifact loaded by its own runtime."""

    def tokenize(self, text: str, *, add_special: bool) -> list[int]: ...

    def logits(self, ids: list[int]) -> Any: ...

    def chat_template(self) -> str | None: ...


@dataclass
class Report:
    """What verification measured; stored in the registry with the artifact."""

    target: str
    precision: str
    prompts: int = 0
    positions: int = 0
    max_logit_diff: float = 0.0
    relative_logit_diff: float = 0.0
    greedy_agreement: float = 1.0
    tokenization_match: bool = True
    template_match: bool | None = None
    logits_skipped: str | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


class Reference:
    """The merged model in float32 with the training tokenizer and template."""

    def __init__(self, model: Any, tokenizer: Any, template: str | None) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self._cache: dict[tuple[int, ...], np.ndarray] = {}

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def logits(self, ids: list[int]) -> np.ndarray:
        key = tuple(ids)
        if key not in self._cache:
            import torch

            with torch.no_grad():
                self._cache[key] = self.model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        return self._cache[key]

    def render(self, template: str, messages: Sequence[dict[str, str]]) -> str:
        """Render with the tokenizer's Jinja engine, as training did, ending on an open assistant turn."""
        out = self.tokenizer.apply_chat_template(
            list(messages), chat_template=template, tokenize=False, add_generation_prompt=True
        )
        return str(out)

    def greedy(self, ids: list[int], steps: int = GREEDY_TOKENS) -> list[int]:
        """``ids`` followed by ``steps`` greedy tokens (without a cache: prompts are short)."""
        seq = list(ids)
        for _ in range(steps):
            seq.append(int(np.argmax(self.logits(seq)[-1])))
        return seq


def prompts(ref: Reference) -> list[tuple[str, bool]]:
    """``(text, add_special)`` pairs: plain prompts get BOS the tokenizer's way; chat text carries its own."""
    out = [(text, True) for text in PLAIN_PROMPTS]
    if ref.template is not None:
        out.append((ref.render(ref.template, CONVERSATION[:2]), False))
    return out


def verify(
    target: str,
    precision: str,
    runtime: Runtime,
    ref: Reference,
    *,
    render: Callable[[Sequence[dict[str, str]]], str] | None = None,
) -> Report:
    """Compare ``runtime`` with ``ref``; ``render`` replaces Jinja rendering of the exported template."""
    report = Report(target=target, precision=precision)
    _check_tokenization(runtime, ref, report)
    _check_logits(runtime, ref, report)
    _check_template(runtime, ref, report, render)
    return report


def _check_tokenization(runtime: Runtime, ref: Reference, report: Report) -> None:
    for text, special in prompts(ref):
        want, got = ref.tokenize(text, add_special=special), runtime.tokenize(text, add_special=special)
        if want != got:
            report.tokenization_match = False
            report.failures.append(f"tokenization differs on {text[:40]!r}: reference {want[:12]}…, export {got[:12]}…")
            return


def _check_logits(runtime: Runtime, ref: Reference, report: Report) -> None:
    skip = getattr(runtime, "skip_reason", None)
    if skip:  # e.g. Core ML off macOS: say so in the report rather than pretend
        report.logits_skipped = skip
        return
    max_diff, max_ref, agree, positions = 0.0, 0.0, 0, 0
    for text, special in prompts(ref):
        seq = ref.greedy(ref.tokenize(text, add_special=special))
        want, got = ref.logits(seq), np.asarray(runtime.logits(seq), dtype=np.float32)
        if got.shape != want.shape:
            report.failures.append(f"logits have shape {got.shape}, the reference {want.shape}")
            return
        max_diff = max(max_diff, float(np.max(np.abs(got - want))))
        max_ref = max(max_ref, float(np.max(np.abs(want))))
        agree += int(np.sum(np.argmax(got, -1) == np.argmax(want, -1)))
        positions += len(seq)
        report.prompts += 1
    report.positions = positions
    report.max_logit_diff = max_diff
    report.relative_logit_diff = max_diff / max(max_ref, 1e-12)
    report.greedy_agreement = agree / max(positions, 1)
    rel_tol, min_agree = TOLERANCES[report.precision]
    if not np.isfinite(max_diff) or report.relative_logit_diff > rel_tol:
        report.failures.append(
            f"logits differ from the merged model by up to {max_diff:.4g} "
            f"({report.relative_logit_diff:.2%} of the largest logit; {report.precision} allows {rel_tol:.2%})"
        )
    if report.greedy_agreement < min_agree:
        report.failures.append(
            f"greedy tokens agree at {report.greedy_agreement:.1%} of positions "
            f"({report.precision} needs {min_agree:.0%})"
        )


def _check_template(
    runtime: Runtime, ref: Reference, report: Report, render: Callable[[Sequence[dict[str, str]]], str] | None
) -> None:
    if ref.template is None:
        return  # trained on plain text: there is no chat format to carry over
    exported = runtime.chat_template()
    if render is None and exported is None:
        report.template_match = False
        report.failures.append("the export carries no chat template, but training used one")
        return
    want = ref.tokenize(ref.render(ref.template, CONVERSATION), add_special=False)
    text = render(CONVERSATION) if render is not None else ref.render(str(exported), CONVERSATION)
    got = runtime.tokenize(text, add_special=False)
    report.template_match = want == got
    if not report.template_match:
        at = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), min(len(want), len(got)))
        report.failures.append(
            f"the exported chat template renders a conversation differently from the training template "
            f"(tokens differ from position {at}: {text[max(0, at - 10) : at + 30]!r})"
        )


def sha256_of(path: Path) -> str:
    """Hash of a file, or of a folder's files (names and contents, in name order)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def raise_if_failed(report: Report, path: Path) -> None:
    """Turn a failed report into an error that says what went wrong and what to do."""
    if report.passed:
        return
    raise VerificationError(
        f"the {report.target} export in {path} failed verification: " + "; ".join(report.failures),
        hint="the files are kept for inspection; please report this with the run's config "
        "(or pass --no-verify to keep an export you have checked yourself)",
    )
