#!/usr/bin/env bash
# FID and IS end to end, with random Inception weights in the standard file's layout (written by
# tests/reference/fid_ref.py on torchvision):
#   1. a 2-rank run evaluates every 10 steps: eval.csv and the log hold FID, IS, the protocol
#      and the weights' SHA-256; an evaluation is not counted as training time; at step 20 the
#      bound in bits/dim on held-out shapes too (eval.nll_every), equal to ddpm_nll's on the
#      step-20 checkpoint;
#   2. ddpm_sample writes PNGs, `ddpm_fid stats` makes their .npz (numpy reads mu and sigma),
#      and `ddpm_fid score` of the same folder against it is FID 0;
#   3. a missing weights file fails the run at start, saying where to get it;
#   4. `ddpm_fid checkpoint` streams a checkpoint's samples into the network on 1 and 2 ranks
#      and gets the FID, IS, KID and PRD of the same samples written as files and scored.
# The run and the tools measure KID and PRD too (eval.metrics); `ddpm_fid score`'s KID of a set
# against its own features equals tests/reference/feature_metrics_ref.py's NumPy KID, and a
# reference without features is refused by name when KID is asked.
# usage: e2e_eval.sh MPIEXEC DDPM_WORKER DDPM_SAMPLE DDPM_FID PYTHON SOURCE_DIR
# Exits 77 (skipped) when PYTHON lacks torch, torchvision or numpy.
set -euo pipefail
mpiexec=$1 worker=$2 sample=$3 fid=$4 python=$5 src=$6
name=e2e-eval
if ! "$python" -c 'import torch, torchvision, numpy' 2> /dev/null; then
  echo "$name: SKIPPED: $python lacks torch, torchvision or numpy (Debian: python3-torchvision)," \
    "which write the test's Inception weights"
  exit 77
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "$name: FAIL: $*"; for f in "$work"/*.log; do echo "--- $f"; tail -20 "$f"; done; exit 1; }
say() { echo "$name: $*"; }

"$python" "$src/tests/reference/fid_ref.py" network "$work" > "$work/reference.log" 2>&1 ||
  fail "fid_ref.py network"
weights=$work/inception.pt
# Reference statistics of 3000 Gaussian vectors, in numpy's own .npz.
"$python" "$src/tests/reference/fid_ref.py" gaussian-stats "$work/ref.npz"
sed -e 's/steps: 30,/steps: 20,/' "$src/tests/tiny.yaml" > "$work/run.yaml"
cat >> "$work/run.yaml" <<YAML
eval: {every: 10, num_samples: 20, batch_size: 10, sampler: ddim, steps: 4,
       inception_weights: $weights, reference_stats: $work/ref.npz,
       nll_every: 20, nll_images: 6, nll_timesteps: 5, metrics: [fid, is, kid, prd]}
YAML

say "1. a 2-rank run evaluates at steps 10 and 20"
started=$(date +%s.%N)
OMP_NUM_THREADS=1 "$mpiexec" -np 2 --oversubscribe -x OMP_NUM_THREADS "$worker" \
  --config "$work/run.yaml" --run-dir "$work/run" > "$work/train.log" 2>&1 || fail "training failed"
wall=$("$python" -c "print($(date +%s.%N) - $started)")
sha=$(sha256sum "$weights" | cut -d' ' -f1)
"$python" - "$work/run/eval.csv" "$sha" <<'PY' || fail "eval.csv (above)"
import csv, math, sys
rows = list(csv.DictReader(open(sys.argv[1])))
assert [r["step"] for r in rows] == ["10", "20"], rows
for r in rows:
    assert math.isfinite(float(r["fid"])) and float(r["fid"]) > 0, r
    assert 1 <= float(r["inception_score"]) < 1008, r
    assert r["is_logits"] == "unbiased", r
    assert r["num_samples"] == "20" and r["sampler"] == "ddim" and r["sampling_steps"] == "4", r
    assert r["inception_sha256"] == sys.argv[2], (r["inception_sha256"], sys.argv[2])
    assert float(r["eval_seconds"]) > 0, r
    # KID over 100 subsets of all 20 samples (fewer than 1000); PRD against 20 reference rows.
    assert math.isfinite(float(r["kid"])) and float(r["kid_std"]) >= 0, r
    assert r["kid_subset_size"] == "20" and r["prd_reference_count"] == "20", r
    for k in ("precision", "recall", "coverage"):
        assert 0 <= float(r[k]) <= 1, (k, r)
    assert float(r["density"]) >= 0, r
# The bound at step 20 only (eval.nll_every: 20), from 5 of T = 1000 timesteps of 6 images.
assert all(rows[0][k] == "" for k in ("nll_bits_per_dim", "nll_images", "nll_data")), rows[0]
bound = rows[1]
assert math.isfinite(float(bound["nll_bits_per_dim"])) and float(bound["nll_bits_per_dim"]) > 0, bound
assert float(bound["nll_std_error"]) > 0, bound
assert bound["nll_images"] == "6" and bound["nll_timesteps"] == "5", bound
assert bound["nll_data"] == "shapes held-out", bound
PY
grep -q "ddpm: eval at step 20: FID .*(unbiased logits; 20 samples, ddim 4 steps" "$work/train.log" ||
  fail "no eval line"
grep -q "ddpm: eval at step 20: KID -*[0-9.]* +- [0-9.]* (100 subsets of 20)" "$work/train.log" ||
  fail "no KID line"
grep -q "ddpm: eval at step 20: precision [0-9.]*, recall [0-9.]* (k = 3); density [0-9.]*, coverage [0-9.]* (k = 5); 20 samples against 20 reference features" \
  "$work/train.log" || fail "no PRD line"
grep -q "ddpm: eval at step 20: NLL [0-9.]* +- [0-9.]* bits/dim (6 shapes held-out images, a stratified estimate from 5 timesteps" \
  "$work/train.log" || fail "no bound line"
# ddpm_nll on the step-20 checkpoint with the evaluation's settings (eval.seed 1, batches of
# eval.batch_size) measures the same bound.
nll=$(dirname "$sample")/ddpm_nll
OMP_NUM_THREADS=1 "$nll" --checkpoint "$work/run/checkpoints/step_000000020" --data shapes:6 \
  --timesteps 5 --seed 1 --batch 10 --out "$work/nll" > "$work/nll.log" 2>&1 || fail "ddpm_nll"
in_run=$(grep -oE "eval at step 20: NLL [0-9.]+ \+- [0-9.]+" "$work/train.log" | grep -oE "[0-9.]+ \+- [0-9.]+")
alone=$(grep -oE "^bits/dim [0-9.]+ \+- [0-9.]+" "$work/nll.log" | grep -oE "[0-9.]+ \+- [0-9.]+")
if [ -z "$in_run" ] || [ "$in_run" != "$alone" ]; then
  fail "the run's bound '$in_run', ddpm_nll's '$alone'"
fi
say "the bound at step 20: $in_run bits/dim in the run and from ddpm_nll"
# Training time excludes evaluation, checked from the run's own records and no clock bound:
# the training and the two evaluations are disjoint parts of the run's wall time, so the
# elapsed training time that metrics.csv logs at step 20 (after the evaluation of step 10,
# before that of step 20) plus both evaluations' eval_seconds fits in it. Had the evaluation of
# step 10 been counted as training, it would be in there twice.
"$python" - "$work/run/metrics.csv" "$work/run/eval.csv" "$wall" <<'PY' ||
import csv, sys
elapsed = {r["step"]: float(r["elapsed_seconds"]) for r in csv.DictReader(open(sys.argv[1]))}
evals = [float(r["eval_seconds"]) for r in csv.DictReader(open(sys.argv[2]))]
wall = float(sys.argv[3])
total = elapsed["20"] + sum(evals)
print("training %.2f s + evaluations %s s = %.2f s of %.2f s wall" % (elapsed["20"], evals, total, wall))
sys.exit(0 if total <= wall else "the run's training time counts the evaluations")
PY
  fail "the run's time counts the evaluations: $(grep 'trained to' "$work/train.log")"

say "2. ddpm_fid stats and score of sample PNGs: FID of a set against itself is 0"
"$sample" --checkpoint "$work/run" --out "$work/samples/" --num 12 --sampler ddim --steps 4 \
  > "$work/sample.log" 2>&1 || fail "ddpm_sample"
"$fid" stats --data "folder:$work/samples" --out "$work/samples.npz" --inception "$weights" \
  --image-size 16 --batch 5 > "$work/stats.log" 2>&1 || fail "ddpm_fid stats"
grep -q "ddpm_fid stats: 12/12 images" "$work/stats.log" || fail "no progress in ddpm_fid stats"
"$python" -c "
import numpy as np
z = np.load('$work/samples.npz')
assert z['mu'].shape == (2048,) and z['sigma'].shape == (2048, 2048), z.files
assert z['mu'].dtype == np.float64 and np.allclose(z['sigma'], z['sigma'].T)
assert z['features'].shape == (12, 2048) and z['features'].dtype == np.float32
assert np.allclose(z['features'].astype(np.float64).mean(0), z['mu'], rtol=1e-5, atol=1e-6)" ||
  fail "numpy cannot read the statistics as pytorch-fid does, or the features with them"
# KID and PRD of the set against its own features: KID as NumPy computes it from the paper with
# the same subsets (seed 7), PRD of a set against itself all 1.
"$fid" score --samples "folder:$work/samples" --ref "$work/samples.npz" --inception "$weights" \
  --image-size 16 --batch 5 --metrics kid,prd --seed 7 > "$work/score_kid.log" 2>&1 ||
  fail "ddpm_fid score --metrics kid,prd: $(cat "$work/score_kid.log")"
"$python" - "$src/tests/reference" "$work/samples.npz" "$work/score_kid.log" <<'PY' ||
import re, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import feature_metrics_ref
features = np.load(sys.argv[2])["features"]
text = open(sys.argv[3]).read()
mean, std = map(float, re.search(r"^KID (\S+) \+- (\S+) \(100 subsets of 12\)$", text, re.M).groups())
want = feature_metrics_ref.kid({"fake": features, "real": features}, 100, 12, 7)
print("KID %.6f +- %.6f, numpy %.8f +- %.8f" % (mean, std, want["mean"], want["std"]))
assert abs(mean - want["mean"]) <= 6e-7 + 1e-6 * abs(want["mean"]), (mean, want["mean"])
assert abs(std - want["std"]) <= 6e-7 + 1e-6 * abs(want["std"]), (std, want["std"])
assert re.search(r"^precision 1.0000, recall 1.0000 \(k = 3\); density \S+, coverage 1.0000 "
                 r"\(k = 5\); 12 samples against 12 reference features$", text, re.M), text
PY
  fail "KID or PRD of the set against itself (above)"
# A reference with only mu and sigma (pytorch-fid's) serves FID, and is refused by name for KID.
"$python" -c "
import numpy as np
z = np.load('$work/samples.npz')
np.savez('$work/no_features.npz', mu=z['mu'], sigma=z['sigma'])"
"$fid" score --samples "folder:$work/samples" --ref "$work/no_features.npz" --inception "$weights" \
  --image-size 16 --metrics kid > "$work/no_features.log" 2>&1 && fail "KID without reference features"
grep -q "no_features.npz: has no array 'features' (the reference images' Inception pool3 features" \
  "$work/no_features.log" || fail "unclear: $(cat "$work/no_features.log")"
grep -q "ddpm_fid score: [0-9]*/[0-9]* images" "$work/no_features.log" && fail "it read images before refusing"
"$fid" score --samples "folder:$work/samples" --ref "$work/samples.npz" --inception "$weights" \
  --image-size 16 > "$work/score.log" 2>&1 || fail "ddpm_fid score"
