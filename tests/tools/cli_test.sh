#!/usr/bin/env bash
# The `lowrank` command-line tool end to end: help, inspect, merge and extract on the PEFT
# fixtures, and bad input (exit status 1, one line on stderr, no output left behind).
#   cli_test.sh LOWRANK_BINARY DATA_DIR
set -uo pipefail
bin=$1
data=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

# run EXPECTED_RC ARGS...: runs the tool, keeps stdout/stderr in $work/out, $work/err
run() {
  local want=$1
  shift
  "$bin" "$@" >"$work/out" 2>"$work/err"
  local rc=$?
  if [[ $rc -ne $want ]]; then
    fail "lowrank $* exited $rc, expected $want; stderr: $(cat "$work/err")"
    return 1
  fi
  return 0
}
contains() { grep -qF -- "$2" "$1" || fail "$1 lacks \"$2\": $(head -c 400 "$1")"; }
one_line() { [[ $(wc -l <"$work/err") -eq 1 ]] || fail "expected one line on stderr, got: $(cat "$work/err")"; }

# Help for every command.
run 0 --help && contains "$work/out" "inspect" && contains "$work/out" "merge"
run 0 merge --help && contains "$work/out" "--dtype" && contains "$work/out" "--rounding" && contains "$work/out" "--seed"
run 0 inspect --help && contains "$work/out" "--json"
run 0 extract --help && contains "$work/out" "--rank" && contains "$work/out" "--targets" && contains "$work/out" "--layout"
run 0 --version && contains "$work/out" "."
run 2
run 2 merge "$data/gpt2/base"
run 2 merge a b -o c --dtype f8
run 2 extract a b -o c
run 2 extract a b -o c --rank 4 --dtype f16
run 2 extract a b -o c --rank 4 --targets q_proj --target-regex 'q.*'

# inspect: a checkpoint folder, a sharded one, an adapter, JSON output.
run 0 inspect "$data/gpt2/base" && contains "$work/out" "transformer.h.0.attn.c_attn.weight" && contains "$work/out" "[32, 96]"
run 0 inspect "$data/llama_bf16/base" && contains "$work/out" "3 files" && contains "$work/out" "model.safetensors.index.json"
run 0 inspect "$data/llama_rslora/adapter" && contains "$work/out" "rsLoRA yes" &&
  contains "$work/out" "rank_pattern  down_proj -> 8" &&
  { grep -qE "model\.layers\.1\.self_attn\.o_proj +4 +32 +16 " "$work/out" || fail "o_proj's rank/alpha/scale line: $(cat "$work/out")"; }
run 0 inspect --json "$data/gpt2/adapter" && contains "$work/out" '"kind": "peft_adapter"' && contains "$work/out" '"fan_in_fan_out": true'
run 0 inspect --json "$data/llama_rslora/base/model.safetensors" && contains "$work/out" '"kind": "checkpoint"'

