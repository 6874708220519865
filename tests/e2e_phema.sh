#!/usr/bin/env bash
# Post-hoc EMA end to end: a run keeps power-function profiles and snapshots them; one killed
# with SIGKILL twice and resumed ends with the very snapshots of one that ran straight (the
# reconstructions of both are byte-identical files); ddpm_phema's weights load in torch.load and
# ddpm_sample; bad requests are refused by name.
# usage: e2e_phema.sh DDPM_WORKER DDPM_PHEMA DDPM_SAMPLE DDPM_FID PYTHON SOURCE_DIR
set -euo pipefail
worker=$1 phema=$2 sample=$3 fid=$4 python=$5 src=$6
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say() { echo "phema: $*"; }
fail() { echo "phema: FAIL: $*"; tail -n 5 "$work"/*.log; exit 1; }
steps_in() { find "$1" -maxdepth 1 -name 'step_*' ! -name '*.tmp' -printf '%f\n' | sort; }
cat > "$work/tiny.yaml" <<'YAML'
model: {ch: 16, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [], image_size: 16,
        norm_groups: 8, dropout: 0.1}
diffusion: {timesteps: 100}
train: {steps: 60, batch_size: 4, lr: 0.001, warmup_steps: 5, log_every: 10, checkpoint_every: 10,
        keep_checkpoints: 1, phema_snapshot_every: 5, phema_sigma_rels: [0.05, 0.1], threads: 1,
        device: cpu, seed: 4}
data: {shapes_size: 64}
sample: {sampler: ddim, steps: 5, num_images: 4}
YAML

say "1. a run straight through"
"$worker" --config "$work/tiny.yaml" --run-dir "$work/straight" > "$work/straight.log" 2>&1 ||
  fail "the straight run failed"
snapshots=$(steps_in "$work/straight/phema" | wc -l)
[ "$snapshots" = 12 ] || fail "expected 12 snapshots (every 5 steps of 60), found $snapshots"
# keep_checkpoints: 1 prunes checkpoints, never snapshots.
[ "$(steps_in "$work/straight/checkpoints" | wc -l)" = 1 ] ||
  fail "keep_checkpoints 1 should leave one checkpoint"

say "2. the same run killed with SIGKILL twice after snapshots beyond its last checkpoint, resumed"
resume=()
for wait_for in step_000000025 step_000000045; do
  "$worker" --config "$work/tiny.yaml" --run-dir "$work/cut" "${resume[@]}" > "$work/cut-$wait_for.log" 2>&1 &
  pid=$!
  for _ in $(seq 1200); do
    [ -e "$work/cut/phema/$wait_for/COMMITTED" ] && break
    kill -0 "$pid" 2> /dev/null || fail "the run ended before $wait_for: $(tail -3 "$work/cut-$wait_for.log")"
    sleep 0.02
  done
  kill -KILL "$pid"
  wait "$pid" 2> /dev/null || true
  say "killed after snapshot $wait_for; checkpoint $(cat "$work/cut/checkpoints/latest")"
  resume=(--resume)
done
"$worker" --config "$work/tiny.yaml" --run-dir "$work/cut" --resume > "$work/cut-last.log" 2>&1 ||
  fail "the resumed run failed"
grep -q "resumed from" "$work/cut-last.log" || fail "the last run did not resume"
diff <(steps_in "$work/straight/phema") <(steps_in "$work/cut/phema") ||
  fail "the resumed run's snapshots are not the straight run's steps"

say "3. reconstructions from both runs are the same bytes"
for run in straight cut; do
  "$phema" --run "$work/$run" --sigma-rel 0.05,0.07,0.1 --out "$work/$run-ema" > "$work/phema-$run.log" 2>&1 ||
    fail "ddpm_phema on $run failed: $(cat "$work/phema-$run.log")"
done
grep -q "sigma_rel 0.07 at step 60 from 12 snapshot(s) of 2 profile(s) (sigma_rel 0.05, 0.1): fit error" \
  "$work/phema-straight.log" || fail "no fit error printed: $(cat "$work/phema-straight.log")"
for s in 0.05 0.07 0.1; do
  cmp "$work/straight-ema/sigma_rel_$s.pt" "$work/cut-ema/sigma_rel_$s.pt" ||
    fail "sigma_rel $s differs between the straight and the killed-and-resumed run"
done

say "4. the weights load in torch.load and in ddpm_sample"
"$python" - "$work/straight-ema/sigma_rel_0.07.pt" "$work/straight/ema_weights.pt" <<'PY' || fail "torch.load"
import sys, torch
ours, classic = torch.load(sys.argv[1]), torch.load(sys.argv[2])
assert sorted(ours) == sorted(classic), "different names"
assert all(ours[k].shape == classic[k].shape and ours[k].dtype == torch.float32 for k in ours)
print("torch.load: %d tensors, the names and shapes of ema_weights.pt" % len(ours))
PY
"$sample" --weights "$work/straight-ema/sigma_rel_0.07.pt" --num 4 --out "$work/grid.png" > "$work/sample.log" 2>&1 ||
  fail "ddpm_sample --weights: $(cat "$work/sample.log")"
[ -s "$work/grid.png" ] || fail "no grid"

say "5. a sweep: FID and IS of each sigma_rel, each that of ddpm_fid on its weights"
"$python" "$src/tests/reference/fid_ref.py" network "$work" > "$work/reference.log" 2>&1 ||
  fail "fid_ref.py network"
"$python" "$src/tests/reference/fid_ref.py" gaussian-stats "$work/ref.npz"
protocol=(--ref "$work/ref.npz" --inception "$work/inception.pt" --num 12 --sampler ddim --steps 3
  --batch 6)
OMP_NUM_THREADS=1 "$phema" --run "$work/straight" --sigma-rel 0.1,0.05,0.07 --out "$work/sweep" \
  --evaluate yes "${protocol[@]}" --device cpu > "$work/sweep.log" 2>&1 ||
  fail "ddpm_phema --evaluate yes: $(cat "$work/sweep.log")"
OMP_NUM_THREADS=1 "$fid" checkpoint --weights "$work/sweep/sigma_rel_0.07.pt" "${protocol[@]}" \
  --device cpu > "$work/fid.log" 2>&1 || fail "ddpm_fid --weights: $(cat "$work/fid.log")"
"$python" - "$work" <<'PY' || fail "the sweep (above)"
import csv, re, struct, sys
work = sys.argv[1]
rows = list(csv.DictReader(open(f"{work}/sweep/phema_sweep.csv")))
assert [float(r["sigma_rel"]) for r in rows] == [0.05, 0.07, 0.1], rows
assert all(r["num_samples"] == "12" and r["sampler"] == "ddim" for r in rows), rows
alone = open(f"{work}/fid.log").read()
fid = float(re.search(r"^FID (\S+)", alone, re.M).group(1))
score = float(re.search(r"^IS (\S+)", alone, re.M).group(1))
assert abs(float(rows[1]["fid"]) - fid) <= 5e-5, (rows[1]["fid"], fid)
assert abs(float(rows[1]["inception_score"]) - score) <= 5e-5, (rows[1], score)
png = open(f"{work}/sweep/phema_sweep.png", "rb").read()
assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (720, 584)
print("FID against sigma_rel:", [(r["sigma_rel"], round(float(r["fid"]), 4)) for r in rows])
PY

say "6. bad requests, each refused by name"
expect() {  # expect CODE TEXT -- COMMAND...
  local code=$1 text=$2; shift 3
  set +e; "$@" > "$work/bad.log" 2>&1; local rc=$?; set -e
  [ "$rc" = "$code" ] || fail "exit $rc (wanted $code) from $*: $(cat "$work/bad.log")"
  grep -qF -- "$text" "$work/bad.log" || fail "'$text' not in: $(cat "$work/bad.log")"
}
expect 2 "--sigma-rel expects a comma-separated list of numbers, got 'abc'" -- \
  "$phema" --run "$work/straight" --sigma-rel abc
expect 2 "--sigma-rel: 'inf' is not a finite number" -- "$phema" --run "$work/straight" --sigma-rel inf
expect 1 "--sigma-rel 0.4 is outside (0, 0.300283]" -- "$phema" --run "$work/straight" --sigma-rel 0.4
expect 1 "--sigma-rel 0.003 cannot be reconstructed at step 60 from the 12 snapshot(s)" -- \
  "$phema" --run "$work/straight" --sigma-rel 0.003 --out "$work/never.pt"
[ ! -e "$work/never.pt" ] || fail "a refused reconstruction wrote its file"
mkdir "$work/empty"
expect 1 "holds no post-hoc EMA snapshots" -- "$phema" --run "$work/empty" --sigma-rel 0.07
expect 1 "keeps post-hoc EMA profiles of sigma_rel [0.05, 0.1], this config asks for [0.05, 0.2]" -- \
  env DDPM_TRAIN_PHEMA_SIGMA_RELS="[0.05, 0.2]" DDPM_TRAIN_STEPS=70 \
  "$worker" --config "$work/tiny.yaml" --run-dir "$work/straight" --resume
say "PASS"
