#!/usr/bin/env bash
# The GPU run (issue 25), one command: benchmarks/gpu_run.py's steps a-e, results in OUT.
#
#   benchmarks/gpu_run.sh OUT [options]              on the GPU host (benchmarks/GPU_NOTES.md, "GPU run")
#   benchmarks/gpu_run.sh --rehearse OUT [options]   the same steps on this CPU (simulated GPU, small shapes)
#
# On the GPU host (no TVM, no network) it first installs what benchmarks/gpu_prepare.sh put in .gpu/:
# the wheels (.gpu/wheels: apache-tvm-ffi, dcn_tvm) into /tmp/dcn_site, the prebuilt kernels
# (.gpu/prebuilt/*) into DCN_TVM_PREBUILT and, where it came, the TVM compiler (.gpu/tvm-bundle) for step d.
# Options (--steps ad, --budget c=120, --total 540, --trials 32) go to benchmarks/gpu_run.py.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python3}"
if [ "${1:-}" != "--rehearse" ]; then
  # TVM (step d) compiles CUDA with nvcc, which the host has; its default, NVRTC, needs the headers found
  export DCN_TVM_CACHE_DIR="${DCN_TVM_CACHE_DIR:-/tmp/dcn_tvm_cache}" PYTHONUNBUFFERED=1 \
    TVM_CUDA_COMPILE_MODE="${TVM_CUDA_COMPILE_MODE:-nvcc}"
  if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dcn_site \
      .gpu/wheels/*.whl || exit 1
    export PYTHONPATH="/tmp/dcn_site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  packages="$(find "$PWD/.gpu/prebuilt" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | sort | paste -sd:)"
  [ -z "$packages" ] || export DCN_TVM_PREBUILT="$packages"
  if [ -f .gpu/tvm-bundle/activate.sh ]; then
    # shellcheck disable=SC1091
    . .gpu/tvm-bundle/activate.sh || echo "the compiler bundle did not load: step d will be skipped"
    # activate.sh puts the checkout on PYTHONPATH, where dcn_tvm/ would hide the installed dcn_tvm
    PYTHONPATH="$(printf '%s' "$PYTHONPATH" | tr ':' '\n' | grep -vxF "$PWD" | paste -sd:)"
    export PYTHONPATH
  fi
fi
exec "$PY" -u benchmarks/gpu_run.py "$@"
