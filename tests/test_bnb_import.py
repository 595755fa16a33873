"""Importing bitsandbytes after tunelab asks nothing of the Hugging Face Hub (tunelab/bnb_import.py says why)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("kernels")

# In a fresh interpreter, with the kernels package's fetch replaced by a recorder that fetches nothing (it
# raises, as a failed fetch does, which bitsandbytes passes over): whether bitsandbytes' import reached it.
PROBE = """
import importlib.util, json, sys
import kernels

fetched = []

def recorder(repo_id, *args, **kwargs):
    fetched.append(repo_id)
    raise RuntimeError("not fetched in this test")

kernels.get_kernel = recorder
if sys.argv[1] == "tunelab":
    import tunelab  # noqa: F401
assert importlib.util.find_spec("bitsandbytes") is not None  # as availability checks look first
import bitsandbytes  # noqa: F401
print(json.dumps({"fetched": fetched, "restored": kernels.get_kernel is recorder}))
"""


def _import(first: str) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", PROBE, first], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_bitsandbytes_imported_after_tunelab_fetches_no_kernel_and_says_nothing_about_it() -> None:
    plain, _ = _import("plain")
    if not plain["fetched"]:
        pytest.skip("bitsandbytes asks the Hub for a kernel only on CPUs with AVX-512 BF16; this one has none")
    assert plain["fetched"] == ["kernels-community/quantization-bitsandbytes"]  # on its own, it would fetch
    ours, stderr = _import("tunelab")
    assert ours == {"fetched": [], "restored": True}  # refused for that import only
    assert "kernels-community" not in stderr and "Traceback" not in stderr, stderr
