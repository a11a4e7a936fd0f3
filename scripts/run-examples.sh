#!/usr/bin/env bash
# Installs what is missing (Debian packages), then builds the examples in Release and runs each.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-debian.sh
cmake --preset examples
cmake --build --preset examples --target run-examples
