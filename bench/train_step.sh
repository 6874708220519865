#!/usr/bin/env bash
# Side by side: ddpm_bench (C++) and bench/train_step_torch.py (plain PyTorch), alternating
# rounds, same model, batch, threads and step counts. Prints every round and the C++/PyTorch
# ratios of the median train step and of one sampler step (below 1: C++ is faster).
# usage: bench/train_step.sh [CONFIG] [BATCH] [STEPS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/shapes.yaml}
batch=${2:-16}
steps=${3:-20}
rounds=${4:-3}
threads=${DDPM_BENCH_THREADS:-$(nproc)}
build_dir=${DDPM_BUILD_DIR:-build}
python=${DDPM_REFERENCE_PYTHON:-/usr/bin/python3}
bash scripts/build.sh > /dev/null
common=(--config "$config" --batch "$batch" --steps "$steps" --threads "$threads" --sample-batch "$batch")
bash bench/alternate.sh "$rounds" \
  "train_ms_median fwd_bwd_ms_median ddpm_step_ms ddim_step_ms peak_rss_mb" \
  "$build_dir/bench/ddpm_bench" "${common[@]}" -- "$python" bench/train_step_torch.py "${common[@]}"
