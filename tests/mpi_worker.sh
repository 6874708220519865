#!/usr/bin/env bash
# ddpm_worker under mpirun -np 2: trains with checkpoints and a sample grid, resumes exactly
# where it stopped (with importance-sampled timesteps too), and ends the whole job promptly,
# with the failing rank's message, when one rank throws or hangs. ddpm_nll on 2 ranks gives
# the bound of 1.
# usage: mpi_worker.sh MPIEXEC DDPM_WORKER SOURCE_DIR DDPM_NLL
set -euo pipefail
mpiexec=$1 worker=$2 src=$3 nll=$4
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "mpi: FAIL: $*"; for f in "$work"/*.log; do echo "--- $f"; tail -20 "$f"; done; exit 1; }
mpirun() { timeout 300 "$mpiexec" -np 2 --oversubscribe "$@"; }
# tests/tiny.yaml, 12 steps: logs every 4, checkpoints every 6.
sed -e 's/steps: 30,/steps: 12,/' -e 's/log_every: 10/log_every: 4/' \
  -e 's/checkpoint_every: 20/checkpoint_every: 6/' "$(dirname "$0")/tiny.yaml" > "$work/tiny.yaml"

echo "mpi: 2 ranks, 20 steps, checkpoints at 10 and 20"
export DDPM_TRAIN_STEPS=20 DDPM_TRAIN_CHECKPOINT_EVERY=10
mpirun "$worker" --config "$work/tiny.yaml" --run-dir "$work/run" > "$work/train.log" 2>&1 ||
  fail "training failed"
grep -q "2 ranks x 1 micro-batch x 4 images = global batch 8 (mpi)" "$work/train.log" || fail "no world banner"
grep -q "all-reduce .* ms, .*% hidden" "$work/train.log" || fail "no all-reduce metrics in the log"
# mpirun gives the ranks a pseudo-terminal, but the job's output is a file: plain lines at the
# log interval, no progress bar redrawn with carriage returns every step.
! grep -q $'\r' "$work/train.log" || fail "a progress bar in a log file ($(grep -c $'\r' "$work/train.log") lines with CR)"
[ "$(grep -o 'step 20/20 | loss' "$work/train.log" | wc -l)" = 1 ] || fail "not exactly one rank logs"
for step in 000000010 000000020; do
  for f in manifest.json COMMITTED shard-00000-of-00002 shard-00001-of-00002; do
    [ -f "$work/run/checkpoints/step_$step/$f" ] || fail "step_$step/$f missing"
  done
done
[ -f "$work/run/samples/step_000000020.png" ] || fail "no sample grid"

# Every byte of the state (weights, EMA, Adam moments, counters, each rank's RNG, the data
# cursor) is in the shards, so equal shard checksums mean a bitwise equal state.
checksums() { grep -o '"xxh64": "[0-9a-f]*"' "$1/manifest.json"; }

echo "mpi: 10 steps, checkpoint, stop, resume, 10 more: bitwise the 20 straight steps"
mkdir -p "$work/again/checkpoints"
cp -r "$work/run/checkpoints/step_000000010" "$work/again/checkpoints/"
echo step_000000010 > "$work/again/checkpoints/latest"
mpirun "$worker" --config "$work/tiny.yaml" --run-dir "$work/again" --resume > "$work/resume.log" 2>&1 ||
  fail "resume failed"
grep -q "resumed from .*step_000000010 at step 10" "$work/resume.log" || fail "did not resume"
[ "$(checksums "$work/run/checkpoints/step_000000020")" = \
  "$(checksums "$work/again/checkpoints/step_000000020")" ] ||
  fail "the resumed step-20 state differs from the uninterrupted run's"
cmp -s "$work/run/ema_weights.pt" "$work/again/ema_weights.pt" ||
  fail "resumed EMA weights differ from the uninterrupted run's"

echo "mpi: the 2-rank checkpoint resumes on 1 and on 3 ranks"
for ranks in 1 3; do
  mkdir -p "$work/w$ranks/checkpoints"
  cp -r "$work/run/checkpoints/step_000000010" "$work/w$ranks/checkpoints/"
  if [ "$ranks" = 1 ]; then
    "$worker" --config "$work/tiny.yaml" --run-dir "$work/w$ranks" --resume > "$work/w$ranks.log" 2>&1 ||
      fail "resume on 1 rank failed"
  else
    # 3 ranks need a global batch that divides by 3.
    DDPM_TRAIN_BATCH_SIZE=9 timeout 300 "$mpiexec" -np 3 --oversubscribe "$worker" --config "$work/tiny.yaml" \
      --run-dir "$work/w$ranks" --resume > "$work/w$ranks.log" 2>&1 || fail "resume on 3 ranks failed"
  fi
  grep -q "written by 2 rank(s) and this run has $ranks" "$work/w$ranks.log" ||
    fail "no world-size warning on $ranks rank(s)"
  grep -q "resumed from .*step_000000010 at step 10" "$work/w$ranks.log" ||
    fail "did not resume on $ranks rank(s)"
  [ -f "$work/w$ranks/checkpoints/step_000000020/shard-0000$((ranks - 1))-of-0000$ranks" ] ||
    fail "no $ranks-rank checkpoint at step 20"
done

echo "mpi: importance-sampled timesteps (T = 8): 10 steps, resume, 10 more: bitwise the 20 straight"
export DDPM_DIFFUSION_TIMESTEPS=8 DDPM_TRAIN_TIMESTEP_SAMPLER=loss_second_moment
mpirun "$worker" --config "$work/tiny.yaml" --run-dir "$work/is" > "$work/is.log" 2>&1 ||
  fail "training with loss_second_moment failed"
grep -q "timestep sampler: every timestep has its last 10 losses at step" "$work/is.log" ||
  fail "the sampler never drew from its history"
grep -q '"timesteps/loss_history"' "$work/is/checkpoints/step_000000010/manifest.json" ||
  fail "no loss history in the checkpoint"
mkdir -p "$work/is2/checkpoints"
cp -r "$work/is/checkpoints/step_000000010" "$work/is2/checkpoints/"
echo step_000000010 > "$work/is2/checkpoints/latest"
mpirun "$worker" --config "$work/tiny.yaml" --run-dir "$work/is2" --resume > "$work/is2.log" 2>&1 ||
  fail "resume with loss_second_moment failed"
[ "$(checksums "$work/is/checkpoints/step_000000020")" = \
  "$(checksums "$work/is2/checkpoints/step_000000020")" ] ||
  fail "the resumed importance-sampled run differs from the uninterrupted one"
unset DDPM_DIFFUSION_TIMESTEPS DDPM_TRAIN_TIMESTEP_SAMPLER
unset DDPM_TRAIN_STEPS DDPM_TRAIN_CHECKPOINT_EVERY

echo "mpi: ddpm_nll on 2 ranks gives the bound of 1 rank"
nll_args=(--checkpoint "$work/run" --data shapes:10 --timesteps 5 --batch 4)
"$nll" "${nll_args[@]}" --out "$work/nll1" > "$work/nll1.log" 2>&1 || fail "ddpm_nll failed"
mpirun "$nll" "${nll_args[@]}" --out "$work/nll2" > "$work/nll2.log" 2>&1 ||
  fail "ddpm_nll under mpirun failed"
grep -q "(standard error over 10 images, 2 rank(s))" "$work/nll2.log" || fail "not 2 ranks"
[ "$(grep -c '^bits/dim' "$work/nll2.log")" = 1 ] || fail "not exactly one rank reports"
one=$(grep -oE '^bits/dim [0-9.]+ \+- [0-9.]+' "$work/nll1.log")
two=$(grep -oE '^bits/dim [0-9.]+ \+- [0-9.]+' "$work/nll2.log")
if [ -z "$one" ] || [ "$one" != "$two" ]; then fail "1 rank: '$one', 2 ranks: '$two'"; fi
# The same batches, summed in another order: equal to float64 rounding.
python3 - "$work/nll1/nll_terms.csv" "$work/nll2/nll_terms.csv" <<'PY' || fail "the terms differ"
import csv, sys
a, b = (list(csv.reader(open(path))) for path in sys.argv[1:3])
assert a[0] == b[0] and len(a) == len(b) == 7, (a, b)
for x, y in zip(a[1:], b[1:]):
    assert x[:2] == y[:2], (x, y)
    assert abs(float(x[2]) - float(y[2])) <= 1e-12 * abs(float(x[2])), (x, y)
PY
echo "mpi: $one on 1 and 2 ranks"

echo "mpi: a rank that throws ends the job"
start=$(date +%s)
if DDPM_FAULT_INJECT=rank=1,step=3 mpirun "$worker" --config "$work/tiny.yaml" \
    --run-dir "$work/throw" > "$work/throw.log" 2>&1; then
  fail "the job succeeded although rank 1 failed"
fi
grep -q "rank 1 of 2: error: DDPM_FAULT_INJECT: injected failure before step 3" "$work/throw.log" ||
  fail "rank 1's message is missing"
echo "mpi: ended $(($(date +%s) - start)) s after start"

echo "mpi: a rank that hangs is reported by the others after dist.timeout_seconds"
start=$(date +%s)
if DDPM_DIST_TIMEOUT_SECONDS=3 DDPM_FAULT_INJECT=rank=1,step=3,hang mpirun "$worker" \
    --config "$work/tiny.yaml" --run-dir "$work/hang" > "$work/hang.log" 2>&1; then
  fail "the job succeeded although rank 1 hung"
fi
grep -Eq "rank 0 of 2: error: rank 0: .* \(step 3\) did not complete within 3" "$work/hang.log" ||
  fail "rank 0 did not report the stuck collective"
grep -q "progress: rank 0 inside step 3, rank 1 after step 2; behind: rank 1" "$work/hang.log" ||
  fail "rank 0 did not name rank 1 as the one behind"
echo "mpi: ended $(($(date +%s) - start)) s after start"
echo "mpi: PASS"
