#!/usr/bin/env bash
# Fill .whl/ and .gpu/ (both git-ignored: add "/.whl/ /.gpu/ /.ab/" to .git/info/exclude) with what
# the GPU machine needs for the bench scripts, from the machine that sends the run:
#
#     bash bench/fetch_wheels.sh          # then carry [".whl", ".gpu"] and source bench/gpu_env.sh there
#
# .whl/: cp312 wheels of tunelab's own needs that the device image lacks (its package list:
# ../.library/device/KINDS.md), pydantic-core at the version pydantic pins, typing-extensions new
# enough for that pydantic, and multiprocess/dill for the Unsloth tree's datasets.  .gpu/: the
# Unsloth + bitsandbytes tree and its step script from ../shared/gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .gpu
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
          "${platforms[@]}" -d .whl "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
get pydantic annotated-types typing-inspection typing_extensions sqlalchemy greenlet alembic mako questionary \
    prompt-toolkit wcwidth omegaconf "multiprocess<0.70.20" "dill<0.4.2"
core=$(unzip -p .whl/pydantic-2*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
get "pydantic-core==$core"
shared=../shared/gpu
if [ -d "$shared" ]; then
  cp -u "$shared/unsloth-site-cp312.tar.xz" "$shared/unsloth_step.py" .gpu/
fi
ls .whl | wc -l | xargs echo "wheels in .whl/:"
du -sh .whl .gpu
