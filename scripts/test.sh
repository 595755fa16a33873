#!/usr/bin/env bash
# Install what the tests need and run the whole check: lint, types, tests.
# torch is pinned to the CPU build that lies on this kind of machine: a bare
# `torch` requirement would pull several GB of CUDA packages instead.
set -euo pipefail
cd "$(dirname "$0")/.."
# MLX's Linux CPU wheel ships a reference BLAS ~50x slower than OpenBLAS; tunelab loads
# Debian's OpenBLAS when present (see src/tunelab/backends/mlx/blas.py). Best effort:
# without it the MLX tests still pass, only slower.
if [ "$(uname -s)" = "Linux" ] && [ ! -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 ] \
    && [ "$(id -u)" = "0" ] && command -v apt-get > /dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread) > /dev/null 2>&1 \
    || echo "note: could not install libopenblas0-pthread; MLX tests will use the reference BLAS"
fi
# The queue tests also run against a real PostgreSQL server that they start on loopback
# (tests/jobs/postgres.py): install Debian's server, best effort; without it they skip.
if [ "$(uname -s)" = "Linux" ] && ! command -v initdb > /dev/null && ! ls /usr/lib/postgresql/*/bin/initdb > /dev/null 2>&1 \
    && [ "$(id -u)" = "0" ] && command -v apt-get > /dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) > /dev/null 2>&1 \
    || echo "note: could not install postgresql; the PostgreSQL queue tests will be skipped"
fi
# The dashboard's browser test (tests/ui/test_browser.py) drives Debian's headless Chromium through
# chromedriver: install both, best effort; without them that test skips and says why.
if [ "$(uname -s)" = "Linux" ] && ! command -v chromedriver > /dev/null \
    && [ "$(id -u)" = "0" ] && command -v apt-get > /dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) > /dev/null 2>&1 \
    || echo "note: could not install chromium/chromium-driver; the dashboard's browser test will be skipped"
fi
python -m pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[all,dev]"
python -m ruff check src tests bench scripts
python -m ruff format --check src tests bench scripts
python -m mypy
NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict -q --site-dir "$(mktemp -d)"  # the docs site; references generated
# Two pytest-xdist workers; tests/conftest.py keeps tests that share a built-once fixture on one worker.
python -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup --durations=15 "$@"  # the slowest, to keep the suite near 15 min
