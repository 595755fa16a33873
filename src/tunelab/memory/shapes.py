"""Architecture numbers read from a checkpoint's ``config.json``, without loading weights.

The estimator needs only sizes (hidden, intermediate, layers, heads, vocabulary,
tied embeddings, which linear layers exist), so this reads the JSON directly:
it costs a millisecond, imports neither torch nor transformers, and works for
MLX-only installs.  Missing keys take the defaults transformers uses for that
architecture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import ModelError

# model_types whose input embedding scales its rows (a subclass of nn.Embedding): their table stays on the GPU.
SCALED_EMBEDDINGS = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text"})
# model_types whose config class ties the output head to the embeddings by default.
_TIED_BY_DEFAULT = ("gemma", "gemma2", "gemma3_text", "gemma3")
# Norms applied to the residual stream in each decoder block.
_NORMS_PER_LAYER = {"gemma2": 4, "gemma3_text": 4, "gemma3": 4}
_QK_NORM = ("qwen3", "gemma3_text", "gemma3", "olmo2")
_ATTN_BIAS_DEFAULT = ("qwen2",)
# Architectures that fuse projections into one linear layer (their module names differ).
_FUSED_QKV = ("phi3",)


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder block: its module name and dimensions."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that decide its memory use."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False
    attn_bias: bool = False
    norms_per_layer: int = 2
    qk_norm: bool = False
    fused_qkv: bool = False
    logit_softcap: bool = False  # Gemma 2: tanh(logits / cap) · cap, more fp32 copies in the loss
    eager_attention: bool = False  # soft-capped attention scores: no fused kernel, the weights are saved
    checkpoint_dtype: str | None = None
    quant_bits: int | None = None  # an already-quantized checkpoint (MLX's "quantization" key)
    quant_group_size: int = 64

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def block_linears(self) -> tuple[Linear, ...]:
        """The linear layers of one decoder block, named as the checkpoint names them."""
        h, i = self.hidden, self.intermediate
        if self.fused_qkv:
            return (
                Linear("qkv_proj", h, self.q_dim + 2 * self.kv_dim),
                Linear("o_proj", self.q_dim, h),
                Linear("gate_up_proj", h, 2 * i),
                Linear("down_proj", i, h),
            )
        bias = self.attn_bias
        return (
            Linear("q_proj", h, self.q_dim, bias),
            Linear("k_proj", h, self.kv_dim, bias),
            Linear("v_proj", h, self.kv_dim, bias),
            Linear("o_proj", self.q_dim, h),
            Linear("gate_proj", h, i),
            Linear("up_proj", h, i),
            Linear("down_proj", i, h),
        )

    @property
    def block_params(self) -> int:
        norms = self.norms_per_layer * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return sum(lin.params for lin in self.block_linears()) + norms

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def num_params(self) -> int:
        """All parameters, counted as transformers counts them (tied weights once)."""
        return self.embed_params + self.head_params + self.layers * self.block_params + self.hidden


def read_shape(source: Path | dict[str, Any]) -> ModelShape:
    """The :class:`ModelShape` of a checkpoint folder (or an already-parsed ``config.json``)."""
    if isinstance(source, dict):
        config = source
    else:
        path = Path(source) / "config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelError(
                f"{source} has no config.json", hint="point model.path at a HF checkpoint folder"
            ) from None
        except json.JSONDecodeError as exc:
            raise ModelError(f"{path}: not valid JSON ({exc})") from None
    return _from_config(config)


def _from_config(config: dict[str, Any]) -> ModelShape:
    model_type = str(config.get("model_type", ""))
    text = config.get("text_config")
    inner = text if isinstance(text, dict) else config  # multimodal configs nest the language model
    try:
        hidden = int(inner["hidden_size"])
        heads = int(inner["num_attention_heads"])
        shape = ModelShape(
            model_type=model_type,
            hidden=hidden,
            intermediate=int(inner["intermediate_size"]),
            layers=int(inner["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(inner.get("num_key_value_heads") or heads),
            head_dim=int(inner.get("head_dim") or hidden // heads),
            vocab=int(inner["vocab_size"]),
            tied_embeddings=bool(config.get("tie_word_embeddings", model_type in _TIED_BY_DEFAULT)),
            attn_bias=bool(inner.get("attention_bias", model_type in _ATTN_BIAS_DEFAULT)),
            norms_per_layer=_NORMS_PER_LAYER.get(model_type, 2),
            qk_norm=model_type in _QK_NORM,
            fused_qkv=model_type in _FUSED_QKV,
            logit_softcap=bool(inner.get("final_logit_softcapping")),
            eager_attention=bool(inner.get("attn_logit_softcapping")),
            checkpoint_dtype=config.get("dtype") or config.get("torch_dtype"),
            **_quantization(config),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(
            f"config.json of this {model_type or 'model'} lacks a size the memory estimate needs ({exc})",
            hint="memory estimates cover decoder-only transformers (Llama, Qwen, Mistral, Gemma, Phi, …)",
        ) from None
    if inner.get("num_local_experts") or inner.get("num_experts"):
        raise ModelError(
            f"{model_type}: mixture-of-experts models are not covered by the memory estimate yet",
            hint="train with an explicit train.batch_size and watch the memory column",
        )
    return shape


def _quantization(config: dict[str, Any]) -> dict[str, Any]:
    """MLX-quantized checkpoints carry ``quantization: {bits, group_size}``."""
    quant = config.get("quantization") or config.get("quantization_config")
    if isinstance(quant, dict) and "bits" in quant:
        return {"quant_bits": int(quant["bits"]), "quant_group_size": int(quant.get("group_size", 64))}
    return {}
