# Source on the GPU machine: FlashAttention 4 from the three parts bench/fetch_fa4.sh fills.
#
# Each call on one warm machine (within 30 s of the last) carries one of .fa4a/, .fa4b/, .fa4c/ beside what
# it needs for its own work (.fa4c/ without .whl/: see fetch_fa4.sh) and sources this file after
# bench/gpu_env.sh.  It keeps the part in /tmp/fa4part; once the three are there it joins them, checks the
# sum, installs into /tmp/fa4site, and from then on (that call and any later one) puts FlashAttention 4 on
# PYTHONPATH.  Until then the call runs without it and says how many parts are in.
#
# Returns 5 when the joined wheel is damaged, 3 when installing fails; otherwise 0.
mkdir -p /tmp/fa4part
for part in .fa4a .fa4b .fa4c; do
  if [ -d "$part" ]; then cp "$part"/* /tmp/fa4part/ && echo "fa4_env: $part kept"; fi
done
if [ ! -d /tmp/fa4site/flash_attn ]; then
  wanted=$(cat /tmp/fa4part/libs_cu13.parts 2>/dev/null || echo 3)
  have=$(find /tmp/fa4part -name 'libs_cu13.part_*' | wc -l)
  if [ "$have" -eq "$wanted" ] && compgen -G "/tmp/fa4part/flash_attn_4-*.whl" >/dev/null; then
    mkdir -p /tmp/fa4wheels
    wheel=/tmp/fa4wheels/$(cat /tmp/fa4part/libs_cu13.name)
    cat /tmp/fa4part/libs_cu13.part_* >"$wheel"
    echo "$(cat /tmp/fa4part/libs_cu13.sha256)  $wheel" | sha256sum -c --quiet \
      || { echo "fa4_env: the joined wheel is damaged" >&2; return 5; }
    cp /tmp/fa4part/*.whl /tmp/fa4wheels/
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fa4site \
      /tmp/fa4wheels/*.whl >/dev/null 2>&1 || { echo "fa4_env: installing the wheels failed" >&2; return 3; }
    echo "fa4_env: FlashAttention 4 installed in /tmp/fa4site"
  else
    echo "fa4_env: $have of $wanted parts of FlashAttention 4 on this machine; this call runs without it"
  fi
fi
if [ -d /tmp/fa4site/flash_attn ]; then
  # the CUTLASS DSL puts its packages on sys.path from a .pth file, which runs only in a site directory
  export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
fi
