"""Importing bitsandbytes after tunelab asks nothing of the Hugging Face Hub (tunelab/bnb_import.py says why)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("kernels")

# In a fresh interpreter: record, for each kernel bitsandbytes asks the kernels package for while it is
# imported, whether the Hub was offline then.  The recorder fetches nothing (it raises, as a failed fetch
# does, which bitsandbytes passes over), so neither run reaches the network.
PROBE = """
import json, sys
import huggingface_hub.constants as hub
import kernels

asked = []

def recorder(*args, **kwargs):
    asked.append(bool(hub.HF_HUB_OFFLINE))
    raise RuntimeError("not fetched in this test")

kernels.get_kernel = recorder
if sys.argv[1] == "tunelab":
    import tunelab  # noqa: F401
import importlib.util

assert importlib.util.find_spec("bitsandbytes") is not None  # as availability checks look first
import bitsandbytes  # noqa: F401
print(json.dumps({"asked": asked, "offline_after": bool(hub.HF_HUB_OFFLINE)}))
"""


def _import(first: str) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, first], capture_output=True, text=True, env=env, timeout=300, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_bitsandbytes_imported_after_tunelab_asks_the_hub_for_nothing_and_says_nothing_about_it() -> None:
    plain, _ = _import("plain")
    if not plain["asked"]:
        pytest.skip("bitsandbytes asks the Hub for a kernel only on CPUs with AVX-512 BF16; this one has none")
    assert plain["asked"] == [False]  # on its own, bitsandbytes would have asked the Hub
    ours, stderr = _import("tunelab")
    assert ours == {"asked": [True], "offline_after": False}  # offline for that import only
    assert "kernels-community" not in stderr and "not fetched" not in stderr, stderr
