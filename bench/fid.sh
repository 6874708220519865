#!/usr/bin/env bash
# Side by side: ddpm_bench_fid (C++) and bench/fid_torch.py (torchvision's Inception3 with
# pytorch-fid's blocks; pytorch-fid's scipy.linalg.sqrtm Frechet distance), alternating rounds,
# same batch and threads. Prints every round and the C++/PyTorch ratios.
# usage: bench/fid.sh [BATCH] [BATCHES] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
batch=${1:-25}
batches=${2:-3}
rounds=${3:-3}
threads=${DDPM_BENCH_THREADS:-$(nproc)}
build_dir=${DDPM_BUILD_DIR:-build}
python=${DDPM_REFERENCE_PYTHON:-/usr/bin/python3}
bash scripts/build.sh > /dev/null
common=(--batch "$batch" --batches "$batches" --threads "$threads")
bash bench/alternate.sh "$rounds" "images_per_second batch_ms_median fid2048_ms_median" \
  "$build_dir/bench/ddpm_bench_fid" "${common[@]}" -- "$python" bench/fid_torch.py "${common[@]}"
