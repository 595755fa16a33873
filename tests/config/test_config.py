"""The run config: YAML + ``key.sub=value`` overrides -> a validated, frozen RunConfig.

The dotted keys are a public contract and every error must name the key and say
what to change (nearest valid key for a typo, allowed values or range for a bad value).
"""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from tunelab.config.load import all_keys, load_config, parse_overrides
from tunelab.config.schema import RunConfig
from tunelab.errors import ConfigError

BASE = {"model": {"path": "some/model"}, "data": {"train": "train.jsonl"}}

CONTRACT_KEYS = (
    "model.path",
    "data.train",
    "data.valid",
    "data.format",
    "data.max_seq_len",
    "data.mask_prompt",
    "method.name",
    "method.rank",
    "method.alpha",
    "method.dropout",
    "method.targets",
    "train.steps",
    "train.epochs",
    "train.batch_size",
    "train.grad_accum",
    "train.lr",
    "train.scheduler",
    "train.warmup",
    "train.seed",
    "train.eval_every",
    "train.save_every",
    "backend",
    "device",
    "output_dir",
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _config_error(*overrides: str, source: object = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(BASE if source is None else source, list(overrides))
    return str(info.value)


# --------------------------------------------------------------------------- loading


def test_yaml_file_loads_with_types_and_defaults(tmp_path: Path) -> None:
    cfg_file = _write(
        tmp_path / "run.yaml",
        "model:\n  path: ./models/tiny\n"
        "data:\n  train: data/train.jsonl\n  max_seq_len: 256\n  mask_prompt: false\n"
        "method:\n  name: dora\n  rank: 4\n  targets: [q_proj, v_proj]\n"
        "train:\n  lr: 1e-4\n  steps: 30\n  warmup: 0.1\n"
        "device: cpu\n",
    )
    cfg = load_config(cfg_file)
    assert isinstance(cfg, RunConfig)
    assert cfg.model.path == "./models/tiny"
    assert cfg.data.max_seq_len == 256 and cfg.data.mask_prompt is False
    assert cfg.method.name == "dora" and cfg.method.rank == 4
    assert cfg.method.targets == ["q_proj", "v_proj"]
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 30 and cfg.train.epochs is None
    assert cfg.device == "cpu"
    # Untouched keys keep their documented defaults.
    assert cfg.data.format == "auto" and cfg.train.scheduler == "cosine" and cfg.backend == "auto"
    assert cfg.method.alpha == 16.0 and cfg.train.batch_size == 4


def test_empty_yaml_plus_overrides_is_enough(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path / "empty.yaml", ""), ["model.path=m", "data.train=t.jsonl"])
    assert cfg.model.path == "m" and cfg.data.train == "t.jsonl"


def test_overrides_are_typed_and_win_over_yaml(tmp_path: Path) -> None:
    cfg_file = _write(
        tmp_path / "run.yaml", "model: {path: m}\ndata: {train: t.jsonl}\ntrain: {lr: 0.1, batch_size: 2}\n"
    )
    cfg = load_config(
        cfg_file,
        [
            "train.lr=1e-4",
            "train.batch_size=8",
            "train.warmup=0.25",
            "data.mask_prompt=false",
            "method.targets=[q_proj,v_proj]",
            "output_dir=/tmp/out",
        ],
    )
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.batch_size == 8 and isinstance(cfg.train.batch_size, int)
    assert cfg.train.warmup == 0.25
    assert cfg.data.mask_prompt is False
    assert cfg.method.targets == ["q_proj", "v_proj"]
    assert cfg.output_dir == "/tmp/out"


def test_parse_overrides_types() -> None:
    pairs = dict(
        parse_overrides(
            ["train.steps=10", "train.warmup=0.5", "data.mask_prompt=true", "method.targets=[q_proj,v_proj]"]
        )
    )
    assert pairs == {
        "train.steps": 10,
        "train.warmup": 0.5,
        "data.mask_prompt": True,
        "method.targets": ["q_proj", "v_proj"],
    }
    assert type(pairs["train.steps"]) is int and type(pairs["data.mask_prompt"]) is bool


def test_parse_overrides_reads_exponent_floats_as_numbers() -> None:
    # The docstring promises typed pairs for exactly this example; pydantic later coerces the
    # string for float keys, but e.g. data.max_seq_len=1e3 is then refused as "not an integer".
    assert parse_overrides(["train.lr=1e-4"]) == [("train.lr", 1e-4)]


def test_malformed_override_is_refused() -> None:
    message = _config_error("train.lr")
    assert "train.lr" in message and "key.sub=value" in message


def test_override_into_a_value_is_refused() -> None:
    message = _config_error("train=5", "train.lr=1")
    assert "train.lr" in message and "not a section" in message


def test_mapping_source_is_not_mutated() -> None:
    source = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}}
    load_config(source, ["model.path=other", "train.lr=0.5"])
    assert source == {"model": {"path": "m"}, "data": {"train": "t.jsonl"}}


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("override", "bad_key", "suggestion"),
    [
        ("train.lrr=1", "train.lrr", "train.lr"),
        ("trian.lr=1", "trian", "train"),
        ("data.trian=x.jsonl", "data.trian", "data.train"),
        ("train.warm_up=3", "train.warm_up", "train.warmup"),
        ("modle.path=x", "modle", "model"),
    ],
)
def test_unknown_key_names_it_and_suggests_the_nearest(override: str, bad_key: str, suggestion: str) -> None:
    message = _config_error(override)
    assert f"{bad_key}: unknown key" in message
    assert f"did you mean {suggestion}?" in message


