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
scripts/setup-debian.sh
cmake --preset release >/dev/null
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
  rm -rf "$work/cp_out" "$work/merge_out"
  sync
  # Alternate the order so that neither always runs right after the other's page-cache churn.
  for what in $([[ $((i % 2)) -eq 0 ]] && echo "cp merge" || echo "merge cp"); do
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
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $(date -u +%F)"
echo "checkpoint: $size bytes; largest tensor $largest bytes"
echo "cp -r   median $mc s  (all: ${cp_times[*]})"
echo "merge   median $mm s  (all: ${merge_times[*]})"
echo "ratio merge / cp: $(awk "BEGIN {printf \"%.3f\", $mm / $mc}")"
echo "peak RSS of merge: $rss bytes = $(awk "BEGIN {printf \"%.2f\", $rss / $largest}") x the largest tensor"
rm -rf "$work/cp_out" "$work/merge_out"
