"""Secrets are encrypted at rest with a key file only the owner can read; API keys are stored as hashes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from tunelab.errors import ConfigError, NotFoundError, StateError
from tunelab.registry.db import open_registry, session_scope
from tunelab.registry.tables import ApiKeyRow, SecretRow
from tunelab.security import keys, secrets


def test_secret_round_trip_is_encrypted_with_a_private_key_file(tunelab_home: Path) -> None:
    secrets.set_secret("hf_token", "hf_abc123-very-secret")
    assert secrets.get_secret("hf_token") == "hf_abc123-very-secret"
    assert secrets.get_secret("missing") is None
    with session_scope(open_registry()) as s:
        stored = s.scalars(select(SecretRow.ciphertext)).one()
    assert "hf_abc123" not in stored
    assert b"hf_abc123" not in (tunelab_home / "tunelab.db").read_bytes()
    key_file = tunelab_home / "secret.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    secrets.set_secret("hf_token", "replaced")
    assert secrets.get_secret("hf_token") == "replaced" and secrets.list_secrets() == ["hf_token"]


def test_unsafe_or_foreign_key_file_and_bad_names_are_refused(tunelab_home: Path) -> None:
    secrets.set_secret("wandb_api_key", "w1")
    key_file = tunelab_home / "secret.key"
    os.chmod(key_file, 0o644)
    with pytest.raises(StateError, match="chmod 600"):
        secrets.get_secret("wandb_api_key")
    key_file.unlink()
    with pytest.raises(StateError, match="another key"):
        secrets.get_secret("wandb_api_key")  # a new key file was made: the old ciphertext can't be read
    for bad in ("", "../x", "a b", "x" * 65):
        with pytest.raises(ConfigError):
            secrets.set_secret(bad, "v")
    with pytest.raises(NotFoundError):
        secrets.delete_secret("never-set")


def test_cli_stores_secret_from_stdin_and_keys_as_hashes(tunelab_home: Path) -> None:
    env = {**os.environ, "TUNELAB_HOME": str(tunelab_home)}
    tl = [sys.executable, "-m", "tunelab"]
    subprocess.run([*tl, "auth", "set-secret", "hf_token"], input="tok-123\n", env=env, check=True, text=True)
    assert secrets.get_secret("hf_token") == "tok-123"
    made = subprocess.run([*tl, "auth", "create-key", "--name", "ci"], env=env, capture_output=True, text=True)
    key = made.stdout.split()[-1]
    assert key.startswith("tl_") and keys.verify_key(key) is not None
    with session_scope(open_registry()) as s:
        row = s.scalars(select(ApiKeyRow)).one()
    assert row.key_hash == keys.hash_key(key) and key not in row.key_hash and row.prefix == key[:8]
    bad = subprocess.run([*tl, "auth", "revoke", "nobody"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "auth list" in bad.stderr
    with pytest.raises(ConfigError):
        keys.create_key("  ")
