#!/usr/bin/env bash
# A run keeps its best checkpoint (eval.select) and stops on eval.patience, with the scores
# planted (DDPM_FAULT_EVAL_SCORES) so that the answer is known: nll every step, scores 5, 3, 4,
# 6 at steps 1-4, keep_checkpoints 1:
#   1. `best` names step 2 through the pruning of every other old checkpoint; with patience 2
#      the run stops after the 4th evaluation, saying why; ddpm_sample, ddpm_export accept
#      RUN/best and get step 2's EMA weights;
#   2. kill -9 of the run between the evaluation of step 2 and the move of `best` leaves a
#      `best` (step 1) that loads; the resumed run moves it to step 2 from eval.csv, keeps its
#      score and stops after the 4th evaluation as before;
#   3. the bad configs are refused by name before anything runs.
# usage: e2e_best.sh DDPM_WORKER DDPM_SAMPLE DDPM_EXPORT SOURCE_DIR
set -euo pipefail
worker=$1 sample=$2 export_tool=$3 src=$4
name=e2e-best
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "$name: FAIL: $*"; for f in "$work"/*.log; do echo "--- $f"; tail -20 "$f"; done; exit 1; }
say() { echo "$name: $*"; }

sed -e 's/steps: 30,/steps: 8,/' -e 's/checkpoint_every: 20,/checkpoint_every: 1, keep_checkpoints: 1,/' \
  "$src/tests/tiny.yaml" > "$work/run.yaml"
cat >> "$work/run.yaml" <<YAML
eval: {nll_every: 1, nll_images: 4, nll_timesteps: 2, batch_size: 4, select: nll, patience: 2}
YAML
export DDPM_FAULT_EVAL_SCORES=1:5,2:3,3:4,4:6,5:1,6:1

say "1. best through pruning; patience 2 stops after the 4th evaluation"
"$worker" --config "$work/run.yaml" --run-dir "$work/run" > "$work/first.log" 2>&1 ||
  fail "the run failed"
checkpoints=$work/run/checkpoints
[ "$(head -1 "$checkpoints/best")" = step_000000002 ] || fail "best: $(cat "$checkpoints/best")"
[ "$(sed -n 2p "$checkpoints/best")" = "nll 3" ] || fail "best's score: $(cat "$checkpoints/best")"
[ "$(cat "$checkpoints/latest")" = step_000000004 ] || fail "latest: $(cat "$checkpoints/latest")"
# keep 1: only the newest and the best are left.
[ "$(cd "$checkpoints" && echo step_*)" = "step_000000002 step_000000004" ] ||
  fail "checkpoints left: $(ls "$checkpoints")"
grep -q "^ddpm: stopped early by eval.patience: 2 evaluations in a row did not improve on the best nll (best nll 3 at step 2)$" \
  "$work/first.log" || fail "no early stop line"
grep -q "trained to step 4 " "$work/first.log" || fail "it did not end at step 4"
[ -f "$work/run/ema_weights.pt" ] || fail "a run stopped by patience ends as a completed one"
rows=$(tail -n +2 "$work/run/eval.csv" | wc -l)
[ "$rows" = 4 ] || fail "eval.csv has $rows rows, not 4"

"$sample" --checkpoint "$work/run/best" --out "$work/best.png" --num 2 --sampler ddim --steps 2 \
  > "$work/sample.log" 2>&1 || fail "ddpm_sample RUN/best"
grep -q "step_000000002" "$work/sample.log" || fail "ddpm_sample did not load step 2"
"$export_tool" --checkpoint "$work/run/best" --out "$work/best_ema.pt" > "$work/export.log" 2>&1 ||
  fail "ddpm_export RUN/best"
grep -q "step_000000002" "$work/export.log" || fail "ddpm_export did not load step 2"

say "2. kill -9 between the evaluation of step 2 and the move of best"
set +e
DDPM_FAULT_KILL_BEFORE_BEST=2 "$worker" --config "$work/run.yaml" --run-dir "$work/killed" \
  > "$work/killed.log" 2>&1
code=$?
set -e
[ "$code" = 137 ] || fail "the killed run exited $code, not 137 (SIGKILL)"
checkpoints=$work/killed/checkpoints
[ "$(head -1 "$checkpoints/best")" = step_000000001 ] || fail "best after the kill: $(cat "$checkpoints/best")"
"$sample" --checkpoint "$work/killed/best" --out "$work/killed.png" --num 2 --sampler ddim \
  --steps 2 > "$work/killed-sample.log" 2>&1 || fail "the best left by the kill does not load"
"$worker" --config "$work/run.yaml" --run-dir "$work/killed" --resume > "$work/resumed.log" 2>&1 ||
  fail "the resumed run failed"
grep -q "eval.select: step 2's nll 3 (eval.csv) is the best; .*/best moved to it" \
  "$work/resumed.log" || fail "the resumed run did not move best from eval.csv"
[ "$(cat "$checkpoints/best")" = "$(printf 'step_000000002\nnll 3')" ] ||
  fail "best after the resume: $(cat "$checkpoints/best")"
grep -q "^ddpm: stopped early by eval.patience" "$work/resumed.log" || fail "no early stop"
grep -q "trained to step 4 " "$work/resumed.log" || fail "the resumed run did not end at step 4"

say "3. bad configs are refused by name before anything runs"
refused() {
  local expected=$1
  shift
  if "$worker" --config "$work/bad.yaml" --run-dir "$work/bad" > "$work/bad.log" 2>&1; then
    fail "accepted: $(cat "$work/bad.yaml")"
  fi
  grep -qF "$expected" "$work/bad.log" || fail "wanted '$expected'"
  [ ! -e "$work/bad" ] || fail "a refused config left $work/bad"
}
sed -e 's/select: nll, patience: 2/patience: 2/' "$work/run.yaml" > "$work/bad.yaml"
refused "eval.patience: waits for the best of a score, so it needs eval.select"
sed -e 's/select: nll, patience: 2/metrics: [fid, kid, lpips]/' "$work/run.yaml" > "$work/bad.yaml"
refused "eval.metrics: 'lpips' is not one of: fid, is, kid, prd"
say "PASS"
