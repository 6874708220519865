#!/usr/bin/env bash
# The bound's throughput side by side: ddpm_nll (C++) against bench/nll_torch.py (plain PyTorch,
# the reference UNet and bound of tests/reference/ddpm_ref.py), over all T terms per image, on
# 1 rank (2 threads) and on 2 ranks (1 thread each: mpirun -np 2 ddpm_nll, and two Python
# processes started together, each on the share of batches its rank would take). Alternating
# rounds; prints each and the C++/PyTorch ratio of the time per image (below 1: C++ is faster).
# Both time the bound alone (after loading); the C++ weights are a 1-step run's EMA.
# usage: bench/nll.sh [CONFIG] [IMAGES] [BATCH] [ROUNDS]   (IMAGES / BATCH even: a batch per rank)
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/shapes.yaml}
images=${2:-16}
batch=${3:-8}
rounds=${4:-2}
build_dir=${DDPM_BUILD_DIR:-build}
python=${DDPM_REFERENCE_PYTHON:-/usr/bin/python3}
bash scripts/build.sh > /dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_WAIT_POLICY=PASSIVE
# shellcheck source=bench/trained_model.sh
source bench/trained_model.sh
one_step_run "$build_dir" "$config" "$work/run"
nll=("$build_dir/tools/ddpm_nll" --checkpoint "$work/run" --data "shapes:$images" --batch "$batch"
     --out "$work/nll")
py=("$python" bench/nll_torch.py --config "$config" --num "$images" --batch "$batch")
cpp_seconds() { grep -oE "nll_terms.png in [0-9.]+s" "$1" | sed -E 's/.* in ([0-9.]+)s/\1/'; }
py_seconds() { grep -ohE "seconds=[0-9.]+" "$@" | cut -d= -f2 | sort -g | tail -1; }
log=$work/rounds
for round in $(seq "$rounds"); do
  OMP_NUM_THREADS=2 "${nll[@]}" > "$work/c1.log" 2>&1
  c1=$(cpp_seconds "$work/c1.log")
  OMP_NUM_THREADS=2 "${py[@]}" --threads 2 > "$work/p1.log" 2>&1
  p1=$(py_seconds "$work/p1.log")
  OMP_NUM_THREADS=1 mpirun -np 2 -x OMP_NUM_THREADS "${nll[@]}" > "$work/c2.log" 2>&1
  c2=$(cpp_seconds "$work/c2.log")
  OMP_NUM_THREADS=1 "${py[@]}" --threads 1 --world 2 --rank 0 > "$work/p2a.log" 2>&1 &
  OMP_NUM_THREADS=1 "${py[@]}" --threads 1 --world 2 --rank 1 > "$work/p2b.log" 2>&1
  wait
  p2=$(py_seconds "$work/p2a.log" "$work/p2b.log")
  echo "round $round: 1 rank: C++ ${c1}s, PyTorch ${p1}s; 2 ranks: C++ ${c2}s, PyTorch ${p2}s" |
    tee -a "$log"
done
"$python" - "$log" "$images" <<'PY'
import re, statistics, sys
rows = [list(map(float, re.findall(r"([0-9.]+)s", line))) for line in open(sys.argv[1])]
images = int(sys.argv[2])
for name, (c, p) in (("1 rank", (0, 1)), ("2 ranks", (2, 3))):
    cpp = statistics.mean(r[c] for r in rows)
    torch = statistics.mean(r[p] for r in rows)
    print(f"{name}: C++ {images / cpp:.4f} images/s ({cpp:.1f} s), PyTorch {images / torch:.4f} "
          f"images/s ({torch:.1f} s), C++/PyTorch time {cpp / torch:.3f}")
PY
