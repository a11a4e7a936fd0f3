#!/usr/bin/env bash
# Installs what is missing (Debian packages), then configures, builds and runs the whole test
# suite with the `check` preset in build/check: Clang 14, Debug, AddressSanitizer and
# UndefinedBehaviorSanitizer, warnings as errors. Unit tests on every target this CPU supports,
# the consumer projects, the examples, the command-line tool and the two-rank MPI test, all
# instrumented. (The `dev` preset is the same suite with GCC and full debug info, plus the header
# checks, which CI's GCC step also compiles.)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-debian.sh mpi clang   # lowrank::mpi and its mpirun test; Clang and its sanitizers
cmake --workflow --preset check
