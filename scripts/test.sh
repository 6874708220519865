#!/usr/bin/env bash
# The whole test suite: installs, builds, and runs every ctest test. Extra arguments go to ctest
# (for example -L unit).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
build_dir=${DDPM_BUILD_DIR:-build}
ctest --test-dir "$build_dir" --output-on-failure --parallel "$(nproc)" "$@"
