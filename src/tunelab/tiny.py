"""Tiny causal LMs and tokenizers built on the spot, in every on-disk form.

Tests and ``tunelab quickstart`` must exercise the *real* loading code
(``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained`` on a local folder)
without touching a model hub.  So instead of mocking, this module trains small
tokenizers on a handful of sentences and random-initialises small models, then
writes them in the same layouts real checkpoints use:

* ``bpe``: byte-level BPE saved as ``tokenizer.json`` (Qwen/GPT-style, fast path);
* ``sentencepiece``: a ``tokenizer.model`` proto with *no* ``tokenizer.json``,
  so transformers has to convert the SentencePiece file itself (Llama-style);
* ``tiktoken``: a base64 ``token rank`` file named ``tiktoken.model`` that
  transformers converts through its TikToken converter.

torch and transformers are imported inside functions so importing this module
stays cheap for the CLI.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer

CHATML: str = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
"""ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, plus an open assistant header."""

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, "<|im_start|>", "<|im_end|>")
TOKENIZER_FORMS: tuple[str, ...] = ("bpe", "sentencepiece", "tiktoken")
TIKTOKEN_FILE = "tiktoken.model"

# Public arch name -> transformers model_type.  gemma3 is the text-only config.
ARCHS: dict[str, str] = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}

# The split regex transformers' TikTokenConverter applies when it loads a tiktoken
# file.  Training the BPE with the same pre-tokenisation keeps the bpe and
# tiktoken forms tokenising text identically.
_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_SP_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
_SP_CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


# --------------------------------------------------------------------------- tokenizers


def _train_byte_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE *without* special tokens.

    Specials are appended afterwards so they get the highest ids, as in Qwen and
    as the tiktoken format requires (its file holds only mergeable ranks).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    base = vocab_size - len(SPECIAL_TOKENS)
    if base < 256:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            # use_regex=False: the split above already did the GPT-style chunking.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Seeding the full byte alphabet means any text, not just the corpus, round-trips.
    trainer = trainers.BpeTrainer(
        vocab_size=base, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _added_token(content: str, *, special: bool = True) -> dict[str, Any]:
    """An ``added_tokens_decoder`` entry as tokenizer_config.json stores it."""
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def train_bpe_tokenizer(
    texts: Iterable[str], out_dir: Path, *, vocab_size: int = 512, chat_template: str | None = CHATML
) -> Path:
    """Train a byte-level BPE and save it as ``tokenizer.json`` + ``tokenizer_config.json``.

    ``<|endoftext|>`` is eos and pad; bos stays unset, as in Qwen, so nothing is
    silently prepended.  ``vocab_size`` counts the specials; a small corpus may
    run out of merges first, so read the real size with ``len(tokenizer)``.
    """
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tok = _train_byte_bpe(texts, vocab_size)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        bos_token=None,
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
    )
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


def train_sentencepiece_tokenizer(
    texts: Iterable[str],
    out_dir: Path,
    *,
    vocab_size: int = 512,
    chat_template: str | None = CHATML,
    legacy: bool = False,
) -> Path:
    """Train a SentencePiece BPE and save it Llama-style: ``tokenizer.model``, no ``tokenizer.json``.

    Leaving out tokenizer.json forces transformers down its SentencePiece
    conversion path, which is what old Llama/Mistral checkpoints exercise.  The
    model is BPE (not unigram) because ``LlamaTokenizer`` rebuilds a BPE from
    the proto.  Byte fallback keeps unseen characters encodable; identity
    normalisation and kept whitespace make decoding round-trip.

    ``legacy`` picks the flavour: ``False`` (transformers' modern Llama
    tokenizer) puts "▁" only before the start of the input; ``True`` (Llama 2's
    original) puts it before every run of text, also right after a special
    token, which is what llama.cpp's SentencePiece tokenizer does.
    """
    import sentencepiece as spm

    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=proto,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            user_defined_symbols=list(_SP_CHAT_TOKENS),
            character_coverage=1.0,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            hard_vocab_limit=False,
            minloglevel=2,
        )
    except RuntimeError as exc:  # SentencePiece reports bad sizes as INTERNAL errors
        raise ValueError(f"sentencepiece training failed (vocab_size={vocab_size}): {exc}") from exc
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(proto.getvalue())
    pieces = (*_SP_SPECIALS, *_SP_CHAT_TOKENS)  # ids 0..5, fixed by the trainer options above
    config: dict[str, Any] = {
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": legacy,
        "clean_up_tokenization_spaces": False,
        # Marks the ChatML pieces special too, so skip_special_tokens drops them.
        "added_tokens_decoder": {str(i): _added_token(p) for i, p in enumerate(pieces)},
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    _write_json(out_dir / "tokenizer_config.json", config)
    return out_dir


def write_tiktoken_tokenizer(
    texts: Iterable[str], out_dir: Path, *, vocab_size: int = 512, chat_template: str | None = CHATML
) -> Path:
    """Write a tiktoken-format BPE (``tiktoken.model``) that transformers converts on load.

    transformers 5 loads such a file when there is no tokenizer.json: its
    TikTokenConverter reads ``base64(token_bytes) rank`` lines, rebuilds merges
    from the ranks and appends the ``added_tokens_decoder`` entries above the
    base vocabulary.  The ranks come from a byte-level BPE trained here.
    """
    tok = _train_byte_bpe(texts, vocab_size)
    lines = _tiktoken_lines(tok)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / TIKTOKEN_FILE
    path.write_text("".join(f"{line}\n" for line in lines), encoding="ascii")
    _forget_tiktoken_cache(path)
    base = len(lines)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(base + i): _added_token(t) for i, t in enumerate(SPECIAL_TOKENS)},
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    _write_json(out_dir / "tokenizer_config.json", config)
    return out_dir


def _tiktoken_lines(tok: Tokenizer) -> list[str]:
    """Export a byte-level BPE vocab as tiktoken ``base64 rank`` lines, rank = id."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # Byte-level BPE stores bytes as printable stand-in characters; undo that.
    char_to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab = tok.get_vocab(with_added_tokens=False)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise AssertionError("BPE ids are not contiguous; tiktoken ranks must be")
    lines = []
    for piece, rank in sorted(vocab.items(), key=lambda item: item[1]):
        raw = bytes(char_to_byte[c] for c in piece)
        lines.append(f"{base64.b64encode(raw).decode('ascii')} {rank}")
    return lines


