#!/usr/bin/env bash
# Prepare what benchmarks/gpu_run.sh needs on the GPU host (no TVM, no network) into .gpu/ (git-ignored),
# check it, and print what each device-tool call carries (benchmarks/GPU_NOTES.md, "GPU run").
#
#   benchmarks/gpu_prepare.sh [--bundle]
#
#   .gpu/prebuilt/cuda  every sm_90 kernel the run calls, static and symbolic (dcn-tvm build --target nvidia/nvidia-h100)
#   .gpu/prebuilt/llvm  the CPU kernels step b compares the GPU's RoI poolings with (x86-64-v4 and -v3)
#   .gpu/wheels         what the host's Python 3.12 lacks: apache-tvm-ffi (this venv's version, cp312) and dcn_tvm
#   .gpu/tvm-bundle     with --bundle: TVM's compiler for step d (shared/tools/pack-tvm-bundle), for a second call
#
# Run it in the checkout the device tool sends, with its venv active (apache-tvm, nvcc on PATH); it reaches
# PyPI for the cp312 wheel. Rerun it after any change to dcn_tvm: the host runs the wheel built here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
BUNDLE=0
for arg in "$@"; do
  case "$arg" in --bundle) BUNDLE=1 ;; *) echo "usage: $0 [--bundle]" >&2; exit 2 ;; esac
done
rm -rf .gpu/prebuilt .gpu/wheels
mkdir -p .gpu/prebuilt .gpu/wheels

# Where no GPU driver is, TVM keeps CUDA kernels as source, to be compiled when the package loads, by the
# compiler the host lacks. TVM's CUDA runtime, which compiles them to a binary at build time, loads only
# beside the driver's libcuda.so.1: a stand-in whose every function fails serves, as building calls none.
if ! ldconfig -p | grep -q "libcuda.so.1 "; then
  runtime="$("$PY" -c 'import os, tvm; print(os.path.dirname(tvm.__file__))')/lib/libtvm_runtime_cuda.so"
  mkdir -p .gpu/cuda-stub
  nm -D --undefined-only "$runtime" | awk '$2 ~ /^cu[A-Z]/ { sub(/@.*/, "", $2); print "int " $2 "(void) { return 34; }" }' \
    | sort -u > .gpu/cuda-stub/stub.c
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o .gpu/cuda-stub/libcuda.so.1 .gpu/cuda-stub/stub.c
  export LD_LIBRARY_PATH="$PWD/.gpu/cuda-stub${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export TVM_CUDA_COMPILE_MODE=nvcc  # TVM's default, NVRTC, does not find the CUDA headers here

build() {  # KIND TARGET: a package of every workload the run calls on KIND (cuda or llvm)
  local workloads=() args=()
  mapfile -t workloads < <("$PY" benchmarks/gpu_run.py --workloads "$1")
  for workload in "${workloads[@]}"; do args+=(--workload "$workload"); done
  echo "== $1: ${#workloads[@]} workloads, dcn-tvm build --target $2"
  dcn-tvm build --target "$2" "${args[@]}" --out ".gpu/prebuilt/$1" 2>&1 \
    | grep -v -e "\] scheduled " -e "no tuned schedules for"
}
build cuda nvidia/nvidia-h100
build llvm llvm
echo "== does every kernel the run asks for come from these packages, and load without TVM?"
for kind in cuda llvm; do
  DCN_TVM_PREBUILT="$PWD/.gpu/prebuilt/cuda:$PWD/.gpu/prebuilt/llvm" "$PY" benchmarks/gpu_run.py --verify-package \
    --load "$kind" --without-compiler | grep '"summary"'
done

echo "== wheels for the host's Python 3.12"
ffi="$("$PY" -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))')"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/wheels "apache-tvm-ffi==$ffi"
"$PY" -m pip wheel -q --no-deps -w .gpu/wheels .
ls .gpu/wheels

if [ "$BUNDLE" = 1 ]; then
  for tool in "${PACK_TVM_BUNDLE:-}" ../shared/tools/pack-tvm-bundle /work/shared/tools/pack-tvm-bundle; do
    [ -n "$tool" ] && [ -x "$tool" ] && break
  done
  # from outside the repository: the tool's git-exclude step fails in a worktree (.gpu/ is ignored anyway)
  bundle="$PWD/.gpu/tvm-bundle"
  tool="$(realpath "$tool")"  # the bundle is packed from /tmp: a relative path would not be found there
  (cd /tmp && "$tool" "$bundle")
fi

# What .gpu/ holds was built from this: while `git describe --always --dirty` still prints it, no need to rerun.
git describe --always --dirty > .gpu/prepared-from
echo "== prepared from $(cat .gpu/prepared-from)"

mib() { echo "$(( ($1 + 1048575) / 1048576 )) MiB"; }
tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
first=$(du -cb .gpu/prebuilt .gpu/wheels | tail -1 | cut -f1)
echo "== carried (the device tool takes 64 MiB a call: the tracked tree, $(mib "$tree"), counts too)"
du -sh .gpu/prebuilt/* .gpu/wheels
echo "call 1 (steps a, b, c, e): carry [\".gpu/prebuilt\", \".gpu/wheels\"]: $(mib $((tree + first)))"
if [ -f .gpu/tvm-bundle/activate.sh ]; then
  wheel=$(ls .gpu/wheels/dcn_tvm-*.whl)  # the bundle brings its own apache-tvm-ffi
  second=$(du -cb .gpu/tvm-bundle "$wheel" | tail -1 | cut -f1)
  echo "call 2 (steps a, d): carry [\".gpu/tvm-bundle\", \"$wheel\"]: $(mib $((tree + second)))"
fi
