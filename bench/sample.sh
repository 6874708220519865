#!/usr/bin/env bash
# What sampling costs per image with each sampler, and how ddpm_sample scales from 1 rank to 2:
# the shapes UNet (a 1-step run's EMA weights), IMAGES images in batches of BATCH written as
# PNGs. Per sampler (ddpm over all T = 1000 steps, ddpm respaced onto 100, heun with 18 steps
# = 35 network evaluations) on 1 rank (2 threads); then ddpm's 1000 steps on 2 ranks (1 thread
# each, mpirun); then the same 1000-step sampler as a plain PyTorch loop in Python
# (bench/sample_torch.py: the reference UNet, 2 threads, PNGs written with PIL), side by side.
# Prints each job's wall seconds (process start to exit, loading included on both sides) and
# images/s.
# usage: bench/sample.sh [CONFIG] [IMAGES] [BATCH]   (IMAGES / BATCH even: a batch per rank)
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/shapes.yaml}
images=${2:-16}
batch=${3:-8}
build_dir=${DDPM_BUILD_DIR:-build}
bash scripts/build.sh > /dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_WAIT_POLICY=PASSIVE
# shellcheck source=bench/trained_model.sh
source bench/trained_model.sh
one_step_run "$build_dir" "$config" "$work/run"
sample=("$build_dir/tools/ddpm_sample" --checkpoint "$work/run" --num "$images" --batch "$batch")
# ddpm_sample's last line: "N images in DIR (N drawn now) in H:MM:SS"; seconds from the clock.
run() {  # NAME RANKS THREADS ARGS...
  local name=$1 ranks=$2 threads=$3
  shift 3
  local start end
  start=$(date +%s.%N)
  if [ "$ranks" = 1 ]; then
    OMP_NUM_THREADS=$threads "${sample[@]}" "$@" --out "$work/$name/" > "$work/$name.log" 2>&1
  else
    OMP_NUM_THREADS=$threads mpirun -np "$ranks" -x OMP_NUM_THREADS "${sample[@]}" "$@" \
      --out "$work/$name/" > "$work/$name.log" 2>&1
  fi
  end=$(date +%s.%N)
  python3 -c "import sys; s = $end - $start; print(f'$name: {s:.1f} s, {$images / s:.4f} images/s, {s / $images:.2f} s per image')"
}
run ddpm-1000-1rank 1 2 --sampler ddpm --steps 0
run ddpm-100-1rank 1 2 --sampler ddpm --steps 100
run heun-18-1rank 1 2 --sampler heun --steps 18
run ddpm-1000-2ranks 2 1 --sampler ddpm --steps 0
# The Python peer: the same model config, images, batch and threads.
python=${DDPM_REFERENCE_PYTHON:-/usr/bin/python3}
start=$(date +%s.%N)
"$python" bench/sample_torch.py --config "$config" --num "$images" --batch "$batch" --threads 2 \
  --out "$work/torch/" > "$work/torch.log" 2>&1 || { cat "$work/torch.log"; exit 1; }
end=$(date +%s.%N)
python3 -c "import sys; s = $end - $start; print(f'pytorch-ddpm-1000-1rank: {s:.1f} s, {$images / s:.4f} images/s, {s / $images:.2f} s per image')"
