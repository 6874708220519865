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
log=$(mktemp)
for round in $(seq "$rounds"); do
  echo "round $round: $("$build_dir/bench/ddpm_bench" "${common[@]}")" | tee -a "$log"
  echo "round $round: $("$python" bench/train_step_torch.py "${common[@]}")" | tee -a "$log"
done
"$python" - "$log" <<'PY'
import re, statistics, sys
rows = [dict(re.findall(r"(\w+)=(\S+)", line)) for line in open(sys.argv[1])]
def mean(impl, key):
    return statistics.mean(float(r[key]) for r in rows if r["impl"] == impl)
print("means over rounds (C++ / PyTorch):")
for key in ("train_ms_median", "fwd_bwd_ms_median", "ddpm_step_ms", "ddim_step_ms", "peak_rss_mb"):
    cpp, py = mean("cpp", key), mean("pytorch", key)
    print(f"  {key:18s} {cpp:9.2f} / {py:9.2f}   ratio C++/PyTorch {cpp / py:.3f}")
PY
rm -f "$log"
