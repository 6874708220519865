#!/usr/bin/env bash
# End to end: ddpm_worker trains the main-job config for a few hundred steps, writes a grid, a
# checkpoint and EMA weights; refuses to overwrite; resumes; stops on SIGINT with a checkpoint;
# ddpm_sample draws from a checkpoint and from exported weights.
# usage: e2e_train.sh DDPM_WORKER DDPM_SAMPLE DDPM_EXPORT SOURCE_DIR
set -euo pipefail
worker=$1 sample=$2 export_tool=$3 src=$4
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "e2e: FAIL: $*"; exit 1; }
config=$src/configs/shapes.yaml
# Smaller batches and grids than the demo, the same model; one thread per test process.
export DDPM_TRAIN_BATCH_SIZE=8 DDPM_TRAIN_LOG_EVERY=50 DDPM_TRAIN_SAMPLE_EVERY=0
export DDPM_TRAIN_CHECKPOINT_EVERY=100 DDPM_SAMPLE_NUM_IMAGES=4 DDPM_SAMPLE_SAMPLER=ddim
export DDPM_SAMPLE_STEPS=5
export DDPM_TRAIN_THREADS=1

echo "e2e: 200 steps"
DDPM_TRAIN_STEPS=200 "$worker" --config "$config" --run-dir "$work/run" > "$work/first.log"
[ -f "$work/run/samples/step_000000200.png" ] || fail "no sample grid"
[ -f "$work/run/checkpoints/step_000000200/COMMITTED" ] || fail "no final checkpoint"
[ -f "$work/run/checkpoints/step_000000100/manifest.json" ] || fail "no periodic checkpoint"
[ -f "$work/run/checkpoints/step_000000100/shard-00000-of-00001" ] || fail "no shard"
grep -qx "step_000000200" "$work/run/checkpoints/latest" || fail "latest does not name step 200"
grep -q "training resumed after .*writing in the background" "$work/first.log" ||
  fail "no background checkpoint report"
[ -f "$work/run/ema_weights.pt" ] || fail "no EMA weights"
first=$(grep "^step 50/" "$work/first.log" | sed -E 's/.*loss ([0-9.]+).*/\1/')
last=$(grep "^step 200/" "$work/first.log" | sed -E 's/.*loss ([0-9.]+).*/\1/')
awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < 0.5 * a) }' || fail "loss did not fall: $first -> $last"

echo "e2e: a second run into the same directory is refused"
if DDPM_TRAIN_STEPS=300 "$worker" --config "$config" --run-dir "$work/run" > "$work/refused.log" 2>&1; then
  fail "overwrote a run"
fi
grep -q "pass --resume" "$work/refused.log" || fail "unclear refusal: $(cat "$work/refused.log")"

echo "e2e: resume to 250"
DDPM_TRAIN_STEPS=250 "$worker" --config "$config" --run-dir "$work/run" --resume > "$work/resume.log"
grep -q "resumed from .*step_000000200 at step 200" "$work/resume.log" || fail "did not resume"
[ -f "$work/run/checkpoints/step_000000250/COMMITTED" ] || fail "no checkpoint after resume"

echo "e2e: SIGINT saves a checkpoint"
DDPM_TRAIN_STEPS=100000 DDPM_TRAIN_LOG_EVERY=5 DDPM_TRAIN_CHECKPOINT_EVERY=0 \
  "$worker" --config "$config" --run-dir "$work/sig" > "$work/sig.log" 2>&1 &
pid=$!
for _ in $(seq 600); do
  [ "$(wc -l < "$work/sig/metrics.csv" 2> /dev/null || echo 0)" -ge 3 ] && break
  sleep 0.1
done
kill -INT "$pid"
rc=0
wait "$pid" || rc=$?
[ "$rc" -eq 130 ] || fail "exit code $rc after SIGINT, expected 130: $(tail -3 "$work/sig.log")"
grep -q "caught SIGINT" "$work/sig.log" || fail "no SIGINT message"
ls "$work/sig/checkpoints/"step_*/COMMITTED > /dev/null || fail "no checkpoint after SIGINT"

echo "e2e: ddpm_sample from the checkpoint, the run directory and exported weights"
"$sample" --checkpoint "$work/run/checkpoints/step_000000250" --num 6 --batch 4 \
  --sampler ddim --steps 5 --seed 3 --out "$work/grid.png" > /dev/null
[ -s "$work/grid.png" ] || fail "no grid from the checkpoint"
"$sample" --checkpoint "$work/run" --num 3 --sampler ddim \
  --steps 5 --out "$work/each/" > /dev/null
[ "$(ls "$work/each" | wc -l)" -eq 3 ] || fail "expected 3 PNGs in a directory"
"$sample" --weights "$work/run/ema_weights.pt" --config "$config" --num 2 --sampler ddim \
  --steps 5 --out "$work/w.png" > /dev/null