"$python" -c "
import re, sys
text = open('$work/score.log').read()
fid = float(re.search(r'^FID (\S+)', text, re.M).group(1))
trace = float(sum(__import__('numpy').load('$work/samples.npz')['sigma'].diagonal()))
sys.exit(0 if abs(fid) <= 1e-6 * trace else 'FID %g of a set against itself' % fid)" ||
  fail "score: $(cat "$work/score.log")"
grep -q "Inception sha256 $sha" "$work/score.log" || fail "score does not record the weights' hash"
# The same samples as a sample archive (npz:, the OpenAI evaluator's format): the same scores.
"$sample" --checkpoint "$work/run" --out "$work/archive.npz" --num 12 --sampler ddim --steps 4 \
  > "$work/sample_npz.log" 2>&1 || fail "ddpm_sample --out .npz"
"$fid" score --samples "npz:$work/archive.npz" --ref "$work/archive.npz.ref.npz" \
  --inception "$weights" > /dev/null 2>&1 && fail "scored against a missing reference"
"$fid" score --samples "npz:$work/archive.npz" --ref "$work/archive.npz" --inception "$weights" \
  > "$work/score_bad.log" 2>&1 && fail "took a sample archive as reference statistics"
grep -q "archive.npz: has no array 'mu'" "$work/score_bad.log" || fail "unclear: $(cat "$work/score_bad.log")"
"$fid" score --samples "npz:$work/archive.npz" --ref "$work/ref.npz" --inception "$weights" \
  > "$work/score_npz.log" 2>&1 || fail "ddpm_fid score npz:"