def _forget_tiktoken_cache(path: Path) -> None:
    """Drop tiktoken's cached copy of ``path`` so a rewritten file is not read stale.

    tiktoken caches every file it reads under a key derived from the path
    string alone (not the content), so rewriting a folder would otherwise load
    the previous vocabulary.  Only the common spellings of the path can be
    cleared; this mirrors tiktoken.load.read_file_cached's cache location.
    """
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache_dir:
        return  # caching disabled
    for spelling in {str(path), os.path.abspath(path), os.path.realpath(path)}:
        key = hashlib.sha1(spelling.encode()).hexdigest()
        Path(cache_dir, key).unlink(missing_ok=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- models


def _model_config(arch: str, **fields: Any) -> Any:
    """A transformers config for ``arch`` with every size field set explicitly.

    head_dim is always derived from hidden/heads because several archs
    (gemma: 256, qwen3: 128) default to a head_dim far larger than a tiny model.
    Special-token ids are passed even when None: phi3 otherwise defaults pad
    to 32000, outside a tiny vocabulary.
    """
    from transformers import AutoConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    heads, kv_heads = fields["num_attention_heads"], fields["num_key_value_heads"]
    if fields["hidden_size"] % heads or heads % kv_heads:
        raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = fields[name]
        if value is not None and not 0 <= value < fields["vocab_size"]:
            raise ValueError(f"{name}={value} is outside vocab_size={fields['vocab_size']}")
    return AutoConfig.for_model(ARCHS[arch], head_dim=fields["hidden_size"] // heads, **fields)


def build_tiny_model(
    out_dir: Path,
    *,
    vocab_size: int,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
    pad_token_id: int | None = None,
    max_shard_size: str | None = None,
) -> Path:
    """Random-initialise a float32 causal LM and save it as safetensors in ``out_dir``.

    Weights depend only on the arguments (the seed is applied inside a forked
    RNG, so the caller's torch random state is left alone).  A small
    ``max_shard_size`` such as ``"100KB"`` yields a sharded checkpoint with
    ``model.safetensors.index.json``.  transformers 5 always writes safetensors,
    so there is no ``safe_serialization`` switch to pass.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = _model_config(
        arch,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
        pad_token_id=pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out_dir = Path(out_dir)
    save_kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **save_kwargs)
    return out_dir


def make_tiny_checkpoint(
    out_dir: Path,
    texts: Iterable[str],
    *,
    arch: str = "llama",
    tokenizer: str = "bpe",
    vocab_size: int = 512,
    seed: int = 0,
    sp_legacy: bool = False,
    **model_kwargs: Any,
) -> Path:
    """Write tokenizer and matching model into one folder: a local HF checkpoint.

    The tokenizer is reloaded through ``AutoTokenizer`` before the model is
    built so the model's vocabulary and special-token ids come from what a
    loader will actually see (``len(tokenizer)``, not the requested size).
    ``model_kwargs`` go to :func:`build_tiny_model` and win over derived ids.
    ``sp_legacy`` picks the SentencePiece flavour (see :func:`train_sentencepiece_tokenizer`).
    """
    from transformers import AutoTokenizer

    writers = {
        "bpe": train_bpe_tokenizer,
        "sentencepiece": train_sentencepiece_tokenizer,
        "tiktoken": write_tiktoken_tokenizer,
    }
    if tokenizer not in writers:
        raise ValueError(f"unknown tokenizer form {tokenizer!r}; choose one of {', '.join(TOKENIZER_FORMS)}")
    out_dir = Path(out_dir)
    if tokenizer == "sentencepiece":
        train_sentencepiece_tokenizer(texts, out_dir, vocab_size=vocab_size, legacy=sp_legacy)
    else:
        writers[tokenizer](texts, out_dir, vocab_size=vocab_size)
    tok = AutoTokenizer.from_pretrained(out_dir)
    ids = {
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    return build_tiny_model(out_dir, vocab_size=len(tok), arch=arch, seed=seed, **{**ids, **model_kwargs})