def test_unknown_key_without_a_close_match_lists_the_valid_keys() -> None:
    message = _config_error("zzzzzzzz=1")
    assert "zzzzzzzz: unknown key" in message
    assert "model" in message and "train" in message and "output_dir" in message


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("train.lr=-1", "train.lr", ["> 0", "<= 10"]),
        ("data.max_seq_len=2", "data.max_seq_len", [">= 8", "<= 1048576"]),
        ("method.rank=0", "method.rank", [">= 1"]),
        ("method.dropout=1", "method.dropout", [">= 0", "< 1"]),
        ("train.steps=0", "train.steps", [">= 1"]),
        ("method.name=lorra", "method.name", ["lora", "dora", "full", "freeze", "prefix", "ia3"]),
        ("train.scheduler=cosin", "train.scheduler", ["constant", "linear", "cosine"]),
        ("data.format=jsonl", "data.format", ["auto", "text", "completion", "instruction", "chat"]),
        ("device=gpu", "device", ["auto", "cuda", "mps", "cpu"]),
        ("backend=jax", "backend", ["auto", "torch", "mlx"]),
    ],
)
def test_bad_value_names_the_key_and_what_is_allowed(override: str, key: str, expected: list[str]) -> None:
    message = _config_error(override)
    line = next(line for line in message.splitlines() if line.strip().startswith(f"- {key}:"))
    for part in expected:
        assert part in line, line
    assert f"got {override.partition('=')[2]}" in line.replace("'", "")  # the offending value is quoted back


def test_every_problem_is_listed_at_once() -> None:
    message = _config_error("train.lr=-1", "data.max_seq_len=2", "method.name=lorra", "train.lrr=1")
    for key in ("train.lr:", "data.max_seq_len:", "method.name:", "train.lrr:"):
        assert key in message


def test_required_sections_are_named() -> None:
    message = _config_error(source={})
    assert "model: required key is missing" in message
    assert "data: required key is missing" in message


def test_steps_and_epochs_together_are_refused() -> None:
    message = _config_error("train.steps=10", "train.epochs=2")
    assert "train.steps" in message and "train.epochs" in message and "not both" in message
    assert load_config(BASE, ["train.epochs=2"]).train.epochs == 2.0


def test_config_is_frozen() -> None:
    cfg = load_config(BASE)
    with pytest.raises(pydantic.ValidationError):
        cfg.train.lr = 1.0  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        cfg.device = "cpu"  # type: ignore[misc]
    assert cfg.train.lr == 2e-4


def test_to_dict_round_trips() -> None:
    cfg = load_config(BASE, ["method.targets=[q_proj]", "train.steps=3"])
    assert load_config(cfg.to_dict()) == cfg


def test_all_keys_holds_the_public_contract() -> None:
    keys = all_keys()
    missing = [k for k in CONTRACT_KEYS if k not in keys]
    assert missing == []
    assert len(keys) == len(set(keys))
    # Every key all_keys() lists is one load_config accepts as an override target.
    assert "train.lr" in keys and "train" in keys


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    cfg_file = _write(
        tmp_path / "broken.yaml", "model:\n  path: m\ndata:\n  train: x\n  format: [chat\ntrain:\n  lr: 1\n"
    )
    message = _config_error(source=cfg_file)
    assert f"{cfg_file}:6:" in message
    assert "YAML syntax error" in message


def test_yaml_tab_indentation_names_the_line(tmp_path: Path) -> None:
    cfg_file = _write(tmp_path / "tabs.yaml", "model:\n  path: m\ndata:\n\ttrain: x\n")
    assert f"{cfg_file}:4:" in _config_error(source=cfg_file)


def test_yaml_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    cfg_file = _write(tmp_path / "list.yaml", "- model\n- data\n")
    message = _config_error(source=cfg_file)
    assert str(cfg_file) in message and "mapping" in message


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    message = _config_error(source=missing)
    assert str(missing) in message and "does not exist" in message


def test_non_utf8_config_file(tmp_path: Path) -> None:
    cfg_file = tmp_path / "latin1.yaml"
    cfg_file.write_bytes("model:\n  path: caf\xe9\n".encode("latin-1"))
    message = _config_error(source=cfg_file)
    assert str(cfg_file) in message and "UTF-8" in message


def test_duplicate_yaml_key_is_refused(tmp_path: Path) -> None:
    cfg_file = _write(tmp_path / "dup.yaml", "model: {path: m}\ndata: {train: t}\ntrain:\n  lr: 0.1\n  lr: 0.2\n")
    message = _config_error(source=cfg_file)
    assert "lr" in message and f"{cfg_file}:5" in message
