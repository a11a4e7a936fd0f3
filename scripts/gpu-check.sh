#!/usr/bin/env bash
# The GPU check of the CUDA backend, for a machine with an NVIDIA GPU (H100/H200, CUDA 13,
# cmake, ninja, PyTorch): configure, build, run the GPU tests (and compute-sanitizer memcheck on
# them), run the GPU benchmark against the device copy and cuBLAS, time the PyTorch equivalents
# and print one ratio table; then, when ncu is installed, profile lowrank's kernels (one call of
# each benchmark case) and print what bounds each. Logs and JSON go to $OUT (default
# ./gpu-check-out).
# usage: scripts/gpu-check.sh [cuda-architectures, default 90]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
ARCH="${1:-90}"
BUILD=build/gpu-check
start=$(date +%s)
stamp() { echo "::: [$(( $(date +%s) - start )) s] $*"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nvcc --version | tail -2; } 2>&1 | tee "$OUT/device.txt"

stamp configure
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLOWRANK_ENABLE_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DLOWRANK_BUILD_IO=OFF -DLOWRANK_BUILD_TOOLS=OFF \
  -DLOWRANK_BUILD_EXAMPLES=OFF -DLOWRANK_BUILD_BENCHMARKS=OFF -DLOWRANK_BUILD_TESTS=ON \
  -DLOWRANK_BUILD_MATH_TESTS=OFF -DLOWRANK_BUILD_HEADER_CHECKS=OFF >"$OUT/configure.log" 2>&1 \
  || { tail -30 "$OUT/configure.log"; exit 1; }
stamp build
cmake --build "$BUILD" -j "$(nproc)" --target lowrank_cuda_tests lowrank_cuda_bench >"$OUT/build.log" 2>&1 \
  || { grep -E "error" -A5 "$OUT/build.log" | head -60; exit 1; }
stamp tests
"$BUILD/tests/lowrank_cuda_tests" 2>&1 | tee "$OUT/tests.log" | grep -E "^\[  (PASSED|FAILED|SKIPPED) |Failure|error|device " | head -60
tests_rc=${PIPESTATUS[0]}
stamp "tests exit $tests_rc"
if command -v compute-sanitizer >/dev/null; then
  stamp "compute-sanitizer memcheck"
  timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 "$BUILD/tests/lowrank_cuda_tests" \
    >"$OUT/memcheck.log" 2>&1
  echo "memcheck exit $? ($(grep -c 'Invalid' "$OUT/memcheck.log") invalid accesses)"; tail -3 "$OUT/memcheck.log"
fi
stamp benchmark
"$BUILD/benchmarks/cuda/lowrank_cuda_bench" "$OUT/cuda_bench.json" 2>&1 | tee "$OUT/bench.log"
stamp "pytorch baselines"
PYTHONUNBUFFERED=1 python3 scripts/gpu_torch_baselines.py "$OUT/cuda_bench.json" "$OUT/torch.json" 2>&1 | tee "$OUT/table.txt"
if command -v ncu >/dev/null; then
  # Last, so that a profiler problem cannot cost the figures above: every case of the benchmark
  # called once (`--once`), lowrank's own kernels profiled (what bounds each: DRAM/SM throughput,
  # occupancy, issue use). Full report in $OUT/ncu.txt.
  stamp "ncu: lowrank's kernels, one call of each case"
  # ncu prints its report when the program exits: the timeout only guards against a hang.
  timeout 300 ncu --target-processes all -k 'regex:rank_update_(rows|pipelined)|lora_|eggroll_term' \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
    --section WarpStateStats --section MemoryWorkloadAnalysis \
    "$BUILD/benchmarks/cuda/lowrank_cuda_bench" --once >"$OUT/ncu.txt" 2>&1
  echo "ncu exit $?"
  python3 scripts/ncu_summary.py "$OUT/ncu.txt" 2>&1 | tee "$OUT/ncu_summary.txt" || tail -20 "$OUT/ncu.txt"
fi
stamp done
exit "$tests_rc"
