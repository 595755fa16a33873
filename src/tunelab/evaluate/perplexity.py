"""Token-level loss and perplexity of a model on tokenized held-out data, computed with transformers (+ PEFT).

The examples are tokenized by the same pipeline as training (template, masking, truncation), and the
loss is token-weighted over the supervised positions as the trainer's ``val_loss`` is: so on the run's
validation set, ``perplexity == exp(val_loss)``.  This is an independent reference path (the model is
loaded afresh in float32, one example at a time, no padding), which is what makes the equality a check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.data.tokenize import TokenizedSplit
from tunelab.errors import ConfigError
from tunelab.vocab import IGNORE


@dataclass(frozen=True)
class TokenLoss:
    loss: float  # mean cross-entropy per supervised token (nats)
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


def load_scoring_model(model_dir: Path, adapter_dir: Path | None) -> Any:
    """The model in float32 on the CPU, with its PEFT adapter applied unmerged: the reference scores are taken on."""
    try:
        import torch
    except ImportError:
        raise ConfigError("scoring a model this way needs PyTorch", hint="pip install 'tunelab[torch]'") from None
    from tunelab.backends.torch.loading import load_causal_lm

    model: Any = load_causal_lm(model_dir, dtype=torch.float32, device=torch.device("cpu"), attn="auto", trust=False)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


def token_loss(model_dir: Path, adapter_dir: Path | None, split: TokenizedSplit) -> TokenLoss:
    """Summed cross-entropy over every supervised token of ``split``, divided by their count."""
    import torch

    model = load_scoring_model(model_dir, adapter_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(split.input_ids, split.labels, strict=True):
            # Copies: rows from the tokenization cache are read-only views of a memory-mapped file.
            target = torch.tensor(np.asarray(labels[1:]), dtype=torch.long)
            keep = target != IGNORE
            if not bool(keep.any()):
                continue
            logits = model(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long)[None]).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
            total += float(loss.double())
            count += int(keep.sum())
    if count == 0:
        raise ConfigError("no supervised tokens in the held-out data: nothing to measure perplexity on")
    return TokenLoss(total / count, count)
