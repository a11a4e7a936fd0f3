#!/usr/bin/env python3
"""One line per profiled kernel from Nsight Compute's text report (scripts/gpu-check.sh).

usage: ncu_summary.py NCU_TEXT_REPORT

Reads the default (non-CSV) output of `ncu --section ...` and prints, for every kernel launch,
the figures that say what bounds it: duration, DRAM and SM throughput (% of peak), achieved and
theoretical occupancy, registers per thread, the share of cycles in which a scheduler had an
eligible warp (SchedulerStats' "One or More Eligible", i.e. issued) and the warp cycles per issued
instruction. Metrics a report lacks are printed as '-'. The full report stays in the file.
"""
import re
import sys

# (column title, metric name as ncu prints it)
COLUMNS = [
    ("ms", "Duration"),
    ("DRAM%", "DRAM Throughput"),
    ("SM%", "Compute (SM) Throughput"),
    ("occ%", "Achieved Occupancy"),
    ("th.occ%", "Theoretical Occupancy"),
    ("regs", "Registers Per Thread"),
    ("issue%", "One or More Eligible"),
    ("cyc/inst", "Warp Cycles Per Issued Instruction"),
]
HEADER = re.compile(r"^\s*(?:void\s+)?(?P<name>\S.*?)\s+\((?P<grid>\d+, \d+, \d+)\)x\((?P<block>\d+, \d+, \d+)\)"
                    r".*Device \d+")
METRIC = re.compile(r"^\s+(?P<name>[A-Za-z][A-Za-z ()/.-]*?)\s{2,}(?P<unit>[A-Za-z%/]+)?\s*(?P<value>[\d.,]+)\s*$")
TO_MS = {"ms": 1.0, "msecond": 1.0, "us": 1e-3, "usecond": 1e-3, "ns": 1e-6, "nsecond": 1e-6, "s": 1e3,
         "second": 1e3}


def short(name):
    """Kernel name without namespaces and parameter list, template arguments kept."""
    name = name.replace("(anonymous namespace)::", "")
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    base = name[:cut]
    head, sep, args = base.partition("<")
    head = head.split("::")[-1]
    args = re.sub(r"lowrank::[A-Za-z0-9_:()]*::", "", args)
    return head + sep + args


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    kernels = []
    with open(sys.argv[1], errors="replace") as f:
        for line in f:
            m = HEADER.match(line)
            if m and "Context" in line:
                kernels.append({"name": short(m.group("name")), "grid": m.group("grid"), "metrics": {}})
                continue
            if not kernels:
                continue
            m = METRIC.match(line)
            if m:
                name, unit, value = m.group("name").strip(), m.group("unit") or "", m.group("value")
                try:
                    v = float(value.replace(",", ""))
                except ValueError:
                    continue
                if name == "Duration":
                    v *= TO_MS.get(unit, float("nan"))
                kernels[-1]["metrics"].setdefault(name, v)
    if not kernels:
        print("no kernel found in the report")
        return 1
    width = max(len(k["name"]) for k in kernels)
    width = min(width, 70)
    print(f"{'kernel':{width}s} {'grid':>12s} " + " ".join(f"{t:>8s}" for t, _ in COLUMNS))
    for k in kernels:
        cells = []
        for _, metric in COLUMNS:
            v = k["metrics"].get(metric)
            cells.append(f"{v:8.4g}" if v is not None else f"{'-':>8s}")
        print(f"{k['name'][:width]:{width}s} {k['grid']:>12s} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
