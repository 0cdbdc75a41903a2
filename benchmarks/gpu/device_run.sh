#!/usr/bin/env bash
# Everything gradicon_fast checks on a GPU machine, in one command, in stages:
#
#   benchmarks/gpu/device_run.sh build suite sanitize bench train
#
#   build     pip install -e . with the CUDA kernels (TORCH_CUDA_ARCH_LIST, default 9.0; MAX_JOBS)
#   tests     tests/test_gpu.py and tests/test_triton.py on the GPU (pytest-xdist when installed)
#   suite     the whole test suite on that machine (the CPU tests too, against its build); the image
#             I/O tests are left out where nibabel or SimpleITK is missing (not in the GPU image)
#   sanitize  benchmarks/gpu/sanitize.sh (compute-sanitizer; TOOLS to choose the checks)
#   bench     python -m benchmarks on CUDA at lung scale, every backend, torch.compile included
#   train     benchmarks.train_memory: one training step's peak memory at 175^3
#
# Logs and results go to $OUT (default /tmp/gradicon_gpu); each stage's log is <stage>.log there.
# A stage that fails is reported and the next one still runs; exit status 1 if any failed.
# PYTEST_ARGS, BENCH_ARGS and TRAIN_ARGS add arguments to the stages.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gradicon_gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)
failed=()

stage_build() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  # The GPU image's default compiler (CC/CXX=/opt/gcc/...) links libstdc++ statically into the
  # extension. That second copy's locale facets crash the number formatting of c10's messages: every
  # argument check with a number in its message segfaulted (seen 2026-11-24). Build with the system
  # compiler, the one torch was built with, where there is one; BUILD_CC/BUILD_CXX override.
  local cc=${BUILD_CC:-} cxx=${BUILD_CXX:-}
  if [ -z "$cxx" ] && [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then cc=/usr/bin/gcc; cxx=/usr/bin/g++; fi
  CC=${cc:-${CC:-gcc}} CXX=${cxx:-${CXX:-g++}} \
  MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} GRADICON_FAST_CUDA=1 \
    "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e . >"$OUT/build_full.log" 2>&1
  local rc=$?
  ldd gradicon_fast/_C*.so 2>/dev/null | grep -q 'libstdc++' ||
    echo "WARNING: the extension does not link libstdc++ dynamically (a static copy crashes error messages)"
  grep -E "error|warning: .*(spill|stack)|ptxas info|registers" "$OUT/build_full.log" | head -40
  [ $rc -eq 0 ] || { tail -60 "$OUT/build_full.log"; return $rc; }
  "$PY" -c "import gradicon_fast as gf; print('backends', gf.backends())"
}

stage_tests() {
  local xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n "${TEST_WORKERS:-8}")
  "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" -rfEs --tb=short \
    tests/test_gpu.py tests/test_triton.py ${PYTEST_ARGS:-}
}

stage_suite() {
  local xdist=() ignore=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n "${TEST_WORKERS:-8}")
  "$PY" -c "import nibabel, SimpleITK" 2>/dev/null ||
    ignore=(--ignore=tests/test_io.py --ignore=tests/test_cli.py --ignore=tests/test_data_volumes.py)
  "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" -rfE --tb=short "${ignore[@]}" tests ${PYTEST_ARGS:-}
}

stage_sanitize() {
  PYTHON="$PY" bash benchmarks/gpu/sanitize.sh
}

stage_bench() {
  "$PY" -m benchmarks --device cuda --sizes lung --compile --output "$OUT/bench.json" ${BENCH_ARGS:---repeat 10}
}

stage_train() {
  "$PY" -m benchmarks.train_memory --device cuda ${TRAIN_ARGS:---size 175}
  local rc=$?
  cp benchmarks/results/train_memory_*.json "$OUT/" 2>/dev/null
  return $rc
}

for stage in "$@"; do
  echo "=== $stage (at $(( $(date +%s) - start )) s)"
  if "stage_$stage" 2>&1 | tee "$OUT/$stage.log"; then
    echo "=== $stage: ok"
  else
    echo "=== $stage: FAILED"
    failed+=("$stage")
  fi
done
echo "=== done in $(( $(date +%s) - start )) s; failed: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
