#!/usr/bin/env bash
# Side-by-side train-step benchmark: ddpm_bench (C++) against bench/train_step_torch.py (plain
# PyTorch), alternating, same model, batch and threads. Prints each run and the ratio of means.
# usage: bench/train_step.sh [CONFIG] [BATCH] [STEPS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/shapes.yaml}
batch=${2:-32}
steps=${3:-10}
rounds=${4:-3}
threads=${DDPM_BENCH_THREADS:-$(nproc)}
build_dir=${DDPM_BUILD_DIR:-build}
bash scripts/build.sh > /dev/null
python=${DDPM_REFERENCE_PYTHON:-/usr/bin/python3}

cpp_ms=(); py_ms=()
for round in $(seq "$rounds"); do
  cpp=$("$build_dir/bench/ddpm_bench" --config "$config" --batch "$batch" --steps "$steps" --threads "$threads")
  py=$("$python" bench/train_step_torch.py --config "$config" --batch "$batch" --steps "$steps" --threads "$threads")
  echo "round $round: $cpp"
  echo "round $round: $py"
  cpp_ms+=("$(sed -E 's/.*ms_per_step=([0-9.]+).*/\1/' <<< "$cpp")")
  py_ms+=("$(sed -E 's/.*ms_per_step=([0-9.]+).*/\1/' <<< "$py")")
done
"$python" - "${cpp_ms[*]}" "${py_ms[*]}" <<'PY'
import statistics, sys
cpp = [float(x) for x in sys.argv[1].split()]
py = [float(x) for x in sys.argv[2].split()]
print(f"mean ms/step: cpp {statistics.mean(cpp):.1f}, pytorch {statistics.mean(py):.1f}; "
      f"pytorch/cpp time ratio {statistics.mean(py) / statistics.mean(cpp):.3f} "
      f"(>1 means the C++ step is faster)")
PY
