"""The ``hf`` target: a transformers checkpoint of the merged model.

Safetensors (sharded above ``max_shard_size``), the tokenizer with the chat
template training used, and a ``generation_config.json`` whose
``eos_token_id`` lists every id that ends a turn under that template, so
``generate`` (and vLLM, which reads the same file) stops where the fine-tune
learned to stop.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tunelab.export.merge import Merged
from tunelab.hub import save_tokenizer

# End-of-turn markers of common chat templates; one that the template writes is a stop token.
SENTENCEPIECE_FILES: tuple[str, ...] = ("tokenizer.model", "spiece.model")
TURN_ENDS: tuple[str, ...] = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


def stop_tokens(tokenizer: Any, template: str | None) -> list[int]:
    """EOS plus the end-of-turn tokens the chat template writes, in id order."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    for marker in TURN_ENDS:
        if template is not None and marker in template and marker in vocab:
            ids.add(vocab[marker])
    return sorted(ids)


def write_hf(merged: Merged, out: Path, *, max_shard_size: str = "4GB") -> Path:
    """Save the merged model, tokenizer, template and generation config into ``out``."""
    import torch
    from transformers import GenerationConfig

    model, tokenizer = merged.model, merged.tokenizer
    model.to(getattr(torch, merged.save_dtype))
    model.config.dtype = merged.save_dtype
    stops = stop_tokens(tokenizer, merged.template)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stops[0] if len(stops) == 1 else stops,
        pad_token_id=tokenizer.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    save_tokenizer(tokenizer, out)  # keeps the SentencePiece legacy flag
    for name in SENTENCEPIECE_FILES:  # transformers 5 saves tokenizer.json only; GGUF wants the proto
        if (merged.base / name).is_file() and not (out / name).exists():
            shutil.copy2(merged.base / name, out / name)
    model.to(torch.float32)  # later targets and verification start from full precision again
    return out


class HFRuntime:
    """The exported folder as transformers loads it: the verifier's view of an ``hf`` export."""

    def __init__(self, folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from tunelab.hub import load_tokenizer

        self.tokenizer = load_tokenizer(folder)
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def logits(self, ids: list[int]) -> Any:
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids])).logits[0]
        return out.float().numpy()

    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)
