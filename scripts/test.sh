#!/usr/bin/env bash
# Install what the tests need and run the whole check: lint, types, tests.
# torch is pinned to the CPU build that lies on this kind of machine: a bare
# `torch` requirement would pull several GB of CUDA packages instead.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[all,dev]"
python -m ruff check src tests bench scripts
python -m ruff format --check src tests bench scripts
python -m mypy
python -m pytest -q -p no:cacheprovider "$@"
