"""Composition: `defaults:` presets and ${…} references give the same config as one written out by hand.

Errors keep today's wording (unknown key with a suggestion, bad value with its range) and say where
the bad key was written, inside a preset too; `config schema` is a JSON Schema the configs pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from tests.conftest import run_cli

from tunelab.cli.main import main
from tunelab.config.compose import available_presets, shipped_presets
from tunelab.config.editor import json_schema
from tunelab.config.load import load_config
from tunelab.errors import ConfigError

COMPOSED = """\
defaults:
  - model: smollm2-135m
  - method: qlora
  - data: chat
  - train: short
  - _self_
data:
  train: ${oc.env:TL_DATA}/train.jsonl
train:
  warmup: ${train.eval_every}
name: qlora-r${method.rank}-lr${train.lr}
"""

SHORT = "steps: 30\nlr: 3.0e-4\neval_every: 5\n"

BY_HAND = """\
model:
  path: HuggingFaceTB/SmolLM2-135M-Instruct
  dtype: auto
method:
  name: qlora
  bits: 4
  rank: 16
  alpha: 32
  dropout: 0.0
  targets: all-linear
data:
  train: {data}/train.jsonl
  format: chat
  mask_prompt: true
  train_on: all_assistant
  max_seq_len: 2048
train:
  steps: 30
  lr: 3.0e-4
  eval_every: 5
  warmup: 5
name: qlora-r16-lr0.0003
"""


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


def test_presets_and_references_show_the_same_config_as_one_written_by_hand(tmp_path: Path) -> None:
    composed = _write(tmp_path / "composed" / "run.yaml", COMPOSED)
    _write(tmp_path / "composed" / "train" / "short.yaml", SHORT)  # a user preset beside the config
    by_hand = _write(tmp_path / "hand.yaml", BY_HAND.format(data=tmp_path))
    env = {"TL_DATA": str(tmp_path)}
    shown = [run_cli("config", "show", path, env=env) for path in (composed, by_hand)]
    assert [p.returncode for p in shown] == [0, 0], [p.stderr for p in shown]
    assert shown[0].stdout == shown[1].stdout
    assert yaml.safe_load(shown[0].stdout)["method"]["bits"] == 4  # qlora's own defaults: [lora] then its keys

    # an override is applied before references are resolved, so they see it (as in Hydra)
    over = run_cli("config", "show", composed, "method.rank=8", "--json", env=env)
    assert json.loads(over.stdout)["name"] == "qlora-r8-lr0.0003", over.stderr


def test_a_bad_value_inside_a_preset_names_the_preset_file_and_line(tmp_path: Path, tunelab_home: Path) -> None:
    preset = _write(tunelab_home / "presets" / "method" / "wide.yaml", "# wide\nname: lora\nrank: 0\nalphaa: 2\n")
    cfg = _write(tmp_path / "run.yaml", "defaults:\n  - method: wide\nmodel: {path: m}\ndata: {train: t}\n")
    message = _error(cfg)
    assert f"method.rank: must be >= 1 and <= 4096 (got 0) ({preset}:3)" in message
    assert f"method.alphaa: unknown key; did you mean method.alpha? ({preset}:4)" in message
    # the same key given on the command line is the command line's
    assert "method.rank: must be >= 1 and <= 4096 (got 0) (command line)" in _error(cfg, "method.rank=0")


def test_the_cli_says_where_without_a_traceback(tmp_path: Path) -> None:
    _write(tmp_path / "data" / "bad.yaml", "format: chat\nmax_seq_len: 4\n")
    cfg = _write(tmp_path / "run.yaml", "defaults:\n  - data: bad\nmodel: {path: m}\ndata: {train: t}\n")
    shown = run_cli("config", "show", cfg)
    assert shown.returncode != 0 and "Traceback" not in shown.stderr
    said = "".join(shown.stderr.split())  # the console may wrap a long path
    assert f"data.max_seq_len:mustbe>=8and<=1048576(got4)({tmp_path / 'data' / 'bad.yaml'}:2)" in said


def test_defaults_mistakes_are_said_with_what_exists(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "run.yaml", "model: {path: m}\ndata: {train: t}\ndefaults:\n  - method: qlorra\n")
    message = _error(cfg)
    assert f"{cfg}:3: no preset method: qlorra" in message
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert "qlora" in (info.value.hint or "")  # the presets that do exist
    _write(tmp_path / "method" / "a.yaml", "defaults: [b]\n")
    _write(tmp_path / "method" / "b.yaml", "defaults: [a]\n")
    loop = _write(tmp_path / "loop.yaml", "defaults:\n  - method: a\n")
    assert "includes itself" in _error(loop)
    wrong = _write(tmp_path / "group.yaml", "defaults:\n  - optimizer: adam\n")
    assert "'optimizer' is not a preset group; the groups are model, data, method, objective, train" in _error(wrong)
    ref = _write(tmp_path / "ref.yaml", "model: {path: m}\ndata: {train: t}\nname: ${train.lrr}\n")
    assert f"name: Interpolation key 'train.lrr' not found ({ref}:3)" in _error(ref)


def test_every_shipped_preset_composes_into_a_valid_config(tmp_path: Path) -> None:
    presets = available_presets()
    assert set(presets) >= {"model", "method", "data", "train"}
    for group, names in presets.items():
        for name in names:
            path = _write(tmp_path / f"{group}-{name}.yaml", f"defaults:\n  - {group}: {name}\n")
            cfg = load_config(path, ["model.path=m", "data.train=t"] if group != "model" else ["data.train=t"])
            assert getattr(cfg, group) is not None
    assert (shipped_presets() / "method" / "qlora.yaml").is_file()


def test_schema_checks_configs_and_init_points_editors_at_it(tmp_path: Path, tunelab_home: Path) -> None:
    schema = json_schema()
    written_out = {"defaults": [{"method": "qlora"}, "_self_"], **yaml.safe_load(BY_HAND.format(data="d"))}
    jsonschema.validate(written_out, schema)  # a defaults: list is part of a config file
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**written_out, "trian": {}}, schema)
    out = tmp_path / "tunelab.yaml"
    with pytest.raises(SystemExit) as done:
        main(["init", "--yes", "--model", "org/model", "--data", str(tmp_path), "-o", str(out)])
    assert done.value.code in (0, None)
    first = out.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# yaml-language-server: $schema=")
    written = Path(first.split("=", 1)[1])
    assert json.loads(written.read_text(encoding="utf-8")) == schema
    jsonschema.validate(yaml.safe_load(out.read_text(encoding="utf-8")), schema)
