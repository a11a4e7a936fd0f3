#!/usr/bin/env python3
"""Runs lowrank's benchmarks once and prints the ratio table (markdown).

    scripts/bench_ratios.py [--binary build/release/benchmarks/lowrank_benchmarks]
                            [--repetitions 5] [--filter REGEX] [--json out.json]
    scripts/bench_ratios.py --from-json out.json      # table from a saved run

Benchmarks are named <op>/<impl>/<shape>; for each op and shape the table gives, from the medians
of one run:
  lowrank/limit     limit time / lowrank time: the fraction of the bandwidth limit reached
  lowrank/eigen     eigen time / lowrank time: speed-up over Eigen (> 1 is faster)
  lowrank/eigen-native  the same against Eigen built with -march=native
  lowrank/eigen-vector  rank 1 only: against Eigen's vector outer product (best of portable, native)
  lowrank/openblas  the same against OpenBLAS
  FLOP/s, and its fraction of the fma_peak/limit benchmark with the same thread count.
"""
import argparse
import json
import platform
import re
import subprocess
import sys
from collections import defaultdict


def run(binary, repetitions, bench_filter):
    # Random interleaving runs the repetitions of all benchmarks in a shuffled order, so that a
    # burst of load on the machine spreads over all of them instead of skewing one ratio.
    cmd = [binary, "--benchmark_format=json", f"--benchmark_repetitions={repetitions}",
           "--benchmark_report_aggregates_only=true", "--benchmark_enable_random_interleaving=true"]
    if bench_filter:
        cmd.append(f"--benchmark_filter={bench_filter}")
    print("running:", " ".join(cmd), file=sys.stderr)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out)


def medians(data):
    table = {}
    for b in data["benchmarks"]:
        if b.get("aggregate_name", "median") != "median":
            continue
        name = re.sub(r"/real_time.*$", "", b.get("run_name", b["name"]))
        table[name] = b
    return table


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default="build/release/benchmarks/lowrank_benchmarks")
    ap.add_argument("--repetitions", type=int, default=7)
    ap.add_argument("--filter", default="")
    ap.add_argument("--json", help="also save the raw benchmark JSON here")
    ap.add_argument("--from-json", help="read a saved run instead of running")
    args = ap.parse_args()

    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
    else:
        data = run(args.binary, args.repetitions, args.filter)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(data, f, indent=1)

    med = medians(data)
    peaks = {}
    groups = defaultdict(dict)
    for name, b in med.items():
        op, impl, shape = name.split("/", 2)
        if op == "fma_peak":
            peaks[shape.split("_")[-1]] = b.get("FLOP/s", 0.0)
            continue
        groups[(op, shape)][impl] = b

    ctx = data.get("context", {})
    print(f"machine: {platform.node()} | {ctx.get('num_cpus')} CPUs at {ctx.get('mhz_per_cpu')} MHz | "
          f"date: {ctx.get('date')} | repetitions: {args.repetitions} (medians)")
    for t, p in sorted(peaks.items()):
        print(f"fp32 FMA peak, {t}: {p / 1e9:.1f} GFLOP/s")
    print()
    print("| op | shape | lowrank/limit | lowrank/eigen | lowrank/eigen-native | lowrank/eigen-vector | "
          "lowrank/openblas | lowrank GFLOP/s | of FMA peak |")
    print("|---|---|---|---|---|---|---|---|---|")

    def key(item):
        (op, shape), _ = item
        m = re.search(r"_r(\d+)_(\w+?)_t(\d+)$", shape)
        return (op, m.group(2), int(m.group(3)), int(m.group(1))) if m else (op, shape)

    for (op, shape), impls in sorted(groups.items(), key=key):
        lr = impls.get("lowrank")
        if lr is None:
            continue
        t = lr["real_time"]

        def ratio(*names):
            times = [impls[n]["real_time"] for n in names if n in impls]
            return f"{min(times) / t:.2f}" if times else "n/a"

        flops = lr.get("FLOP/s", 0.0)
        threads = shape.split("_")[-1]
        peak = peaks.get(threads)
        frac = f"{flops / peak:.2f}" if peak else "n/a"
        print(f"| {op} | {shape} | {ratio('limit')} | {ratio('eigen')} | {ratio('eigen-native')} | "
              f"{ratio('eigen-vector', 'eigen-vector-native')} | {ratio('openblas')} | "
              f"{flops / 1e9:.1f} | {frac} |")


if __name__ == "__main__":
    main()
