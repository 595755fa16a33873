# Source this on the GPU machine, from the repository root, before the bench scripts:
#
#     . bench/gpu_env.sh && python3 bench/vs_unsloth.py --rows lora_gc,qlora_gc
#
# It installs the carried wheels (.whl/, cp312: tunelab's needs the device image lacks) into
# /tmp/site, unpacks the carried Unsloth tree (.gpu/unsloth-site-cp312.tar.xz, which also holds
# bitsandbytes) into /tmp/site_us once, links that tree's bitsandbytes alone into /tmp/bnb (so
# tunelab's processes get bitsandbytes without Unsloth's patches), and exports the variables the
# scripts read.  How to fill .whl/ and .gpu/ on the machine that sends the run: bench/README.md,
# section vs_unsloth.py.  Each switch named in TUNELAB_AB ("nf4" (NF4 weights dequantized inside the compiled layer on any device, by inductor's arithmetic where bitsandbytes' kernels don't serve), "nf4_triton" (NF4 dequantized by one Triton kernel, nf4_triton.py), "lora_in_product", "autotune", "autotune_gemm", "coordinate_descent" (inductor tunes its own kernels' block sizes), "cpp_wrapper" (compiled graphs launch their kernels from C++), "cudagraphs", "chunk_big", "tile_big", "budget1", "budget09", "joined_qkv", "held_4bit", "fa4" (every row, packed too; with bench/fa4_env.sh sourced after this file); "fa4_off", "nf4_off" (no NF4 dequantization in the compiled layer), "bnb_kernels_off" (bitsandbytes' own Python calls), "persistent_rows_off", "runtime_asserts_off" (compiled graphs skip inductor's size and alignment checks), "shared_a_off", "causal_mask_off" (transformers builds the causal mask and searches for packed rows, reading the GPU), "kept_attention_off", "joined_b_off", "joined_a_off", "host_counted_off", "dequant_per_tile" and "chunk_any" turn one off) is applied to src/ first,
# for an A/B against a copy of the tree made before (--base-src); or, after sourcing, `variant NAME SWITCH...`
# makes /tmp/variant_NAME, a copy of src/ with those switches on, to run as a stack of its own (--tree).

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >/dev/null 2>&1 || { echo "gpu_env: installing .whl/ failed" >&2; return 3; }
elif [ ! -d /tmp/site/omegaconf ]; then  # a later call on the same machine may leave .whl/ behind
  echo "gpu_env: no .whl/ carried, and none installed by an earlier call on this machine" >&2; return 3
fi
if [ ! -d /tmp/site_us/bitsandbytes ]; then
  mkdir -p /tmp/site_us && tar -xJf .gpu/unsloth-site-cp312.tar.xz -C /tmp/site_us
