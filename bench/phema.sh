#!/usr/bin/env bash
# What post-hoc EMA costs: the paper's CIFAR-10 UNet (35.7M parameters) trained on the CPU at
# batch 2 for SNAPSHOTS steps with a snapshot of its two power-function profiles (sigma_rel 0.05,
# 0.10) after every step, then `ddpm_phema` reconstructing one sigma_rel, and three at once, from
# all of them; prints each reconstruction's wall seconds and the snapshots' size on disk.
# usage: bench/phema.sh [SNAPSHOTS]
set -euo pipefail
cd "$(dirname "$0")/.."
snapshots=${1:-8}
build_dir=${DDPM_BUILD_DIR:-build}
bash scripts/build.sh > /dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
DDPM_TRAIN_STEPS=$snapshots DDPM_TRAIN_BATCH_SIZE=2 DDPM_TRAIN_DEVICE=cpu DDPM_TRAIN_CHECKPOINT_EVERY=0 \
  DDPM_TRAIN_PHEMA_SNAPSHOT_EVERY=1 DDPM_SAMPLE_NUM_IMAGES=1 DDPM_SAMPLE_SAMPLER=ddim \
  DDPM_SAMPLE_STEPS=1 DDPM_DATA_DATASET=shapes DDPM_DATA_SHAPES_SIZE=64 \
  "$build_dir/worker/ddpm_worker" --config configs/cifar10.yaml --run-dir "$work/run" \
  --progress off > "$work/train.log" 2>&1 || { tail -5 "$work/train.log"; exit 1; }
echo "snapshots: $(find "$work/run/phema" -maxdepth 1 -name 'step_*' | wc -l), $(du -sh "$work/run/phema" | cut -f1) on disk"
for sigmas in 0.07 0.04,0.07,0.15; do
  start=$(date +%s.%N)
  "$build_dir/tools/ddpm_phema" --run "$work/run" --sigma-rel "$sigmas" --out "$work/out-$sigmas" \
    > "$work/phema.log" 2>&1 || { cat "$work/phema.log"; exit 1; }
  end=$(date +%s.%N)
  grep "fit error" "$work/phema.log" | sed 's/; weights in.*//'
  echo "reconstruct sigma_rel $sigmas from $snapshots snapshots: $(echo "$end - $start" | bc) s"
done
