#!/usr/bin/env bash
# Installs what is missing (Debian packages), then configures, builds and runs the whole test
# suite with the `dev` preset (Debug, warnings as errors): unit tests on every target this CPU
# supports, the header checks, the three consumer projects and the examples.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-debian.sh
cmake --workflow --preset dev
