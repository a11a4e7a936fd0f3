#!/usr/bin/env bash
# Installs what is missing (Debian packages), then configures, builds and runs the whole test
# suite with the `dev` preset (Debug, warnings as errors): unit tests on every target this CPU
# supports, the header checks, the three consumer projects, the examples and the two-rank MPI test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-debian.sh mpi   # the dev preset builds lowrank::mpi and its mpirun test
cmake --workflow --preset dev
