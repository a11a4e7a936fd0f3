#!/usr/bin/env bash
# The merge benchmark of docs/performance.md: `lowrank merge` of a synthetic ~1 GiB bf16
# checkpoint (Llama-shaped, every linear weight targeted by an r = 16 adapter) against `cp -r` of
# the same folder, page cache warm, interleaved in one run; prints medians, the ratio and the peak
# resident memory of the merge.
#   scripts/bench-merge.sh [WORK_DIR] [REPETITIONS] [extra lowrank merge options...]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/lowrank-merge-bench}
reps=${2:-7}
shift $(( $# > 2 ? 2 : $# )) || true
# LOWRANK_SKIP_SETUP=1 skips the Debian set-up (machines where packages cannot be installed);
# LOWRANK_CMAKE_ARGS adds configure arguments (e.g. -DCMAKE_PREFIX_PATH=... for the dependencies).
[[ ${LOWRANK_SKIP_SETUP:-0} == 1 ]] || scripts/setup-debian.sh
# shellcheck disable=SC2086
cmake --preset release ${LOWRANK_CMAKE_ARGS:-} >/dev/null
cmake --build build/release --target lowrank_tool lowrank_make_checkpoint >/dev/null
tool=build/release/tools/lowrank
mkdir -p "$work"
if [[ ! -f "$work/base/model.safetensors.index.json" ]]; then
  build/release/benchmarks/lowrank_make_checkpoint "$work" --layers 10
fi
cat "$work"/base/* "$work"/adapter/* >/dev/null  # warm the page cache
now() { date +%s.%N; }
cp_times=() merge_times=() rss=0
for ((i = 0; i < reps; i++)); do
  # Alternate the order; flush dirty pages before each command, so that neither pays for the
  # write-back of the other's output.
  for what in $([[ $((i % 2)) -eq 0 ]] && echo "cp merge" || echo "merge cp"); do
    rm -rf "$work/cp_out" "$work/merge_out"
    sync
    sleep 2  # (shorter pauses left bimodal times here: page reclaim after deleting 1 GiB)
    if [[ $what == cp ]]; then
      t0=$(now); cp -r "$work/base" "$work/cp_out"; t1=$(now)
      cp_times+=("$(awk "BEGIN {print $t1 - $t0}")")
    else
      t0=$(now); "$tool" merge "$work/base" "$work/adapter" -o "$work/merge_out" --stats "$@" 2>"$work/stats.txt"; t1=$(now)
      merge_times+=("$(awk "BEGIN {print $t1 - $t0}")")
      r=$(sed -n 's/.*peak_rss \([0-9]*\).*/\1/p' "$work/stats.txt")
      (( r > rss )) && rss=$r
    fi
  done
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
size=$(du -sb "$work/base" | cut -f1)
largest=$("$tool" inspect --json "$work/base" | sed -n 's/.*"bytes": \([0-9]*\).*/\1/p' | sort -n | tail -1)
mc=$(median "${cp_times[@]}")
mm=$(median "${merge_times[@]}")
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $(date -u '+%F %H:%M UTC'); merge options: ${*:-none}"
echo "checkpoint: $size bytes; largest tensor $largest bytes"
echo "cp -r   median $mc s  (all: ${cp_times[*]})"
echo "merge   median $mm s  (all: ${merge_times[*]})"
echo "ratio merge / cp: $(awk "BEGIN {printf \"%.3f\", $mm / $mc}")"
echo "peak RSS of merge: $rss bytes = $(awk "BEGIN {printf \"%.2f\", $rss / $largest}") x the largest tensor"
rm -rf "$work/cp_out" "$work/merge_out"
