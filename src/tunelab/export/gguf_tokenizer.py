"""The tokenizer part of a GGUF file: vocabulary, merges/scores, special ids, chat template.

Two forms, as llama.cpp knows them:

* ``gpt2``: byte-level BPE (Qwen, Llama 3, GPT-style) from ``tokenizer.json``:
  tokens in their byte-to-unicode spelling, merges, and the *pre-tokenizer
  type*: llama.cpp does not read the split regex from the file, it picks a
  built-in one by name, so a wrong name silently tokenizes differently.  The
  name is chosen by matching the tokenizer's regex against the ones llama.cpp
  implements; an unknown regex is refused rather than guessed.
* ``llama``: SentencePiece (Llama 2, Mistral, Gemma) from the ``tokenizer.model``
  proto: pieces, scores and piece types, and whether a space is prepended
  (probed on the loaded tokenizer, see :func:`_space_prefix`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import ModelError

# GGUF token types (the same numbering as SentencePiece's piece types).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split regexes llama.cpp implements, by the pre-tokenizer name it expects in the GGUF.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[str, str] = {
    _LLAMA3: "llama-bpe",
    _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}"): "qwen2",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+": "gpt-2",
}
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
SP_FILES: tuple[str, ...] = ("tokenizer.model", "spiece.model")


@dataclass
class GGUFVocab:
    """Everything the writer puts under ``tokenizer.ggml.*`` and ``tokenizer.chat_template``."""

    model: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    pre: str | None = None
    special: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    template: str | None = None

    def write(self, writer: Any) -> None:
        """Add the vocabulary's keys to a ``gguf.GGUFWriter``."""
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special.items():
            writer.add_uint32(f"tokenizer.ggml.{kind}_token_id", token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.template is not None:
            writer.add_chat_template(self.template)


def read_vocab(folder: Path, tokenizer: Any, *, vocab_size: int, template: str | None, stops: list[int]) -> GGUFVocab:
    """Build the GGUF vocabulary of the HF tokenizer saved in ``folder`` (``tokenizer`` is it, loaded)."""
    sp_file = next((folder / n for n in SP_FILES if (folder / n).is_file()), None)
    if sp_file is not None:
        vocab = _sentencepiece(sp_file, tokenizer)
        vocab.add_space_prefix = _space_prefix(tokenizer, template)
    elif (folder / "tokenizer.json").is_file():
        vocab = _byte_bpe(json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")), tokenizer)
    else:
        raise ModelError(f"{folder} has neither tokenizer.json nor a SentencePiece model, so GGUF can't embed it")
    _pad(vocab, vocab_size)
    vocab.template = template
    for kind, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id)):
        if value is not None:
            vocab.special[kind] = int(value)
    for kind in ("unk", "pad"):
        value = getattr(tokenizer, f"{kind}_token_id", None)
        if value is not None:
            vocab.special[kind] = int(value)
    turn_ends = [i for i in stops if i != tokenizer.eos_token_id]
    if turn_ends:  # llama.cpp stops on eot as well as eos
        vocab.special["eot"] = turn_ends[0]
    prefix = tokenizer("a", add_special_tokens=True)["input_ids"]
    vocab.add_bos = tokenizer.bos_token_id is not None and prefix[:1] == [tokenizer.bos_token_id]
    vocab.add_eos = tokenizer.eos_token_id is not None and prefix[-1:] == [tokenizer.eos_token_id]
    return vocab


def _added_types(tokenizer: Any) -> dict[int, int]:
    """Added tokens: special ones are CONTROL (hidden when decoding), the others USER_DEFINED."""
    return {int(i): CONTROL if tok.special else USER_DEFINED for i, tok in tokenizer.added_tokens_decoder.items()}


