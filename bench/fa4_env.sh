# Source on the GPU machine: FlashAttention 4 from the two carries bench/fetch_fa4.sh fills.
#
#   call 1, carry [".fa4a", ...]:  . bench/fa4_env.sh   keeps the first part in /tmp/fa4part
#   call 2, carry [".fa4b", ...]   (not .fa4a: a carried path replaces what is there), on the same warm
#   machine:                        . bench/fa4_env.sh   joins the parts, checks the sum, installs
#                                   into /tmp/fa4site and puts it on PYTHONPATH
#   any later call on that machine:  . bench/fa4_env.sh   (after bench/gpu_env.sh, which sets PYTHONPATH)
#                                   puts the installed copy on PYTHONPATH again
#
# Returns 4 when the second call finds no first part (the machine was not the same one).
if [ -f .fa4a/libs_cu13.part_aa ]; then
  mkdir -p /tmp/fa4part && cp .fa4a/libs_cu13.part_aa /tmp/fa4part/ && echo "fa4_env: first part kept"
fi
if [ -f .fa4b/libs_cu13.part_ab ] && [ ! -d /tmp/fa4site/flash_attn ]; then
  first=/tmp/fa4part/libs_cu13.part_aa
  [ -f "$first" ] || { echo "fa4_env: no first part here: run call 1 on this machine first" >&2; return 4; }
  mkdir -p /tmp/fa4wheels
  wheel=/tmp/fa4wheels/$(cat .fa4b/libs_cu13.name)
  cat "$first" .fa4b/libs_cu13.part_a[b-z] >"$wheel"
  echo "$(cat .fa4b/libs_cu13.sha256)  $wheel" | sha256sum -c --quiet || { echo "fa4_env: the joined wheel is damaged" >&2; return 5; }
  cp .fa4b/*.whl /tmp/fa4wheels/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fa4site \
    /tmp/fa4wheels/*.whl >/dev/null 2>&1 || { echo "fa4_env: installing the wheels failed" >&2; return 3; }
  echo "fa4_env: FlashAttention 4 installed in /tmp/fa4site"
fi
if [ -d /tmp/fa4site/flash_attn ]; then
  # the CUTLASS DSL puts its packages on sys.path from a .pth file, which runs only in a site directory
  export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
fi
