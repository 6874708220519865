#!/usr/bin/env bash
# Data-parallel train steps on the CPU with 1 and 2 MPI ranks, alternating rounds: step time,
# gradient all-reduce time and the share of it hidden behind backward, and the raw MPI
# all-reduce bandwidth of a gradient-sized buffer. Each rank gets cores / ranks threads, unbound
# (mpirun binds a lone rank to one core by default).
# usage: bench/allreduce.sh [CONFIG] [GLOBAL_BATCH] [STEPS] [ROUNDS] [BUCKET_MB]
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/shapes.yaml}
batch=${2:-16}
steps=${3:-10}
rounds=${4:-2}
bucket_mb=${5:-25}
build_dir=${DDPM_BUILD_DIR:-build}
cores=$(nproc)
bash scripts/build.sh > /dev/null
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
for round in $(seq "$rounds"); do
  for ranks in 1 2; do
    threads=$((cores / ranks > 0 ? cores / ranks : 1))
    echo "round $round: $(OMP_NUM_THREADS=$threads mpirun -np "$ranks" --oversubscribe --bind-to none \
      "$build_dir/bench/ddpm_bench_dist" --config "$config" --batch "$batch" --steps "$steps" \
      --threads "$threads" --bucket-mb "$bucket_mb")"
  done
done
