"""The ``gguf`` target: a merged HF folder written as one GGUF file, tensor by tensor.

Written with the ``gguf`` package's writer and name map, by tunelab's own code
(not llama.cpp's convert script).  Memory stays near one tensor: safetensors
are read tensor by tensor with plain file reads (a memory map would count
every page touched towards the process's resident size), transformed,
encoded and written before the next is read; headers are written first from
shapes alone.

Per family, what llama.cpp expects differently from transformers:
* llama / mistral: llama.cpp rotates adjacent pairs in q/k, transformers rotates
  halves, so q_proj and k_proj rows are permuted;
* gemma (1, 2, 3): RMSNorm weights are stored as ``1 + w`` (transformers adds the 1 at run time);
  Gemma 2/3 also need their soft-capping and sliding-window keys;
* phi3: no permutation (llama.cpp rotates halves, as transformers does), but see
  :func:`model_name` for the tokenizer fix-up llama.cpp keys on the model name;
* Llama 3.1 rope scaling becomes a ``rope_freqs`` tensor (:mod:`.gguf_rope`).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import ConfigError, ModelError
from tunelab.export.gguf_rope import ROPE_FREQS, check_rope, llama3_factors, rope_params, rope_theta
from tunelab.export.gguf_runtime import GGUFRuntime
from tunelab.export.gguf_tokenizer import read_vocab
from tunelab.export.hf import stop_tokens
from tunelab.export.imatrix import Imatrix
from tunelab.export.merge import Merged
from tunelab.export.pipeline import Written

QUANT_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0")
_PRECISION = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "q8_0": "q8_0", "q4_0": "q4_0"}
_ROWS_PER_CHUNK = 1 << 12  # quantize big tensors in slices so temporaries stay small
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # bf16 is kept as raw uint16 bits


@dataclass(frozen=True)
class Family:
    """How one transformers model_type maps onto a llama.cpp architecture."""

    arch: str
    permute_qk: bool = False
    norm_plus_one: bool = False
    tied_output: bool = False  # llama.cpp's graph reads the output layer from token_embd


FAMILIES: dict[str, Family] = {
    "llama": Family("LLAMA", permute_qk=True),
    "mistral": Family("LLAMA", permute_qk=True),
    "qwen2": Family("QWEN2"),
    "qwen3": Family("QWEN3"),
    "gemma": Family("GEMMA", norm_plus_one=True, tied_output=True),
    "gemma2": Family("GEMMA2", norm_plus_one=True, tied_output=True),
    "gemma3_text": Family("GEMMA3", norm_plus_one=True, tied_output=True),
    "phi3": Family("PHI3"),
}


def write(folder: Path, merged: Merged, out: Path, quantize: str | None, *, imatrix: Imatrix | None = None) -> Written:
    """Pipeline entry point: write ``out`` (a .gguf file) and say how to load it back.

    A K- or i-quant is written as tunelab's float GGUF first (beside ``out``, removed
    afterwards) and then quantized by llama.cpp's own quantizer (:mod:`.gguf_kquant`),
    weighted by ``imatrix`` when one is given (checked against the model's tensors first).
    """
    from tunelab.export.gguf_kquant import LLAMA_QUANTS, quantize_file, tensor_types
    from tunelab.export.imatrix import check_against

    quant = quantize or default_quant(folder)
    if quant not in LLAMA_QUANTS:
        notes = write_gguf(folder, out, quant=quant, tokenizer=merged.tokenizer, template=merged.template)
        return Written(out, _PRECISION[quant], lambda: GGUFRuntime(out), notes=notes)
    staged = out.with_name(f".{out.name}.float.gguf")
    try:
        float_quant = default_quant(folder)
        notes = write_gguf(folder, staged, quant=float_quant, tokenizer=merged.tokenizer, template=merged.template)
        if imatrix is not None:
            notes += check_against(imatrix, tensor_types(staged))
        notes += quantize_file(staged, out, quant, imatrix=imatrix.means() if imatrix is not None else None)
    finally:
        staged.unlink(missing_ok=True)
    return Written(out, quant, lambda: GGUFRuntime(out), notes=notes)


def default_quant(folder: Path) -> str:
    """bf16 for a bf16 checkpoint, f16 otherwise (as llama.cpp's own converter does)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return "bf16" if (config.get("dtype") or config.get("torch_dtype")) == "bfloat16" else "f16"


def write_gguf(folder: Path, out: Path, *, quant: str, tokenizer: Any = None, template: str | None = None) -> list[str]:
    """Write the HF checkpoint in ``folder`` as a GGUF file at ``out``; return notes for the user."""
    import gguf

    from tunelab.hub import load_tokenizer

    if quant not in QUANT_TYPES:
        raise ConfigError(f"GGUF quantization must be one of {', '.join(QUANT_TYPES)} (got {quant!r})")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    family = family_of(config)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(folder)
    stops = stop_tokens(tokenizer, template)
    vocab = read_vocab(folder, tokenizer, vocab_size=int(config["vocab_size"]), template=template, stops=stops)
    tensors: list[_Entry | _Array] = list(_index(folder))
    factors = llama3_factors(config, _head_dim(config))
    if factors is not None:  # llama.cpp divides each rotary frequency by these
        tensors.append(_Array(ROPE_FREQS, factors.shape, factors))
    if family.tied_output:
        tensors = _drop_tied_output(tensors, config)
    arch = getattr(gguf.MODEL_ARCH, family.arch)
    names = gguf.get_tensor_name_map(arch, int(config["num_hidden_layers"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])
    notes: list[str] = []
    _write_hparams(writer, config, quant, tokenizer)
    vocab.write(writer)
    plan = _plan(writer, tensors, names, config, quant, notes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for entry, _target, qtype in plan:
        data = transform(entry.read(), entry.name, config, family)
        writer.write_tensor_data(_encode(data, qtype))
        del data
    writer.close()
    return notes


def _plan(
    writer: Any, tensors: list[_Entry | _Array], names: Any, config: dict[str, Any], quant: str, notes: list[str]
) -> list[tuple[_Entry | _Array, str, Any]]:
    """Register every tensor's GGUF name, shape and type with the writer (headers go first)."""
    plan = []
    for entry in tensors:
        if entry.name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp from rope_freq_base
        target = entry.name if isinstance(entry, _Array) else names.get_name(entry.name, (".weight", ".bias"))
        if target is None:
            raise ModelError(f"no GGUF name for tensor {entry.name} of this {config['model_type']} checkpoint")
        qtype = _tensor_type(target, entry.shape, quant, notes)
        writer.add_tensor_info(target, entry.shape, np.dtype(np.float32), _nbytes(entry.shape, qtype), raw_dtype=qtype)
        plan.append((entry, target, qtype))
    return plan


def family_of(config: dict[str, Any]) -> Family:
    """The llama.cpp family of a checkpoint's config.json; a clear error for one llama.cpp can't run."""
    model_type = str(config.get("model_type"))
    if model_type not in FAMILIES:
        raise ModelError(
            f"GGUF export does not support model_type {model_type!r} yet",
            hint=f"supported: {', '.join(FAMILIES)}; export --to hf and use llama.cpp's converter for this one",
        )
    family = FAMILIES[model_type]
    check_rope(config, llama_arch=family.arch == "LLAMA")
    return family


def _drop_tied_output(tensors: list[_Entry | _Array], config: dict[str, Any]) -> list[_Entry | _Array]:
    """For families whose llama.cpp graph has no separate output layer: refuse an untied one."""
    if any(e.name == "lm_head.weight" for e in tensors) and not config.get("tie_word_embeddings", True):
        raise ModelError(
            f"llama.cpp's {config['model_type']} ties the output layer to the embeddings, "
            "but this checkpoint has its own lm_head, so a GGUF would compute different logits",
            hint="export --to hf, mlx or onnx instead",
        )
    return [e for e in tensors if e.name != "lm_head.weight"]


def _head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _write_hparams(writer: Any, config: dict[str, Any], quant: str, tokenizer: Any) -> None:
    import gguf

    heads = int(config["num_attention_heads"])
    head_dim = _head_dim(config)
    writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    full, sliding = rope_params(config)
    writer.add_rope_freq_base(rope_theta(full))
    if sliding:
        writer.add_rope_freq_base_swa(rope_theta(sliding))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    if config.get("sliding_window") and config.get("use_sliding_window", True) and config["model_type"] == "phi3":
        writer.add_sliding_window(int(config["sliding_window"]))
    if config["model_type"] in ("gemma2", "gemma3_text"):
        _write_gemma_keys(writer, config, head_dim)
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
    writer.add_file_type(int(getattr(gguf.LlamaFileType, file_types.get(quant, "MOSTLY_Q4_0"))))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_name(model_name(config, tokenizer))


def _write_gemma_keys(writer: Any, config: dict[str, Any], head_dim: int) -> None:
    """Gemma 2/3: soft-capping and sliding-window keys, and the query scale llama.cpp assumes."""
    gemma2 = config["model_type"] == "gemma2"
    # llama.cpp scales queries by 1/sqrt(head_dim) (by 1/sqrt(hidden/heads) for the 27B sizes only).
    scalar = config.get("query_pre_attn_scalar")
    if scalar is not None and int(scalar) != head_dim:
        raise ModelError(
            f"this checkpoint scales attention by query_pre_attn_scalar={scalar}, but llama.cpp's "
            f"{config['model_type']} uses the head size ({head_dim}), so a GGUF would compute different logits",
            hint="export --to hf, mlx or onnx instead",
        )
    if gemma2:
        attn_cap, final_cap = config.get("attn_logit_softcapping"), config.get("final_logit_softcapping")
        # llama.cpp's gemma2 always caps (at 50 and 30 unless the file says otherwise).
        if attn_cap is None or final_cap is None:
            raise ModelError(
                "llama.cpp's gemma2 always soft-caps attention and final logits, but this checkpoint disables it",
                hint="export --to hf, mlx or onnx instead",
            )
        writer.add_attn_logit_softcapping(float(attn_cap))
        writer.add_final_logit_softcapping(float(final_cap))
    if config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
    sliding = [t == "sliding_attention" for t in config.get("layer_types") or []]
    if gemma2 and sliding and sliding != [i % 2 == 0 for i in range(len(sliding))]:
        # llama.cpp's gemma2 alternates sliding and full layers whatever the file says.
        raise ModelError(
            "this Gemma 2 checkpoint does not alternate sliding-window and full attention layers as "
            "llama.cpp's gemma2 does, so long prompts would be computed differently",
            hint="export --to hf, mlx or onnx instead",
        )
    if sliding and not gemma2:  # Gemma 3: llama.cpp reads which layers slide from the file
        writer.add_sliding_window_pattern(sliding)


def model_name(config: dict[str, Any], tokenizer: Any) -> str:
    """``general.name``: the architecture class, unless that would trip llama.cpp's Phi-3 fix-up.

    llama.cpp keys one tokenizer fix-up on the model *name*: a name containing
    "phi3" or "phi-3" makes every special token strip the whitespace after it
    (as Phi-3's own tokenizer does) and looks up "</s>", "<s>", "<unk>" and
    "<|endoftext|>" (a vocabulary without them fails to load).  So the name
    keeps "Phi3" only for a tokenizer that really strips there.
    """
    name = str((config.get("architectures") or [config["model_type"]])[0])
    if not re.search(r"(?i)phi-?3", name):
        return name
    if _strips_after_specials(tokenizer):
        missing = [t for t in ("</s>", "<s>", "<unk>", "<|endoftext|>") if t not in tokenizer.get_vocab()]
        if missing:
            raise ModelError(
                f"llama.cpp's Phi-3 tokenizer fix-up needs the tokens {', '.join(missing)}, which this tokenizer "
                "lacks, so llama.cpp could not load the GGUF",
                hint="export --to hf, mlx or onnx instead",
            )
        return name
    return re.sub(r"(?i)phi-?3", "Phi 3 ", name).strip()


def _strips_after_specials(tokenizer: Any) -> bool:
    specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    if not specials:
        return False
    ids = tokenizer(specials[-1] + " \n", add_special_tokens=False)["input_ids"]
    return len(ids) == 1


def _tensor_type(target: str, shape: tuple[int, ...], quant: str, notes: list[str]) -> Any:
    """GGML type for one tensor: norms and biases stay float32; matrices take the requested type."""
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2 or quant == "f32":
        return T.F32
    if quant in ("f16", "bf16"):
        return T.F16 if quant == "f16" else T.BF16
    if shape[-1] % 32:
        notes.append(f"{target} rows ({shape[-1]}) are not a multiple of 32, so it is stored as f16")
        return T.F16
    if quant == "q4_0" and target in ("token_embd.weight", "output.weight"):
        return T.Q8_0  # 4-bit embeddings and output layer cost far more quality than they save
    return T.Q8_0 if quant == "q8_0" else T.Q4_0


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def _to_f32(data: np.ndarray) -> np.ndarray:
    if data.dtype == np.uint16:  # raw bfloat16 bits
        return (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32, copy=False)


def transform(data: np.ndarray, name: str, config: dict[str, Any], family: Family) -> np.ndarray:
    """One HF tensor as llama.cpp wants it (q/k rows permuted, Gemma norms plus one); also for LoRA B rows."""
    if family.permute_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = int(config["num_attention_heads"])
        if name.endswith("k_proj.weight"):
            heads = int(config.get("num_key_value_heads") or heads)
        data = data.reshape(heads, 2, data.shape[0] // heads // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
    if family.norm_plus_one and name.endswith("norm.weight"):
        data = _to_f32(data) + 1.0
    return data


def _encode(data: np.ndarray, qtype: Any) -> np.ndarray:
    """Bytes of ``data`` in ``qtype``; large matrices are quantized a slice of rows at a time."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    if qtype == T.F32:
        return np.ascontiguousarray(_to_f32(data))
    if qtype == T.F16:
        return np.ascontiguousarray(data if data.dtype == np.float16 else _to_f32(data).astype(np.float16))
    if qtype == T.BF16 and data.dtype == np.uint16:
        return np.ascontiguousarray(data)
    rows = data.reshape(-1, data.shape[-1])
    parts = [quantize(_to_f32(rows[i : i + _ROWS_PER_CHUNK]), qtype) for i in range(0, len(rows), _ROWS_PER_CHUNK)]
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


@dataclass(frozen=True)
class _Entry:
    """One tensor in a safetensors file, read on demand."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    path: Path
    start: int
    end: int

    def read(self) -> np.ndarray:
        if self.dtype not in _ST_DTYPES:
            raise ModelError(f"tensor {self.name} is {self.dtype}; GGUF export reads F32, F16 and BF16 weights")
        dtype = np.dtype(_ST_DTYPES[self.dtype])
        with self.path.open("rb") as fh:
            fh.seek(self.start)
            data = np.fromfile(fh, dtype=dtype, count=(self.end - self.start) // dtype.itemsize)
        return data.reshape(self.shape)


@dataclass(frozen=True)
class _Array:
    """A tensor computed by the exporter rather than read from the checkpoint."""

    name: str
    shape: tuple[int, ...]
    data: np.ndarray

    def read(self) -> np.ndarray:
        return self.data


def _index(folder: Path) -> Iterator[_Entry]:
    """Every tensor of a (possibly sharded) safetensors checkpoint, from the headers alone."""
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise ModelError(f"{folder} has no model*.safetensors")
    for path in files:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            yield _Entry(name, tuple(info["shape"]), info["dtype"], path, 8 + length + start, 8 + length + end)
