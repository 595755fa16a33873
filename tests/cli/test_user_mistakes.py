"""Config values and checkpoint files a user can get wrong give a message that names them, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.config.load import load_config
from tunelab.errors import ConfigError

HUGE = str(10**30)


@pytest.mark.parametrize(
    "key", ["train.steps", "train.save_every", "train.eval_every", "train.log_every", "train.keep_checkpoints"]
)
def test_a_step_count_past_a_32_bit_column_is_refused_with_its_range(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key}: must be >= \d and <= 2147483647"):
        load_config({"model": {"path": "m"}, "data": {"train": "d"}}, [f"{key}={HUGE}"])


def test_the_cli_says_so_without_a_traceback(cli, tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: {path: m}\ndata: {train: d}\n", encoding="utf-8")
    out = cli("train", str(cfg), f"train.steps={HUGE}")
    assert out.returncode == 2 and "train.steps" in out.stderr and "2147483647" in out.stderr
    assert "Traceback" not in out.stderr


def test_over_http_it_is_a_422(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from tunelab.api.app import create_app
    from tunelab.security.keys import create_key

    monkeypatch.setenv("TUNELAB_API_ROOTS", str(tmp_path))
    key, _ = create_key("test")
    config = {"model": {"path": str(tmp_path)}, "data": {"train": str(tmp_path)}, "train": {"steps": 10**30}}
    with TestClient(create_app(), headers={"Authorization": f"Bearer {key}"}) as api:
        refused = api.post("/v1/jobs", json={"config": config})
    assert refused.status_code == 422 and "train.steps" in refused.text, refused.text


def test_a_broken_config_json_is_named_as_such_not_as_a_tokenizer_problem(
    cli, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "config.json").write_text("{ not json", encoding="utf-8")
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello there"}\n', encoding="utf-8")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {{path: {model}}}\ndata: {{train: {data}}}\noutput_dir: {tmp_path / 'out'}\n")
    out = cli("train", str(cfg))
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "config.json is not valid JSON" in out.stderr and "tokenizer" not in out.stderr


def test_a_config_json_declaring_layers_the_weights_lack_is_refused(cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    config["num_hidden_layers"] += 4  # 4 layers more than the safetensors hold
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello there"}\n', encoding="utf-8")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {{path: {model}}}\ndata: {{train: {data}}}\nbackend: torch\noutput_dir: {tmp_path / 'o'}\n")
    out = cli("train", str(cfg))
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "does not hold" in out.stderr and "start random" in out.stderr


def test_an_unreachable_database_or_home_is_a_message_not_a_traceback(cli, tmp_path: Path) -> None:
    # Found by bench/adversarial.py: both printed SQLAlchemy's or pathlib's traceback.
    down = cli("runs", "list", env={"TUNELAB_DB_URL": "postgresql+psycopg://me:secret@127.0.0.1:1/db"})
    assert down.returncode == 8 and "Traceback" not in down.stderr, down.stderr
    assert "could not open the registry database" in down.stderr and "TUNELAB_DB_URL" in down.stderr
    assert "secret" not in down.stderr  # the URL is named without its password
    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    home = cli("runs", "list", env={"TUNELAB_HOME": str(blocker / "home")})
    assert home.returncode == 8 and "Traceback" not in home.stderr, home.stderr
    assert f"could not create {blocker / 'home'}" in home.stderr and "TUNELAB_HOME" in home.stderr
