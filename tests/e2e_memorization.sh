#!/usr/bin/env bash
# The memorization report (ddpm_fid memorization) on models whose answer is known: a tiny
# x0-predicting model (8x8 images, T = 100) trained 1000 steps on 8 shapes without augmentation
# copies them, one trained as long on 5,000 shapes does not, nor does the first model at step
# 100. Yoon et al.'s criterion (nearest / second-nearest < 1/3):
#   1. the memorizing model: at least 80% of its samples flagged in pixel space and in feature
#      space (random Inception weights in the standard layout, tests/reference/fid_ref.py);
#      the PNG of the 16 closest pairs and the CSV of every sample's neighbours are written;
#   2. the search on 3 ranks (mpirun) finds exactly the neighbours it finds on 1;
#   3. the same model at step 100, and the model of 5,000 shapes: under 20% flagged;
#   4. mismatched image sizes are refused by name.
# usage: e2e_memorization.sh MPIEXEC DDPM_WORKER DDPM_SAMPLE DDPM_FID PYTHON SOURCE_DIR
set -euo pipefail
mpiexec=$1 worker=$2 sample=$3 fid=$4 python=$5 src=$6
name=e2e-memorization
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "$name: FAIL: $*"; for f in "$work"/*.log; do echo "--- $f"; tail -15 "$f"; done; exit 1; }
say() { echo "$name: $*"; }

cat > "$work/copy.yaml" <<'YAML'
model: {ch: 16, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [4], image_size: 8,
        norm_groups: 8, dropout: 0.0}
diffusion: {timesteps: 100, objective: x0}
train: {steps: 1000, batch_size: 8, lr: 0.003, warmup_steps: 2, log_every: 500,
        checkpoint_every: 100, keep_checkpoints: 20, threads: 1, device: cpu, ema_decay: 0.99}
data: {shapes_size: 8, random_flip: false}
sample: {sampler: ddpm, steps: 100, num_images: 4}
YAML
sed -e 's/shapes_size: 8,/shapes_size: 5000,/' "$work/copy.yaml" > "$work/many.yaml"
"$worker" --config "$work/copy.yaml" --run-dir "$work/copy" > "$work/train_copy.log" 2>&1 &
copy_pid=$!
"$worker" --config "$work/many.yaml" --run-dir "$work/many" > "$work/train_many.log" 2>&1 ||
  fail "training on 5,000 shapes"
wait "$copy_pid" || fail "training on 8 shapes"
draw() {  # CHECKPOINT DIR: 32 samples, DDPM's 100 steps
  "$sample" --checkpoint "$1" --out "$2/" --num 32 --sampler ddpm --steps 100 > "$work/sample.log" 2>&1 ||
    fail "ddpm_sample $1"
}
flagged() {  # LOG SPACE: the percentage flagged
  sed -nE "s/^$2 space: ([0-9.]+)% of 32 samples have nearest \/ second-nearest < 0.3333 .*/\1/p" "$1"
}
draw "$work/copy" "$work/copy_samples"
draw "$work/copy/checkpoints/step_000000100" "$work/early_samples"
draw "$work/many" "$work/many_samples"

say "1. the model of 8 shapes copies them"
features=()
if "$python" -c 'import torch, torchvision' 2> /dev/null; then
  "$python" "$src/tests/reference/fid_ref.py" network "$work" > "$work/reference.log" 2>&1 ||
    fail "fid_ref.py network"
  features=(--inception "$work/inception.pt")
else
  say "feature space skipped: $python lacks torch or torchvision, which write the test's Inception weights"
fi
search=("$fid" memorization --samples "folder:$work/copy_samples" --train "run:$work/copy"
        --image-size 8 --block 3 "${features[@]}")