[ -s "$work/w.png" ] || fail "no grid from the weights"
"$export_tool" --checkpoint "$work/run/checkpoints" --out "$work/exported.pt" > /dev/null
[ -s "$work/exported.yaml" ] || fail "no config beside the exported weights"
"$sample" --weights "$work/exported.pt" --num 2 --sampler ddim --steps 5 --out "$work/e.png" > /dev/null
[ -s "$work/e.png" ] || fail "no grid from the exported weights"
if "$sample" --checkpoint "$work/run/config.yaml" --out "$work/x.png" > "$work/bad.log" 2>&1; then
  fail "read a YAML file as a checkpoint"
fi
grep -q "config.yaml: no such checkpoint" "$work/bad.log" || fail "unclear error: $(cat "$work/bad.log")"

# The bound in bits/dim of the trained model on held-out shapes: a stratified estimate from 10
# of the 1000 timesteps, its CSV (10 terms and the prior) and its plot.
nll=$(dirname "$sample")/ddpm_nll
"$nll" --checkpoint "$work/run" --data shapes:8 --timesteps 10 --batch 8 --out "$work/nll" \
  > "$work/nll.log"
grep -qE "^bits/dim [0-9]+\.[0-9]+ \+- " "$work/nll.log" || fail "no bits/dim: $(cat "$work/nll.log")"
grep -q "unbiased stratified estimate from 10 of 1000 timesteps" "$work/nll.log" ||
  fail "the estimate is not named as one"
[ "$(wc -l < "$work/nll/nll_terms.csv")" -eq 12 ] || fail "nll_terms.csv: not a header and 11 rows"
[ -s "$work/nll/nll_terms.png" ] || fail "no plot of the bound"
# A class-conditional run of the shapes (0 circle, 1 square, 2 triangle): the mapping is printed
# and written, the grid has a row per class, and ddpm_sample draws chosen classes with guidance;
# a class the model lacks and a guidance that is not a number are refused by name.
DDPM_TRAIN_STEPS=20 DDPM_MODEL_NUM_CLASSES=3 DDPM_SAMPLE_NUM_IMAGES=6 "$worker" --config "$config" \
  --run-dir "$work/conditional" > "$work/conditional.log" || fail "conditional training failed"
grep -q "ddpm: 3 classes: 0 circle, 1 square, 2 triangle; label dropout 0.10" "$work/conditional.log" ||
  fail "no class mapping: $(grep classes "$work/conditional.log")"
[ "$(cat "$work/conditional/classes.txt")" = "$(printf '0 circle\n1 square\n2 triangle')" ] ||
  fail "classes.txt: $(cat "$work/conditional/classes.txt")"
python3 - "$work/conditional/samples/step_000000020.png" <<'PY' || fail "the grid is not a row per class"
import struct, sys
png = open(sys.argv[1], "rb").read()
width, height = struct.unpack(">II", png[16:24])
# 16x16 shapes enlarged 4x to 64 pixels, 2 pixels of border: 2 columns and 3 rows.
assert (width, height) == (2 + 2 * 66, 2 + 3 * 66), (width, height)
PY
"$sample" --checkpoint "$work/conditional" --class 0,2 --guidance 3 --num 4 --out "$work/guided/" \
  > "$work/guided.log" || fail "ddpm_sample --class --guidance: $(cat "$work/guided.log")"
[ "$(find "$work/guided" -name '*.png' | wc -l)" = 4 ] || fail "guided samples missing"
# A conditional model's sample archive carries each image's class as arr_1 (int64).
"$sample" --checkpoint "$work/conditional" --class all --num 6 --out "$work/classes.npz" \
  > "$work/archive.log" || fail "ddpm_sample --out .npz: $(cat "$work/archive.log")"
/usr/bin/python3 -c "
import numpy as np
z = np.load('$work/classes.npz')
assert z['arr_0'].shape == (6, 32, 32, 3) and z['arr_0'].dtype == np.uint8, z['arr_0'].shape
assert z['arr_1'].dtype == np.int64 and z['arr_1'].tolist() == [0, 0, 1, 1, 2, 2], z['arr_1']" ||
  fail "the archive's labels"
if "$sample" --checkpoint "$work/conditional" --class 5 --num 2 --out "$work/bad/" > "$work/bad.log" 2>&1; then
  fail "sampled class 5 of a 3-class model"
fi
grep -q "sample.classes.*5 is not a class of this model, whose classes are 0..2" "$work/bad.log" ||
  fail "unclear: $(cat "$work/bad.log")"
if "$sample" --checkpoint "$work/conditional" --guidance nan --num 2 --out "$work/bad/" > "$work/bad.log" 2>&1; then
  fail "sampled with guidance nan"
fi
grep -q "sample.guidance" "$work/bad.log" || fail "unclear: $(cat "$work/bad.log")"
if "$sample" --checkpoint "$work/run" --class 1 --num 2 --out "$work/bad/" > "$work/bad.log" 2>&1; then
  fail "sampled a class from an unconditional model"
fi
grep -q "whose classes are none (model.num_classes 0)" "$work/bad.log" || fail "unclear: $(cat "$work/bad.log")"

echo "e2e: all passed"