# merge: each fixture family; quiet when stderr is not a terminal.
for family in gpt2 llama_rslora llama_bf16; do
  if run 0 merge "$data/$family/base" "$data/$family/adapter" -o "$work/$family"; then
    [[ -s "$work/err" ]] && fail "merge wrote to stderr without a terminal: $(cat "$work/err")"
    for f in "$data/$family/base"/*; do
      [[ -e "$work/$family/$(basename "$f")" ]] || fail "$family: output lacks $(basename "$f")"
    done
    cmp -s "$data/$family/base/config.json" "$work/$family/config.json" || fail "$family: config.json not copied"
  fi
done
run 0 merge "$data/llama_rslora/base/model.safetensors" "$data/llama_rslora/adapter" -o "$work/one.safetensors" --dtype bf16 --rounding stochastic --seed 3 --stats
contains "$work/err" "peak_rss"
run 0 inspect "$work/one.safetensors" && contains "$work/out" "BF16"

# extract: the fixtures' merged checkpoints are base + a rank-4 (GPT-2) or rank <= 8 (Llama) change.
# json_field FILE KEY: a top-level number or boolean of a JSON document (python3 if present).
json_field() {
  if command -v python3 >/dev/null; then
    python3 -c 'import json, sys; v = json.load(open(sys.argv[1]))[sys.argv[2]]; print(str(v).lower() if isinstance(v, bool) else v)' "$1" "$2"
  else
    sed -n "s/^  \"$2\": \"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}$/\1/p" "$1"
  fi
}
if run 0 extract "$data/gpt2/base" "$data/gpt2/merged" -o "$work/ex_gpt2" --rank 4 --json; then
  [[ -s "$work/err" ]] && fail "extract wrote to stderr without a terminal: $(cat "$work/err")"
  [[ $(json_field "$work/out" kind) == extract ]] || fail "extract --json: kind: $(head -c 300 "$work/out")"
  [[ $(json_field "$work/out" written) == 8 ]] || fail "extract --json: written is not 8: $(head -c 600 "$work/out")"
  [[ $(json_field "$work/out" fan_in_fan_out) == true ]] || fail "extract of GPT-2: fan_in_fan_out is not true"
  awk -v e="$(json_field "$work/out" min_captured_energy)" 'BEGIN { exit !(e > 0.9999 && e < 1.0001) }' ||
    fail "extract of a rank-4 change at rank 4: captured energy $(json_field "$work/out" min_captured_energy)"
fi
run 0 inspect "$work/ex_gpt2" && contains "$work/out" "fan_in_fan_out yes" && contains "$work/out" "transformer.h.1.mlp.c_proj"
run 0 merge "$data/gpt2/base" "$work/ex_gpt2" -o "$work/ex_gpt2_merged"
# A rank below the change's: energy < 1, a per-module table with --stats; a list of targets.
if run 0 extract "$data/llama_rslora/base" "$data/llama_rslora/merged" -o "$work/ex_llama" --rank 2 --targets q_proj,v_proj --dtype bf16 --json --stats; then
  [[ $(json_field "$work/out" written) == 4 ]] || fail "extract --targets q_proj,v_proj: written is not 4"
  awk -v e="$(json_field "$work/out" min_captured_energy)" 'BEGIN { exit !(e > 0 && e < 0.99) }' ||
    fail "extract at rank 2 of a rank-4 change: captured energy $(json_field "$work/out" min_captured_energy)"
  contains "$work/err" "model.layers.1.self_attn.v_proj" && contains "$work/err" "peak_rss"
fi
run 0 inspect --json "$work/ex_llama" && contains "$work/out" '"dtype": "BF16"' && contains "$work/out" '"r": 2'
run 1 extract "$data/llama_rslora/base" "$data/llama_rslora/merged" -o "$work/ex_bad" --rank 17 && one_line &&
  contains "$work/err" "lowrank extract:" && contains "$work/err" "k_proj" && contains "$work/err" "min(in, out) = 16"
run 1 extract "$data/llama_rslora/base" "$data/llama_rslora/base" -o "$work/ex_bad" --rank 2 && one_line &&
  contains "$work/err" "identical"
run 1 extract "$data/gpt2/base" "$data/llama_rslora/merged" -o "$work/ex_bad" --rank 2 && one_line
run 1 extract "$data/gpt2/base" "$data/gpt2/merged" -o "$work/ex_bad" --rank 2 --targets wte && one_line &&
  contains "$work/err" "embedding"
[[ -e "$work/ex_bad" ]] && fail "a failed extract left its output folder"
run 1 extract "$data/gpt2/base" "$data/gpt2/merged" -o "$work/ex_gpt2" --rank 4 && one_line && contains "$work/err" "--force"
run 0 extract "$data/gpt2/base" "$data/gpt2/merged" -o "$work/ex_gpt2" --rank 4 --force --threads 1

# Bad input: exit 1, one line naming the problem, nothing written.
head -c 1000 "$data/llama_rslora/base/model.safetensors" >"$work/truncated.safetensors"
run 1 merge "$work/truncated.safetensors" "$data/llama_rslora/adapter" -o "$work/bad1.safetensors" && one_line &&
  contains "$work/err" "lowrank merge:" && contains "$work/err" "truncated.safetensors"
[[ -e "$work/bad1.safetensors" ]] && fail "a failed merge left its output"
run 1 merge "$data/gpt2/base" "$data/llama_rslora/adapter" -o "$work/bad2" && one_line && contains "$work/err" "no tensor"
[[ -e "$work/bad2" ]] && fail "a failed merge left its output folder"
run 1 merge "$data/gpt2/base" "$data/gpt2/adapter" -o "$data/gpt2/base" && one_line && contains "$work/err" "input"
run 1 merge "$data/gpt2/base" "$data/gpt2/adapter" -o "$work/gpt2" && one_line && contains "$work/err" "--force"
run 0 merge "$data/gpt2/base" "$data/gpt2/adapter" -o "$work/gpt2" --force
run 1 inspect "$work/nothing-here" && one_line && contains "$work/err" "lowrank inspect:"
if ls -a "$work" | grep -q lowrank-; then fail "temporary files left: $(ls -a "$work")"; fi
if ls -a "$data"/*/base "$data"/*/adapter | grep -q lowrank-; then fail "temporary files left in the fixtures"; fi

if [[ $failures -ne 0 ]]; then
  echo "$failures failure(s)"
  exit 1
fi
echo "cli: all checks passed"