"$fid" score --samples "folder:$work/samples" --ref "$work/ref.npz" --inception "$weights" \
  --image-size 16 > "$work/score_folder.log" 2>&1 || fail "ddpm_fid score folder:"
[ "$(grep -E '^(FID|IS) ' "$work/score_npz.log")" = "$(grep -E '^(FID|IS) ' "$work/score_folder.log")" ] ||
  fail "npz: $(grep -E '^(FID|IS) ' "$work/score_npz.log"), folder: $(grep -E '^(FID|IS) ' "$work/score_folder.log")"
grep -q "^IS .*(10 splits, unbiased logits)" "$work/score_npz.log" || fail "IS without its logits"


say "3. a missing weights file fails at start and says where to get it"
sed "s#$weights#$work/missing.pth#" "$work/run.yaml" > "$work/missing.yaml"
if OMP_NUM_THREADS=1 "$worker" --config "$work/missing.yaml" --run-dir "$work/run2" > "$work/missing.log" 2>&1; then
  fail "trained without Inception weights"
fi
grep -q "missing.pth: no such Inception weights file; download pt_inception-2015-12-05" \
  "$work/missing.log" || fail "unclear error: $(tail -3 "$work/missing.log")"
[ ! -d "$work/run2/checkpoints" ] || [ -z "$(ls "$work/run2/checkpoints")" ] ||
  fail "a run without weights wrote checkpoints"
