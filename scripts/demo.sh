#!/usr/bin/env bash
# The main job: installs, builds, and trains a small DDPM on the built-in shapes dataset on the
# CPU, writing sample grids to runs/demo/samples/. Extra arguments go to ddpm_worker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
build_dir=${DDPM_BUILD_DIR:-build}
run_dir=${DDPM_RUN_DIR:-runs/demo}
# --resume: a rerun continues the run (or, finished, only draws its samples) and loses nothing.
"$build_dir/worker/ddpm_worker" --config configs/shapes.yaml --run-dir "$run_dir" --resume "$@"
echo
echo "Sample grids:"
ls -1 "$run_dir"/samples/*.png
echo "More samples from the EMA weights:"
echo "  $build_dir/tools/ddpm_sample --checkpoint $run_dir --num 64 --out more.png"