"${search[@]}" --out "$work/report1" > "$work/copy.log" 2>&1 || fail "ddpm_fid memorization"
pixel=$(flagged "$work/copy.log" pixel)
awk -v p="$pixel" 'BEGIN { exit !(p >= 80) }' || fail "only $pixel% of the copies flagged in pixel space"
if [ ${#features[@]} -gt 0 ]; then
  feature=$(flagged "$work/copy.log" feature)
  awk -v p="$feature" 'BEGIN { exit !(p >= 80) }' || fail "only $feature% flagged in feature space"
fi
grep -q "^pixel space: nearest distance quantiles: 0% [0-9.e-]*, 1% .*, 50% .*, 100% " "$work/copy.log" ||
  fail "no distance distribution"
"$python" - "$work/report1" "${#features[@]}" <<'PY' || fail "report files (above)"
import csv, struct, sys
out, with_features = sys.argv[1], sys.argv[2] != "0"
rows = list(csv.DictReader(open(out + "/neighbours.csv")))
assert len(rows) == 32, len(rows)
spaces = ["pixel"] + (["feature"] if with_features else [])
for row in rows:
    for s in spaces:
        d1, d2 = float(row[s + "_nearest_distance"]), float(row[s + "_second_distance"])
        assert 0 <= d1 <= d2 and 0 <= int(row[s + "_nearest"]) < 8, row
        assert row[s + "_nearest"] != row[s + "_second"], row
        assert abs(float(row[s + "_ratio"]) - (d1 / d2 if d2 > 0 else 0)) <= 1e-6, row
png = open(out + "/closest_pairs.png", "rb").read()
assert png[:8] == b"\x89PNG\r\n\x1a\n"
width, height = struct.unpack(">II", png[16:24])
# 16 pairs, 8 images a row, enlarged 8 times with 2-pixel borders: 8 x 66 + 2 by 4 x 66 + 2.
assert (width, height) == (530, 266), (width, height)
PY
pixel_ranks=$pixel

say "2. 3 ranks find the neighbours 1 rank finds"
OMP_NUM_THREADS=1 "$mpiexec" -np 3 --oversubscribe -x OMP_NUM_THREADS "${search[@]}" \
  --out "$work/report3" > "$work/copy3.log" 2>&1 || fail "ddpm_fid memorization on 3 ranks"
# The same neighbours; pixel distances to the bit; feature distances to the rounding of the
# samples' features, which each rank extracts in batches of its own share.
"$python" - "$work/report1/neighbours.csv" "$work/report3/neighbours.csv" <<'PY' ||
import csv, sys
one, three = [list(csv.DictReader(open(p))) for p in sys.argv[1:]]
assert len(one) == len(three) == 32
for a, b in zip(one, three):
    for key in a:
        if key.endswith(("_nearest", "_second")) or key.startswith("pixel_"):
            assert a[key] == b[key], (key, a, b)
        else:
            assert abs(float(a[key]) - float(b[key])) <= 1e-5 * max(1, abs(float(a[key]))), (key, a, b)
PY
  fail "3 ranks found other neighbours (above)"
grep -q "on 3 rank(s)" "$work/copy3.log" || fail "not on 3 ranks"

say "3. the same model at step 100, and a model of 5,000 shapes, copy nothing"
"$fid" memorization --samples "folder:$work/early_samples" --train "run:$work/copy" --image-size 8 \
  --out "$work/report_early" > "$work/early.log" 2>&1 || fail "memorization of step 100"
"$fid" memorization --samples "folder:$work/many_samples" --train "run:$work/many" --image-size 8 \
  --out "$work/report_many" > "$work/many.log" 2>&1 || fail "memorization of 5,000 shapes"
early=$(flagged "$work/early.log" pixel) many=$(flagged "$work/many.log" pixel)
awk -v a="$early" -v b="$many" 'BEGIN { exit !(a < 20 && b < 20) }' ||
  fail "flagged: step 100 $early%, 5,000 shapes $many%"
grep -q "against 5000 training images (shapes: 5000 procedural images" "$work/many.log" ||
  fail "not searched against the 5,000 shapes: $(head -1 "$work/many.log")"

say "4. images of another size are refused by name"
if "$fid" memorization --samples "folder:$work/copy_samples" --train "run:$work/copy" \
  --image-size 16 --out "$work/bad" > "$work/bad.log" 2>&1; then
  fail "16x16 samples searched among 8x8 training images"
fi
grep -q "differ in size or channels; pixel distances need the same: 3x16 vs 3x8" "$work/bad.log" ||
  fail "unclear: $(cat "$work/bad.log")"
say "flagged: $pixel_ranks% of the copies, $early% at step 100, $many% of the 5,000-shape model"
say "PASS"
