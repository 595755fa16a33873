"""Tiny tokenizers and models load through the real transformers entry points."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab import tiny

# Plain prose the tokenizers learn merges from; a string keeps the list readable.
VOCAB_TEXT = (
    "the a cat dog bird sat on mat ran fast slowly big small red blue "
    "house tree river model data train loss token learns reads writes quiet bright over under near"
)
WORDS = VOCAB_TEXT.split()
ROUND_TRIP = [
    "The cat sat on the mat.",
    "Two  spaces and\na newline,\n\nthen two.",
    "Digits 12345 and punctuation: (ok)!",
]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rng = random.Random(0)
    out = []
    for _ in range(300):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 10))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ",\n"]))
    return out


@pytest.fixture(scope="module")
def tok_dirs(texts: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "bpe": tiny.train_bpe_tokenizer(texts, root / "bpe", vocab_size=384),
        "sentencepiece": tiny.train_sentencepiece_tokenizer(texts, root / "sp", vocab_size=384),
        "tiktoken": tiny.write_tiktoken_tokenizer(texts, root / "tt", vocab_size=384),
    }


def test_import_is_cheap() -> None:
    import subprocess
    import sys

    code = "import sys, tunelab.tiny; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_on_disk_forms(tok_dirs: dict[str, Path]) -> None:
    files = {form: {p.name for p in d.iterdir()} for form, d in tok_dirs.items()}
    assert "tokenizer.json" in files["bpe"]
    assert "tokenizer.model" in files["sentencepiece"] and "tokenizer.json" not in files["sentencepiece"]
    assert tiny.TIKTOKEN_FILE in files["tiktoken"] and "tokenizer.json" not in files["tiktoken"]
    cfg = json.loads((tok_dirs["sentencepiece"] / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "LlamaTokenizer"


@pytest.mark.parametrize("form", tiny.TOKENIZER_FORMS)
def test_tokenizer_round_trips(form: str, tok_dirs: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(tok_dirs[form])
    assert 300 <= len(tok) <= 384
    for text in ROUND_TRIP:
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) < len(text.encode())  # merges were learned, not just bytes
        assert tok.decode(ids) == text
    # Text never seen in training still round-trips: byte-level / byte fallback.
    odd = "Zebra quokka: naïve café €5"
    assert tok.decode(tok.encode(odd, add_special_tokens=False)) == odd


@pytest.mark.parametrize("form", ["bpe", "tiktoken"])
def test_byte_level_specials(form: str, tok_dirs: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(tok_dirs[form])
    assert tok.bos_token is None
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    specials = tok.convert_tokens_to_ids(list(tiny.SPECIAL_TOKENS))
    assert specials == list(range(len(tok) - 3, len(tok)))  # on top of the base vocab, as in Qwen
    ids = tok.encode("hi<|im_end|>", add_special_tokens=False)
    assert ids[-1] == specials[2]
    assert tok.decode(ids, skip_special_tokens=True) == "hi"


def test_bpe_and_tiktoken_agree(tok_dirs: dict[str, Path]) -> None:
    bpe = AutoTokenizer.from_pretrained(tok_dirs["bpe"])
    tt = AutoTokenizer.from_pretrained(tok_dirs["tiktoken"])
    assert len(bpe) == len(tt)
    for text in ROUND_TRIP:
        assert bpe.encode(text) == tt.encode(text)


def test_sentencepiece_specials(tok_dirs: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(tok_dirs["sentencepiece"])
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    ids = tok.encode("The cat")
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    chat = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert chat[0] == tok.convert_tokens_to_ids("<|im_start|>") and chat[-1] == 5


@pytest.mark.parametrize("form", tiny.TOKENIZER_FORMS)
def test_chat_template(form: str, tok_dirs: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(tok_dirs[form])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == rendered + "<|im_start|>assistant\n"
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3


def test_tokenizer_without_template(texts: list[str], tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny.train_bpe_tokenizer(texts[:50], tmp_path, chat_template=None))
    assert not tok.chat_template


def test_tiktoken_rewrite_is_not_stale(texts: list[str], tmp_path: Path) -> None:
    first = len(AutoTokenizer.from_pretrained(tiny.write_tiktoken_tokenizer(texts, tmp_path, vocab_size=384)))
    second = len(AutoTokenizer.from_pretrained(tiny.write_tiktoken_tokenizer(texts, tmp_path, vocab_size=300)))
    assert (first, second) == (384, 300)


@pytest.mark.parametrize("arch", list(tiny.ARCHS))
def test_arch_loads_and_runs(arch: str, tmp_path: Path) -> None:
    tiny.build_tiny_model(tmp_path, vocab_size=300, arch=arch, eos_token_id=299, pad_token_id=299)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.model_type == tiny.ARCHS[arch]
    assert model.dtype == torch.float32 and model.config.pad_token_id == 299
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])).logits
    assert logits.shape == (2, 5, 300)
    assert torch.isfinite(logits).all()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_seed_determines_weights(tmp_path: Path) -> None:
    state = torch.random.get_rng_state()
    a = _weights(tiny.build_tiny_model(tmp_path / "a", vocab_size=300, seed=3))
    b = _weights(tiny.build_tiny_model(tmp_path / "b", vocab_size=300, seed=3))
    c = _weights(tiny.build_tiny_model(tmp_path / "c", vocab_size=300, seed=4))
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG untouched
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_sharded_checkpoint_reloads(tmp_path: Path) -> None:
    whole = tiny.build_tiny_model(tmp_path / "whole", vocab_size=300, arch="qwen2", seed=1)
    sharded = tiny.build_tiny_model(tmp_path / "sharded", vocab_size=300, arch="qwen2", seed=1, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    a = AutoModelForCausalLM.from_pretrained(whole).state_dict()
    b = AutoModelForCausalLM.from_pretrained(sharded).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tied_embeddings(tmp_path: Path) -> None:
    tiny.build_tiny_model(tmp_path, vocab_size=300, arch="gemma", tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize(("form", "arch"), [("bpe", "qwen2"), ("sentencepiece", "llama"), ("tiktoken", "phi3")])
def test_checkpoint_folder(form: str, arch: str, texts: list[str], tmp_path: Path) -> None:
    path = tiny.make_tiny_checkpoint(tmp_path, texts, arch=arch, tokenizer=form, vocab_size=384)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.bos_token_id == tok.bos_token_id
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    batch = tok([prompt], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] <= batch["input_ids"].shape[1] + 4


def test_bad_arguments(texts: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        tiny.build_tiny_model(tmp_path, vocab_size=300, arch="gpt9")
    with pytest.raises(ValueError, match="outside vocab_size"):
        tiny.build_tiny_model(tmp_path, vocab_size=300, eos_token_id=300)
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        tiny.train_bpe_tokenizer(texts, tmp_path, vocab_size=100)
    with pytest.raises(ValueError, match="unknown tokenizer form"):
        tiny.make_tiny_checkpoint(tmp_path, texts, tokenizer="wordpiece")
