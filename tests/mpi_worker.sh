#!/usr/bin/env bash
# ddpm_worker under mpirun -np 2: trains with checkpoints and a sample grid, resumes exactly
# where it stopped, and ends the whole job promptly, with the failing rank's message, when one
# rank throws or hangs.
# usage: mpi_worker.sh MPIEXEC DDPM_WORKER SOURCE_DIR
set -euo pipefail
mpiexec=$1 worker=$2 src=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "mpi: FAIL: $*"; for f in "$work"/*.log; do echo "--- $f"; tail -20 "$f"; done; exit 1; }
mpirun() { timeout 300 "$mpiexec" -np 2 --oversubscribe "$@"; }
cat > "$work/tiny.yaml" <<'YAML'
model: {ch: 16, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], image_size: 16,
        norm_groups: 8, dropout: 0.1}
train: {steps: 12, batch_size: 8, lr: 0.001, warmup_steps: 2, log_every: 4,
        checkpoint_every: 6, threads: 1, device: cpu}
data: {shapes_size: 64}
sample: {sampler: ddim, steps: 4, num_images: 4}
dist: {bucket_mb: 0.05, timeout_seconds: 60}
YAML

echo "mpi: 2 ranks, 12 steps"
mpirun "$worker" --config "$work/tiny.yaml" --run-dir "$work/run" > "$work/train.log" 2>&1 ||
  fail "training failed"
grep -q "2 rank(s) x 4 images (global batch 8, mpi)" "$work/train.log" || fail "no world banner"
grep -q "all-reduce .* ms, .*% hidden" "$work/train.log" || fail "no all-reduce metrics in the log"
[ "$(grep -o 'step 12/12 | loss' "$work/train.log" | wc -l)" = 1 ] || fail "not exactly one rank logs"
[ -f "$work/run/checkpoints/step_000000006.ckpt" ] || fail "no periodic checkpoint"
[ -f "$work/run/checkpoints/step_000000012.ckpt" ] || fail "no final checkpoint"
[ -f "$work/run/samples/step_000000012.png" ] || fail "no sample grid"

echo "mpi: resume from step 6 reaches the same step-12 weights"
mkdir -p "$work/again/checkpoints"
cp "$work/run/checkpoints/step_000000006.ckpt" "$work/again/checkpoints/"
echo step_000000006.ckpt > "$work/again/checkpoints/latest"
mpirun "$worker" --config "$work/tiny.yaml" --run-dir "$work/again" --resume > "$work/resume.log" 2>&1 ||
  fail "resume failed"
grep -q "resumed from .*step_000000006.ckpt at step 6" "$work/resume.log" || fail "did not resume"
cmp -s "$work/run/ema_weights.pt" "$work/again/ema_weights.pt" ||
  fail "resumed EMA weights differ from the uninterrupted run's"

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
echo "mpi: ended $(($(date +%s) - start)) s after start"
echo "mpi: PASS"
