#!/usr/bin/env bash
# FlashAttention 4 (flash_attn.cute and its CUTLASS DSL) for the GPU machine, which has no internet.
#
#     bash bench/fetch_fa4.sh   # add "/.fa4a/ /.fa4b/ /.fa4c/" to .git/info/exclude first
#
# 102 MB in all (its CUDA 13 library wheel alone is 92 MB), more than one device call carries beside the
# checkout, .gpu/ and .whl/ (64 MiB in all), so it travels in three parts, one a call, on one warm machine,
# while those calls do other work: .fa4a/ and .fa4b/ each hold a third of the library wheel, .fa4c/ the last
# third and every other wheel (carry .fa4c/ without .whl/, which the first call on a machine carries).
# Each part holds the manifest; bench/fa4_env.sh keeps what each call brings and installs once all are there.
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
rm -rf .fa4a .fa4b .fa4c
mkdir -p .fa4a .fa4b .fa4c "$tmp/parts"
big=$(ls "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl)
split -n 3 "$big" "$tmp/parts/libs_cu13.part_"
for dir in .fa4a .fa4b .fa4c; do
  basename "$big" >"$dir/libs_cu13.name"
  sha256sum "$big" | cut -c1-64 >"$dir/libs_cu13.sha256"
  echo 3 >"$dir/libs_cu13.parts"
done
mv "$tmp/parts/libs_cu13.part_aa" .fa4a/
mv "$tmp/parts/libs_cu13.part_ab" .fa4b/
mv "$tmp/parts/libs_cu13.part_ac" .fa4c/
rm "$big"
mv "$tmp"/*.whl .fa4c/
du -sh .fa4a .fa4b .fa4c