def _byte_bpe(data: dict[str, Any], tokenizer: Any) -> GGUFVocab:
    model = data.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        raise ModelError(
            "GGUF export supports byte-level BPE (tokenizer.json) and SentencePiece (tokenizer.model) tokenizers; "
            f"this one is a {model.get('type')} model with pre-tokenizer {_pre_type(data)}"
        )
    by_id = {int(i): t for t, i in model["vocab"].items()}
    added = {int(t["id"]): t["content"] for t in data.get("added_tokens", [])}
    by_id.update(added)
    size = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    kinds = _added_types(tokenizer)
    types = [kinds.get(i, NORMAL if i in by_id else UNUSED) for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return GGUFVocab("gpt2", tokens, types, merges=merges, pre=_pre_name(data), add_space_prefix=False)


def _pre_type(data: dict[str, Any]) -> str:
    pre = data.get("pre_tokenizer") or {}
    return str(pre.get("type"))


def _split_regex(data: dict[str, Any]) -> str:
    """The regex that splits text before byte-level BPE (ByteLevel's own when it does the splitting)."""
    pre = data.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for part in parts:
        if part.get("type") == "Split":
            return str(part.get("pattern", {}).get("Regex", ""))
        if part.get("type") == "ByteLevel" and part.get("use_regex", True):
            return _GPT2_REGEX
    return ""


def _pre_name(data: dict[str, Any]) -> str:
    regex = _split_regex(data)
    if regex not in PRE_TOKENIZERS:
        raise ModelError(
            f"llama.cpp has no built-in pre-tokenizer for this tokenizer's split regex {regex!r}, "
            "so a GGUF would tokenize differently from training",
            hint=f"known pre-tokenizers: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}; "
            "export --to hf or --to mlx instead",
        )
    return PRE_TOKENIZERS[regex]


def _sentencepiece(path: Path, tokenizer: Any) -> GGUFVocab:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
    proto.ParseFromString(path.read_bytes())
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    for token_id, kind in _added_types(tokenizer).items():
        if token_id < len(tokens):
            # transformers treats these as atomic specials; SentencePiece may call them user-defined.
            types[token_id] = CONTROL if kind == CONTROL and types[token_id] != UNKNOWN else types[token_id]
        else:
            content = tokenizer.convert_ids_to_tokens(token_id)
            tokens += [f"[PAD{i}]" for i in range(len(tokens), token_id)]
            types += [UNUSED] * (token_id - len(types))
            scores += [0.0] * (token_id - len(scores))
            tokens.append(content)
            types.append(kind)
            scores.append(0.0)
    return GGUFVocab("llama", tokens, types, scores=scores)


def _space_prefix(tokenizer: Any, template: str | None) -> bool:
    """Whether llama.cpp must put a "▁" before text; refuse a tokenizer it can't reproduce.

    llama.cpp's SentencePiece tokenizer has one switch, ``add_space_prefix``:
    on, every run of text gets a "▁", at the start of the input and right
    after each special token (HF ``legacy=True`` / Metaspace ``always``, as
    Llama 2 and Mistral ship); off, none does (no dummy prefix, as Gemma).
    transformers' non-legacy Llama tokenizer (Metaspace ``first``) prefixes
    only the start of the input, which neither setting reproduces once a
    special token is followed by text, as in every chat prompt.  So the
    behaviour is probed on the tokenizer itself rather than read from configs.
    """
    at_start = _starts_with_space(tokenizer, "a")
    specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    used = [t for t in specials if template is not None and t in template]
    if not used:
        return at_start  # text never follows a special token in a prompt
    after_special = _starts_with_space(tokenizer, used[0] + "a", skip=1)
    if at_start != after_special:
        raise ModelError(
            "this SentencePiece tokenizer puts a space before the start of the text but not after special "
            "tokens (transformers' non-legacy Llama tokenizer); llama.cpp does both or neither, so a GGUF "
            "would tokenize chat prompts differently from training",
            hint='train with a legacy tokenizer ("legacy": true in tokenizer_config.json, as Llama 2 and '
            "Mistral ship) or a byte-level BPE one for GGUF; or export --to hf, mlx or onnx instead",
        )
    return at_start


def _starts_with_space(tokenizer: Any, text: str, *, skip: int = 0) -> bool:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][skip:]
    first = tokenizer.convert_ids_to_tokens(ids[:1])
    return bool(first) and str(first[0]).startswith("\u2581")


def _pad(vocab: GGUFVocab, size: int) -> None:
    """Models often have more embedding rows than tokens; GGUF wants one token per row."""
    if len(vocab.tokens) > size:
        raise ModelError(f"the tokenizer has {len(vocab.tokens)} tokens but the model only {size} embedding rows")
    extra = size - len(vocab.tokens)
    vocab.tokens += [f"[PAD{len(vocab.tokens) + i}]" for i in range(extra)]
    vocab.types += [UNUSED] * extra
    if vocab.scores is not None:
        vocab.scores += [0.0] * extra
