"""Check a GGUF -> transformers conversion the way exports are checked: both runtimes, same prompts.

The converted checkpoint (transformers, float32) is the reference; the GGUF as
llama.cpp runs it is the runtime.  Matching tokenization, logits within the
tolerance of the file's weight type, and the chat template rendering the same
tokens show that training will start from the model the user had.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.export.gguf_kquant import IQUANTS
from tunelab.export.verify import Reference, Report, verify

# llama.cpp file types -> the verification tolerance that applies (legacy 4/5-bit types as q4_0).
_PRECISION = {
    "ALL_F32": "float32",
    "MOSTLY_F16": "float16",
    "MOSTLY_BF16": "bfloat16",
    "MOSTLY_Q8_0": "q8_0",
    "MOSTLY_Q6_K": "q6_k",
    "MOSTLY_Q5_K_M": "q5_k_m",
    "MOSTLY_Q5_K_S": "q5_k_s",
    "MOSTLY_Q4_K_M": "q4_k_m",
    "MOSTLY_Q4_K_S": "q4_k_s",
    "MOSTLY_Q3_K_M": "q3_k_m",
    "MOSTLY_Q2_K": "q2_k",
    **{f"MOSTLY_{name.upper()}": name for name in IQUANTS},
}


def precision_of(gguf_file: Path) -> str:
    """The tolerance key for a GGUF's ``general.file_type``."""
    import gguf

    field = gguf.GGUFReader(gguf_file).fields.get("general.file_type")
    name = gguf.LlamaFileType(int(field.contents())).name if field is not None else "ALL_F32"
    return _PRECISION.get(name, "q4_0")


def verify_conversion(gguf_file: Path, folder: Path) -> Report:
    """Compare the checkpoint converted into ``folder`` with ``gguf_file`` run by llama.cpp."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.export.gguf_runtime import GGUFRuntime
    from tunelab.hub import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokenizer = load_tokenizer(folder)
    ref = Reference(model, tokenizer, getattr(tokenizer, "chat_template", None) or None)
    return verify("gguf-import", precision_of(gguf_file), GGUFRuntime(gguf_file), ref)
