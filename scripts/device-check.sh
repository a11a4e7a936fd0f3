#!/usr/bin/env bash
# One call on a lent machine (see docs/performance.md): configure a Release build without the io
# component (the lent image has no nlohmann_json/CLI11), build the kernel/linalg/adapt tests and
# the fused-forward benchmark with all cores, run the tests on every target the CPU supports
# (AVX-512 included where present), then the fused-forward ratio benchmarks at 1 and 2 threads.
# Logs go to $OUT (default /tmp/lowrank-device); the last lines printed are the ratio table.
set -uo pipefail
out=${OUT:-/tmp/lowrank-device}
mkdir -p "$out"
jobs=$(nproc)
{ date -u; lscpu | grep -E "Model name|^CPU\(s\)"; grep -o -w -E "avx512f|avx2|fma" /proc/cpuinfo | sort -u | tr '\n' ' '; echo; } | tee "$out/machine.txt"
cmake -S . -B build/device -G Ninja -DCMAKE_BUILD_TYPE=Release -DLOWRANK_BUILD_IO=OFF -DLOWRANK_BUILD_TOOLS=OFF \
  -DLOWRANK_BUILD_EXAMPLES=OFF -DLOWRANK_BUILD_TESTS=ON -DLOWRANK_BUILD_BENCHMARKS=ON -DLOWRANK_WERROR=OFF \
  > "$out/configure.log" 2>&1 || { tail -20 "$out/configure.log"; exit 1; }
tests=(lowrank_tests lowrank_forward_tests lowrank_linalg_tests lowrank_adapt_tests lowrank_variants_tests lowrank_eva_tests)
cmake --build build/device -j"$jobs" --target "${tests[@]}" lowrank_bench_forward > "$out/build.log" 2>&1 ||
  { grep -E "error|Error" "$out/build.log" | head -20; exit 1; }
status=0
for t in "${tests[@]}"; do
  if build/device/tests/$t --gtest_brief=1 > "$out/$t.log" 2>&1; then
    echo "$t: $(grep -E "PASSED|SKIPPED" "$out/$t.log" | tr '\n' ' ')"
  else
    echo "$t: FAILED"; grep -E "FAILED|Failure" "$out/$t.log" | head -10; status=1
  fi
done
build/device/benchmarks/lowrank_bench_forward --benchmark_filter=ratios --benchmark_counters_tabular=true \
  --benchmark_out="$out/forward.json" > "$out/forward.txt" 2>&1 || status=1
grep -E "^Benchmark|ratios" "$out/forward.txt" | sed -E 's/ +/ /g'
exit $status
