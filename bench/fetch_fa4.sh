#!/usr/bin/env bash
# FlashAttention 4 (flash_attn.cute and its CUTLASS DSL) for the GPU machine, which has no internet.
#
#     bash bench/fetch_fa4.sh   # add "/.fa4a/ /.fa4b/" to .git/info/exclude first
#
# Its CUDA 13 library wheel is 92 MB, more than one device call carries (64 MiB with the checkout),
# so it travels in two parts over two calls on one warm machine: .fa4a/ holds the first part,
# .fa4b/ the second and every other wheel (bench/fa4_env.sh joins and installs them there).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --pre --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$tmp" \
  "flash-attn-4==4.0.0b40" "nvidia-cutlass-dsl==4.8.1" "nvidia-cutlass-dsl-libs-base==4.8.1" \
  "nvidia-cutlass-dsl-libs-core==4.8.1" "nvidia-cutlass-dsl-libs-cu13==4.8.1" "apache-tvm-ffi==0.1.15.post2" \
  "torch-c-dlpack-ext==0.1.5" "quack-kernels==0.6.5" 2>&1 | grep -v "^WARNING: Location" || true
rm -rf .fa4a .fa4b
mkdir -p .fa4a .fa4b
big=$(ls "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl)
basename "$big" >.fa4b/libs_cu13.name
sha256sum "$big" | cut -c1-64 >.fa4b/libs_cu13.sha256
split -b 46M "$big" .fa4b/libs_cu13.part_
mv .fa4b/libs_cu13.part_aa .fa4a/
rm "$big"
mv "$tmp"/*.whl .fa4b/
du -sh .fa4a .fa4b
