#!/usr/bin/env bash
# Installs what lowrank needs to build, test and benchmark on Debian 12 (or a close relative), from
# Debian's packages only; installs nothing that is already there. Run as root, or with sudo.
#   scripts/setup-debian.sh            build + tests + examples + benchmarks
#   scripts/setup-debian.sh PKG...     the same plus these packages (e.g. the fuzzers' clang)
#   scripts/setup-debian.sh mpi        the same plus OpenMPI (LOWRANK_ENABLE_MPI; the dev and check presets)
#   scripts/setup-debian.sh clang      the same plus Clang 14 with its sanitizer runtimes, OpenMP
#                                      runtime and symbolizer (the check preset, the fuzzers)
set -euo pipefail

# Optional groups named on the command line; other arguments are package names.
extra=()
for arg in "$@"; do
  case "$arg" in
    mpi) extra+=(openmpi-bin libopenmpi-dev) ;;  # lowrank::mpi and its mpirun test
    clang) extra+=(clang-14 libclang-rt-14-dev libomp-14-dev llvm-14) ;;
    *) extra+=("$arg") ;;
  esac
done

packages=(
  g++ cmake ninja-build pkg-config   # toolchain (CMake >= 3.25)
  libeigen3-dev libfmt-dev           # the library's dependencies
  nlohmann-json3-dev libcli11-dev    # lowrank::io (JSON) and the lowrank tool (command line)
  libgtest-dev libgmock-dev          # tests
  libbenchmark-dev libopenblas-dev   # benchmarks and their OpenBLAS baseline
  python3                            # scripts/bench_ratios.py
  "${extra[@]}"
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]} == 0)); then
  exit 0
fi

echo "setup-debian: installing ${missing[*]}"
sudo=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "setup-debian: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
