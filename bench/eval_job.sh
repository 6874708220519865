#!/usr/bin/env bash
# What an evaluation job's resumability costs: it writes every sample as a PNG while its
# checkpoint is in progress (to resume from after a lost group), through the same hook as
# `ddpm_fid checkpoint --also-save`. Alternating rounds of `ddpm_fid checkpoint` without and
# with --also-save on the shapes UNet's 1-step EMA weights, the quick protocol's sampler (heun,
# 18 steps), random Inception weights (tests/reference/fid_ref.py); prints each round's wall
# seconds and the ratio with/without.
# usage: bench/eval_job.sh [CONFIG] [SAMPLES] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/shapes.yaml}
samples=${2:-60}
rounds=${3:-2}
build_dir=${DDPM_BUILD_DIR:-build}
python=${DDPM_REFERENCE_PYTHON:-/usr/bin/python3}
bash scripts/build.sh > /dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# shellcheck source=bench/trained_model.sh
source bench/trained_model.sh
one_step_run "$build_dir" "$config" "$work/run"
"$python" tests/reference/fid_ref.py network "$work" > "$work/ref.log" 2>&1
"$python" tests/reference/fid_ref.py gaussian-stats "$work/ref.npz" >> "$work/ref.log" 2>&1
fid=("$build_dir/tools/ddpm_fid" checkpoint --checkpoint "$work/run" --ref "$work/ref.npz"
  --inception "$work/inception.pt" --num "$samples" --sampler heun --steps 18 --batch 10)
timed() {  # NAME ARGS...: prints NAME and the wall seconds
  local name=$1 start end
  shift
  rm -rf "$work/kept"
  start=$(date +%s.%N)
  OMP_NUM_THREADS=2 "${fid[@]}" "$@" > "$work/$name.log" 2>&1
  end=$(date +%s.%N)
  python3 -c "print('$name', round($end - $start, 2))"
}
for round in $(seq 1 "$rounds"); do
  timed "streamed" | tee -a "$work/times"
  timed "saved" --also-save "$work/kept/" | tee -a "$work/times"
  [ "$(find "$work/kept" -name '*.png' | wc -l)" = "$samples" ] || { echo "kept no samples"; exit 1; }
  echo "round $round done"
done
python3 - "$work/times" <<'PY'
import sys
times = {}
for line in open(sys.argv[1]):
    name, seconds = line.split()
    times.setdefault(name, []).append(float(seconds))
streamed, saved = sum(times["streamed"]), sum(times["saved"])
print("per round with/without saving:", [round(b / a, 3) for a, b in zip(times["streamed"], times["saved"])])
print(f"saving the samples costs {saved / streamed:.3f}x the streamed evaluation "
      f"({saved:.1f} s against {streamed:.1f} s over {len(times['saved'])} rounds)")
PY
