#!/usr/bin/env bash
# ddpm_sample across ranks: image i draws from (seed, i) alone, so 1, 2 and 3 ranks and two
# batch sizes write byte-identical files; a job killed with kill -9 mid-way and resumed with
# --resume ends with exactly the files of an uninterrupted one; bad input is refused by name.
# A .npz sample archive (the OpenAI evaluator's arr_0) holds those images.
# usage: mpi_sample.sh MPIEXEC DDPM_WORKER DDPM_SAMPLE SOURCE_DIR
set -euo pipefail
mpiexec=$1 worker=$2 sample=$3 src=$4
name=mpi-sample
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "$name: FAIL: $*"; for f in "$work"/*.log; do echo "--- $f"; tail -20 "$f"; done; exit 1; }
say() { echo "$name: $*"; }
ranks() { local n=$1; shift; timeout 300 "$mpiexec" -np "$n" --oversubscribe "$@"; }

# A model to sample from: tests/tiny.yaml, 4 steps.
DDPM_TRAIN_STEPS=4 "$worker" --config "$src/tests/tiny.yaml" --run-dir "$work/run" \
  --progress off > "$work/train.log" 2>&1 || fail "training"
# 10 images: DDIM with eta 1 (so that every step draws noise), 4 steps.
args=(--checkpoint "$work/run" --num 10 --sampler ddim --steps 4 --eta 1 --seed 7)

say "1 rank (batch 4), 2 ranks (batch 3), 3 ranks (batch 4 and batch 1): the same files"
"$sample" "${args[@]}" --batch 4 --out "$work/one/" > "$work/one.log" 2>&1 || fail "1 rank"
ranks 2 "$sample" "${args[@]}" --batch 3 --out "$work/two/" > "$work/two.log" 2>&1 || fail "2 ranks"
ranks 3 "$sample" "${args[@]}" --batch 4 --out "$work/three/" > "$work/three.log" 2>&1 ||
  fail "3 ranks"
ranks 3 "$sample" "${args[@]}" --batch 1 --out "$work/three1/" > "$work/three1.log" 2>&1 ||
  fail "3 ranks, batch 1"
[ "$(ls "$work/one" | wc -l)" = 10 ] || fail "1 rank wrote $(ls "$work/one" | wc -l) files"
for other in two three three1; do
  diff -r "$work/one" "$work/$other" > /dev/null || fail "$other differs from one rank"
done
grep -q "ddpm_sample: 10 images (ddim 4 steps) on 3 rank(s)" "$work/three.log" ||
  fail "no job banner"
grep -qE "ddpm_sample: [0-9]+/10 images \(all ranks\), [0-9.]+ images/s, elapsed .*, eta " \
  "$work/three.log" || fail "no progress line"
[ "$(grep -c "ddpm_sample: 10 images in" "$work/three.log")" = 1 ] ||
  fail "not exactly one rank reports the end"
# Distinct images: the streams differ per image.
[ "$(md5sum "$work"/one/*.png | cut -d' ' -f1 | sort -u | wc -l)" = 10 ] ||
  fail "some images are identical"

say "a sample archive from 2 ranks: numpy reads the 1-rank job's pixels, and the checksum holds"
ranks 2 "$sample" "${args[@]}" --batch 3 --out "$work/s.npz" > "$work/npz.log" 2>&1 || fail "npz"
grep -q "wrote $work/s.npz: arr_0 uint8 10 x 16 x 16 x 3, sha256 " "$work/npz.log" ||
  fail "no archive line"
(cd "$work" && sha256sum -c s.npz.sha256 > /dev/null) || fail "the archive's checksum"
/usr/bin/python3 - "$work" <<'PY' || fail "numpy disagrees with the PNG files"
import sys
import numpy as np
from PIL import Image
work = sys.argv[1]
arr = np.load(work + "/s.npz")["arr_0"]
assert arr.dtype == np.uint8 and arr.shape == (10, 16, 16, 3), (arr.dtype, arr.shape)
for i in range(10):
    png = np.asarray(Image.open(f"{work}/one/{i:06d}.png").convert("RGB"))
    assert np.array_equal(arr[i], png), i
PY

say "a 2-rank job killed with kill -9 mid-way, resumed: exactly the uninterrupted files"
long=(--checkpoint "$work/run" --num 24 --sampler ddpm --steps 200 --seed 3 --batch 2)
ranks 2 "$sample" "${long[@]}" --out "$work/whole/" > "$work/whole.log" 2>&1 || fail "whole job"
ranks 2 "$sample" "${long[@]}" --out "$work/cut/" > "$work/cut.log" 2>&1 &
job=$!
for _ in $(seq 600); do
  [ "$(find "$work/cut" -name '*.png' 2> /dev/null | wc -l)" -ge 6 ] && break
  sleep 0.1
done
pkill -9 -f -- "--out $work/cut/" || true
wait "$job" 2> /dev/null || true
kept=$(find "$work/cut" -name '*.png' | wc -l)
[ "$kept" -ge 6 ] && [ "$kept" -lt 24 ] || fail "killed with $kept of 24 images written"
ranks 2 "$sample" "${long[@]}" --out "$work/cut/" --resume > "$work/resume.log" 2>&1 ||
  fail "resume"
grep -q "24 images (ddpm 200 steps) on 2 rank(s) into $work/cut/, $kept already there" \
  "$work/resume.log" || fail "the resume does not say what it kept"
diff -r "$work/whole" "$work/cut" > /dev/null || fail "the resumed job's files differ"
say "killed at $kept of 24 images; the resumed job's 24 files equal the uninterrupted job's"

say "bad input is refused by name"
if ranks 2 "$sample" "${args[@]}" --out "$work/grid.png" > "$work/grid.log" 2>&1; then
  fail "2 ranks drew a grid"
fi
grep -q "under mpirun give a directory" "$work/grid.log" || fail "unclear: $(tail -2 "$work/grid.log")"
if "$sample" --checkpoint "$work/nowhere" --out "$work/x/" > "$work/missing.log" 2>&1; then
  fail "sampled from a missing checkpoint"
fi
grep -q "nowhere" "$work/missing.log" || fail "unclear: $(tail -2 "$work/missing.log")"
if "$sample" "${args[@]}" --num 0 --out "$work/x/" > "$work/num.log" 2>&1; then
  fail "sampled 0 images"
fi
grep -q "sample.num_images" "$work/num.log" || fail "unclear: $(tail -2 "$work/num.log")"
if "$sample" "${args[@]}" --sampler heunn --out "$work/x/" > "$work/sampler.log" 2>&1; then
  fail "an unknown sampler"
fi
grep -q "'heunn' is not one of" "$work/sampler.log" || fail "unclear: $(tail -2 "$work/sampler.log")"
say "PASS"
