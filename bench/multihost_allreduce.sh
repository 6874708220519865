#!/usr/bin/env bash
# The gradient all-reduce across hosts against one host: 2 MPI ranks on one host (Open MPI's
# shared memory) and 2 ranks on two hosts made of network namespaces (TCP over a veth bridge,
# tests/netns_lib.sh), alternating rounds of ddpm_bench_dist (as bench/allreduce.sh runs it):
# step time, all-reduce time per step, its share hidden behind backward, the exposed time, and
# a raw all-reduce of a gradient-sized buffer. Needs root.
# usage: bench/multihost_allreduce.sh [CONFIG] [GLOBAL_BATCH] [STEPS] [ROUNDS] [BUCKET_MB]
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/shapes.yaml}
batch=${2:-16}
steps=${3:-10}
rounds=${4:-2}
bucket_mb=${5:-25}
build_dir=${DDPM_BUILD_DIR:-build}
bash scripts/build.sh > /dev/null
say() { echo "$*"; }
fail() { echo "multihost_allreduce: $*"; exit 1; }
skip() { echo "multihost_allreduce: cannot run: $*"; exit 1; }
# shellcheck source=tests/netns_lib.sh
source tests/netns_lib.sh
netns_hosts
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
bench=("$(pwd)/$build_dir/bench/ddpm_bench_dist" --config "$(pwd)/$config" --batch "$batch"
  --steps "$steps" --threads 1 --bucket-mb "$bucket_mb")
for round in $(seq "$rounds"); do
  echo "round $round, one host (shared memory): $(run_on hosta mpirun -np 2 --host hosta:2 "${mpi[@]}" \
    --bind-to none -x OMP_NUM_THREADS=1 "${bench[@]}")"
  echo "round $round, two hosts (TCP): $(run_on hosta mpirun -np 2 --host hosta,hostb "${mpi[@]}" \
    --bind-to none -x OMP_NUM_THREADS=1 "${bench[@]}")"
done
