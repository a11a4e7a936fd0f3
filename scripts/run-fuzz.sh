#!/usr/bin/env bash
# Builds lowrank's libFuzzer targets (tests/fuzz) with Clang, ASan and UBSan in build/fuzz, and runs
# each on a copy of its seed corpus. Exits non-zero on any crash, leak, sanitizer report, timeout or
# out-of-memory, or if a fuzzer does not finish cleanly.
#
#   scripts/run-fuzz.sh [SECONDS]     fuzzing time in all, split evenly between the targets (default 60)
#
# Environment: FUZZ_CXX (default clang++-14 if present, else clang++), FUZZ_JOBS (build jobs).
# Everything the run writes stays under build/fuzz: the working corpora in build/fuzz/fuzz-run/<target>/
# corpus, crash/leak/timeout reproducers in build/fuzz/fuzz-run/<target>/artifacts, logs next to them.
# Reproduce a finding with: build/fuzz/tests/fuzz/<target> <reproducer file>
set -euo pipefail

total=${1:-60}
if ! [[ $total =~ ^[0-9]+$ ]] || ((total < 2)); then
  echo "usage: $0 [SECONDS]   (whole seconds, at least 2)" >&2
  exit 2
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build="$root/build/fuzz"
targets=(safetensors peft_config)
declare -A max_len=([safetensors]=32768 [peft_config]=8192)

# ---- dependencies: Debian packages, installed only if missing ----------------------------------
bash "$root/scripts/setup-debian.sh" clang-14 libclang-rt-14-dev

# clang-14 provides clang++-14; plain clang++ exists only with the `clang` package. Prefer the
# version whose runtime (libclang-rt-14-dev) was just checked.
cxx=${FUZZ_CXX:-}
if [[ -z $cxx ]]; then
  if command -v clang++-14 >/dev/null; then cxx=clang++-14; else cxx=clang++; fi
fi

# ---- build ---------------------------------------------------------------------------------------
start=$SECONDS
# CMake drops the other -D options when the compiler of an existing cache changes: start afresh.
cxx_path=$(command -v "$cxx" || true)
[[ -n $cxx_path ]] || { echo "run-fuzz: no C++ compiler $cxx" >&2; exit 1; }
if [[ -f $build/CMakeCache.txt ]] &&
   ! grep -qxF "CMAKE_CXX_COMPILER:STRING=$cxx_path" "$build/CMakeCache.txt" &&
   ! grep -qxF "CMAKE_CXX_COMPILER:FILEPATH=$cxx_path" "$build/CMakeCache.txt"; then
  echo "run-fuzz: $build was configured with another compiler; reconfiguring from scratch"
  rm -rf "$build"
fi
cmake -S "$root" -B "$build" -G Ninja \
  -DCMAKE_CXX_COMPILER="$cxx_path" \
  -DLOWRANK_BUILD_FUZZERS=ON -DLOWRANK_BUILD_TESTS=ON \
  -DLOWRANK_BUILD_BENCHMARKS=OFF -DLOWRANK_BUILD_EXAMPLES=OFF -DLOWRANK_BUILD_TOOLS=OFF \
  -DLOWRANK_ENABLE_OPENMP=OFF -DLOWRANK_ENABLE_AVX512=OFF >/dev/null
cmake --build "$build" --target "${targets[@]/%/_fuzz}" ${FUZZ_JOBS:+-j "$FUZZ_JOBS"}
echo "run-fuzz: built in $((SECONDS - start)) s"

# ---- run -----------------------------------------------------------------------------------------
per_target=$((total / ${#targets[@]}))
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=0:detect_stack_use_after_return=1:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

status=0
summary=()
for t in "${targets[@]}"; do
  exe="$build/tests/fuzz/${t}_fuzz"
  work="$build/fuzz-run/$t"
  rm -rf "$work"
  mkdir -p "$work/corpus" "$work/artifacts"
  cp "$root/tests/fuzz/corpus/$t/"* "$work/corpus/"
  log="$work/fuzz.log"
  echo "run-fuzz: $t for ${per_target} s (log: $log)"
  set +e
  (cd "$work" && "$exe" "$work/corpus" \
     -dict="$root/tests/fuzz/$t.dict" \
     -max_total_time="$per_target" -max_len="${max_len[$t]}" \
     -timeout=10 -rss_limit_mb=2048 -detect_leaks=1 \
     -artifact_prefix="$work/artifacts/" -print_final_stats=1 >"$log" 2>&1)
  rc=$?
  set -e

  problems=()
  ((rc == 0)) || problems+=("exit status $rc")
  artifacts=$(find "$work/artifacts" -type f | sort)
  [[ -z $artifacts ]] || problems+=("reproduce with: $exe $(echo "$artifacts" | tr '\n' ' ')")
  if grep -qE "ERROR: (AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer|libFuzzer)|runtime error:|SUMMARY: " "$log"; then
    problems+=("sanitizer/libFuzzer report in the log")
  fi
  grep -q "^Done [0-9]* runs" "$log" || problems+=("the run did not finish")

  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
  init_cov=$(sed -n 's/.*INITED cov: \([0-9]*\) ft: \([0-9]*\).*/\1 (ft \2)/p' "$log" | tail -1)
  last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -1 || true)
  cov=$(sed -n 's/.*cov: \([0-9]*\) ft: \([0-9]*\) corp: \([0-9]*\).*/\1 (ft \2), corpus \3 inputs/p' <<<"$last")
  line="$t: ${runs:-?} runs, ${rate:-?} exec/s, coverage ${init_cov:-?} after the seeds -> ${cov:-?}, peak RSS ${rss:-?} MB"
  if ((${#problems[@]} > 0)); then
    status=1
    line+=$'\n'"  FAILED: $(IFS=';'; echo "${problems[*]}")"
    echo "----- $t: first report in $log -----"
    first=$(grep -m1 -n -E "ERROR: |runtime error:|invariant violated" "$log" | cut -d: -f1 || true)
    if [[ -n $first ]]; then sed -n "$((first > 3 ? first - 3 : 1)),$((first + 30))p" "$log"; echo "[...]"; fi
    tail -n 12 "$log"
  fi
  summary+=("$line")
done

echo "----- run-fuzz summary ($((SECONDS - start)) s in all) -----"
printf '%s\n' "${summary[@]}"
exit "$status"