say "4. ddpm_fid checkpoint streams samples into the network: the FID of the same samples as files"
stream=("$fid" checkpoint --checkpoint "$work/run" --num 12 --sampler ddim --steps 4 --seed 3
        --ref "$work/ref.npz" --inception "$weights" --metrics kid,prd)
"${stream[@]}" --batch 5 --also-save "$work/kept/" > "$work/stream.log" 2>&1 ||
  fail "ddpm_fid checkpoint"
OMP_NUM_THREADS=1 "$mpiexec" -np 2 --oversubscribe -x OMP_NUM_THREADS "${stream[@]}" --batch 4 \
  > "$work/stream2.log" 2>&1 || fail "ddpm_fid checkpoint on 2 ranks"
"$fid" score --samples "folder:$work/kept" --ref "$work/ref.npz" --inception "$weights" \
  --image-size 16 --metrics kid,prd --seed 3 > "$work/kept.log" 2>&1 ||
  fail "ddpm_fid score of the kept samples"
scores() { grep -E '^(FID|IS|KID|precision) ' "$1"; }
[ "$(scores "$work/stream.log" | wc -l)" = 4 ] || fail "streamed without KID or PRD"
if [ -z "$(scores "$work/stream.log")" ] ||
  [ "$(scores "$work/stream.log")" != "$(scores "$work/kept.log")" ]; then
  fail "streamed: $(scores "$work/stream.log"); as files: $(scores "$work/kept.log")"
fi
[ "$(scores "$work/stream.log")" = "$(scores "$work/stream2.log")" ] ||
  fail "1 rank: $(scores "$work/stream.log"); 2 ranks: $(scores "$work/stream2.log")"
grep -q "samples 12: .*, ddim 4 steps, seed 3, 2 rank(s)" "$work/stream2.log" || fail "no protocol"
grep -q "Inception sha256 $sha" "$work/stream2.log" || fail "no Inception hash"
grep -q "wall time " "$work/stream2.log" || fail "no wall time"
# Sample i draws from (seed, i) in both tools: ddpm_sample writes the very files kept.
"$sample" --checkpoint "$work/run" --out "$work/s3/" --num 12 --sampler ddim --steps 4 --seed 3 \
  > /dev/null 2>&1 || fail "ddpm_sample --seed 3"
diff -r "$work/kept" "$work/s3" > /dev/null || fail "ddpm_sample and ddpm_fid checkpoint drew different samples"
say "streamed on 1 and 2 ranks and scored from files: $(scores "$work/stream.log" | head -1)"
say "PASS"