fi
mkdir -p /tmp/bnb && ln -sf /tmp/site_us/bitsandbytes /tmp/site_us/bitsandbytes-*.dist-info /tmp/bnb/
# switch_on SRC NAME...: set, in the tree SRC (a src/ folder), each switch named to the other way than the repo's.
switch_on() {
  local src=$1; shift
  for name in "$@"; do
    case $name in
      nf4) sed -i 's/^IN_GRAPH: bool | str = "bnb_kernels"/IN_GRAPH: bool | str = True/' "$src/tunelab/backends/torch/nf4.py" ;;
      nf4_off) sed -i 's/^IN_GRAPH: bool | str = "bnb_kernels"/IN_GRAPH: bool | str = False/' "$src/tunelab/backends/torch/nf4.py" ;;
      nf4_triton) sed -i 's/^TRITON = False/TRITON = True/' "$src/tunelab/backends/torch/nf4.py" ;;
      bnb_kernels_off) sed -i 's/^BNB_KERNELS = True/BNB_KERNELS = False/' "$src/tunelab/backends/torch/nf4.py" ;;
      lora_in_product) sed -i 's/^LORA_IN_PRODUCT = False/LORA_IN_PRODUCT = True/' "$src/tunelab/backends/torch/nf4.py" ;;
      autotune_gemm) sed -i 's/^AUTOTUNE_GEMM = False/AUTOTUNE_GEMM = True/' "$src/tunelab/backends/torch/fast.py" ;;
      cpp_wrapper) sed -i 's/^CPP_WRAPPER = False/CPP_WRAPPER = True/' "$src/tunelab/backends/torch/fast.py" ;;
      runtime_asserts_off) sed -i 's/^RUNTIME_ASSERTS = True/RUNTIME_ASSERTS = False/' "$src/tunelab/backends/torch/fast.py" ;;
      coordinate_descent) sed -i 's/^COORDINATE_DESCENT = False/COORDINATE_DESCENT = True/' "$src/tunelab/backends/torch/fast.py" ;;
      autotune) sed -i 's/^MODE: str | None = None/MODE: str | None = "max-autotune-no-cudagraphs"/' "$src/tunelab/backends/torch/fast.py" ;;
      cudagraphs) sed -i 's/^MODE: str | None = None/MODE: str | None = "reduce-overhead"/' "$src/tunelab/backends/torch/fast.py" ;;
      persistent_rows_off) sed -i 's/^PERSISTENT_ROWS: int | None = 8192/PERSISTENT_ROWS: int | None = None/' "$src/tunelab/backends/torch/fast.py" ;;
      fa4) sed -i 's/^ON: bool | str = "long"/ON: bool | str = True/' "$src/tunelab/backends/torch/flash4.py" ;;
      fa4_off) sed -i 's/^ON: bool | str = "long"/ON: bool | str = False/' "$src/tunelab/backends/torch/flash4.py" ;;
      held_4bit) sed -i 's/^ON = False/ON = True/' "$src/tunelab/backends/torch/held_4bit.py" ;;
      joined_a_off) sed -i 's/^ON: bool | str = "cuda"/ON: bool | str = False/' "$src/tunelab/backends/torch/joined_a.py" ;;
      joined_qkv) sed -i 's/^GROUPS: tuple\[str, ...\] = ("mlp",)/GROUPS: tuple[str, ...] = ("mlp", "self_attn")/' "$src/tunelab/backends/torch/joined_b.py" ;;
      joined_b_off) sed -i 's/^ON: bool | str = "cuda"/ON: bool | str = False/' "$src/tunelab/backends/torch/joined_b.py" ;;
      chunk_big) sed -i 's/^LOSS_CHUNK_ELEMENTS = 2\*\*25/LOSS_CHUNK_ELEMENTS = 2**26/' "$src/tunelab/config/schema.py" ;;
      chunk_any) sed -i 's/^LOSS_CHUNK_ROW_MULTIPLE = 64/LOSS_CHUNK_ROW_MULTIPLE = 1/' "$src/tunelab/config/schema.py" ;;
      kept_attention_off) sed -i 's/^ON = True/ON = False/' "$src/tunelab/backends/torch/kept_attention.py" ;;
      dequant_per_tile) sed -i 's/^DEQUANTIZE_ONCE = True/DEQUANTIZE_ONCE = False/' "$src/tunelab/backends/torch/tiled_mlp.py" ;;
      budget1) sed -i 's/^ACTIVATION_BUDGET = 0.8/ACTIVATION_BUDGET = 1.0/' "$src/tunelab/config/schema.py" ;;
      budget09) sed -i 's/^ACTIVATION_BUDGET = 0.8/ACTIVATION_BUDGET = 0.9/' "$src/tunelab/config/schema.py" ;;
      host_counted_off) sed -i 's/^HOST_COUNTED = True/HOST_COUNTED = False/' "$src/tunelab/backends/torch/attention.py" ;;
      tile_big) sed -i 's/^MLP_TILE_TOKENS = 4096/MLP_TILE_TOKENS = 8192/' "$src/tunelab/config/schema.py" ;;
      causal_mask_off) sed -i 's/^ON = True/ON = False/' "$src/tunelab/backends/torch/causal_mask.py" ;;
      shared_a_off) sed -i 's/^ON = True/ON = False/' "$src/tunelab/backends/torch/shared_lora_a.py" ;;
      *) echo "gpu_env: no switch named $name" >&2; return 2 ;;
    esac
  done
}
# variant NAME SWITCH...: a copy of src/ at /tmp/variant_NAME with those switches on, for
# `vs_unsloth.py --stacks tunelab,NAME --tree NAME=/tmp/variant_NAME`.
variant() {
  local name=$1; shift
  rm -rf "/tmp/variant_$name" && cp -r src "/tmp/variant_$name" && switch_on "/tmp/variant_$name" "$@"
}
# shellcheck disable=SC2086  # the names are words
[ -z "${TUNELAB_AB:-}" ] || switch_on src $TUNELAB_AB || return 2
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
