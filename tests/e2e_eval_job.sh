#!/usr/bin/env bash
# Evaluation jobs in the service (ddpmctl eval), with the real binaries on loopback and random
# Inception weights in the standard layout (tests/reference/fid_ref.py):
#   1. a class-conditional run trains to completion with checkpoints at steps 10, 20 and 30;
#   2. bad requests are refused naming the culprit, and store nothing;
#   3. `ddpmctl eval RUN --checkpoint all` runs on a 2-rank group; the group is SIGKILLed while
#      the second checkpoint is half sampled; the coordinator declares it lost and re-queues
#      the job, a new group resumes it from the samples and results already saved;
#   4. the results (class-balanced, guidance 2), per checkpoint, equal `ddpm_fid checkpoint` of
#      each checkpoint with the same protocol (so the resumed checkpoint equals an uninterrupted evaluation), and are in
#      ddpmctl get, sweep.csv, sweep.png and the coordinator's /metrics; KID too (--metrics
#      kid), and best.txt names the checkpoint with the lowest FID; each checkpoint has a
#      memorization report against the run's own training set (--memorization run).
# usage: e2e_eval_job.sh MPIEXEC DDPM_COORDINATOR DDPM_WORKER DDPMCTL DDPM_FID PYTHON SOURCE_DIR
# Exits 77 (skipped) when PYTHON lacks torch, torchvision or numpy.
set -euo pipefail
mpiexec=$1 coordinator=$2 worker=$3 ctl=$4 fid=$5 python=$6 src=$7
name=e2e-eval-job
if ! "$python" -c 'import torch, torchvision, numpy' 2> /dev/null; then
  echo "$name: SKIPPED: $python lacks torch, torchvision or numpy (Debian: python3-torchvision)," \
    "which write the test's Inception weights"
  exit 77
fi
# shellcheck source=tests/service_lib.sh
source "$(dirname "$0")/service_lib.sh"
heartbeat_timeout=4

"$python" "$src/tests/reference/fid_ref.py" network "$work" > "$work/reference.log" 2>&1 ||
  fail "fid_ref.py network"
"$python" "$src/tests/reference/fid_ref.py" gaussian-stats "$work/ref.npz"
start_coordinator
start_group group1.log

say "1. a class-conditional run trains with checkpoints at steps 10, 20 and 30"
# A short EMA, so that 30 steps leave the EMA model's classes (and guidance) visible in samples.
sed -e 's/checkpoint_every: 20/checkpoint_every: 10, keep_checkpoints: 5/' \
  -e 's/^train: {steps: 30,/train: {steps: 30, ema_decay: 0.5,/' \
  -e 's/^model: {ch: 16,/model: {num_classes: 3, ch: 16,/' "$work/tiny.yaml" > "$work/run.yaml"
ctl start "$work/run.yaml" --name trained --watch > "$work/train_watch.log" || fail "training failed"
run=trained-1
[ "$(field "$run" 'r["latest_checkpoint"]["step"]')" = 30 ] || fail "no checkpoint at 30: $(ctl get "$run")"
run_dir=$(field "$run" 'r["run_dir"]')
ctl get "$run" > "$work/get_run.txt"
grep -qE "^  classes +3 \(names in $run_dir/classes.txt\), label dropout 0.1, sample guidance 1$" \
  "$work/get_run.txt" || fail "ddpmctl get shows no classes: $(cat "$work/get_run.txt")"
grep -qE "^  post-hoc ema +off \(train.phema_snapshot_every 0\)$" "$work/get_run.txt" ||
  fail "ddpmctl get shows no post-hoc EMA row: $(cat "$work/get_run.txt")"

say "2. bad requests are refused naming the culprit"
refused() {  # EXPECTED-TEXT ARGS...: ddpmctl eval ARGS must fail saying EXPECTED-TEXT
  local expected=$1
  shift
  if ctl eval "$@" > "$work/refused.log" 2>&1; then fail "ddpmctl eval $* was accepted"; fi
  grep -qF -- "$expected" "$work/refused.log" || fail "ddpmctl eval $*: $(cat "$work/refused.log")"
}
files=(--ref "$work/ref.npz" --inception "$work/inception.pt")
refused "no run 'nosuch'" nosuch "${files[@]}"
refused "checkpoints 'sometimes'" "$run" --checkpoint sometimes "${files[@]}"
refused "checkpoints 25 of run $run: no such checkpoint (it has 10, 20, 30)" "$run" --checkpoint 25 "${files[@]}"
refused "checkpoints every:7 of run $run: no such checkpoint" "$run" --checkpoint every:7 "${files[@]}"
refused "eval.num_samples: must be >= 10" "$run" --num 0 "${files[@]}"
refused "eval.sampler" "$run" --sampler euler "${files[@]}"
refused "eval.metrics: 'lpips' is not one of: fid, is, kid, prd" "$run" --metrics kid,lpips "${files[@]}"
refused "memorization_train (ddpmctl eval --memorization) 'imagenet:/x' is not cifar10:PATH" "$run" \
  --memorization imagenet:/x "${files[@]}"
printf 'eval: {reference_stats: /x.npz}\n' > "$work/bad_protocol.yaml"
refused "bad_protocol.yaml: eval.reference_stats: a protocol sets" "$run" --protocol "$work/bad_protocol.yaml" "${files[@]}"
refused "eval.reference_stats (ddpmctl eval --ref): empty" "$run" --inception "$work/inception.pt"
[ "$(ctl list --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["runs"]))')" = 1 ] ||
  fail "a refused request stored a job: $(ctl list)"

say "3. an evaluation job of every checkpoint; its group is killed mid-way and a new one resumes it"
# The protocol as a file, as configs/eval/*.yaml (both tools read it).
cat > "$work/protocol.yaml" <<'YAML'
eval: {num_samples: 24, sampler: ddim, steps: 4, batch_size: 2, is_logits: unbiased, guidance: 2}
YAML
protocol=(--protocol "$work/protocol.yaml" --metrics kid)
job=$(ctl eval "$run" --checkpoint all "${protocol[@]}" "${files[@]}" --memorization run --json |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
[ "$job" = trained-eval-2 ] || fail "job id $job"
job_dir=$(field "$job" 'r["run_dir"]')
wait_for 120 "the first checkpoint's result" test -s "$job_dir/sweep.csv"
half_sampled() { [ "$(find "$job_dir/step_000000020" -name '*.png' 2> /dev/null | wc -l)" -ge 8 ]; }
wait_for 120 "samples of the second checkpoint" half_sampled
kill -KILL "$group_pid"
wait "$group_pid" 2> /dev/null || true
group_pid=""
saved=$(find "$job_dir/step_000000020" -name '*.png' | wc -l)
[ "$saved" -lt 24 ] || fail "the second checkpoint was done before the kill ($saved samples)"
say "killed the group with $saved of 24 samples of step 20 saved"
wait_for 30 "the job re-queued" state_is "$job" QUEUED
start_group group2.log
wait_for 300 "$job COMPLETED" state_is "$job" COMPLETED
[ "$(field "$job" 'r["restarts"]')" = 1 ] || fail "restarts: $(ctl get "$job")"
grep -q "checkpoints 10, 20, 30 (3; 1 done before)" "$work/group2.log" ||
  fail "the second attempt did not take up the first's results"
grep -qE "step 20: FID [0-9.]+, IS [0-9.]+ \+- [0-9.]+ \(24 samples, [1-9][0-9]* read back by rank 0" \
  "$work/group2.log" || fail "the second attempt drew the saved samples again"
[ ! -d "$job_dir/step_000000020" ] || fail "the samples of a recorded checkpoint were kept"

say "4. each result equals ddpm_fid checkpoint of that checkpoint with the same protocol"
ctl get "$job" > "$work/get.txt"
ctl get "$job" --json > "$work/get.json"
curl -fsS "$(cat "$data/metrics_address")" > "$work/metrics.prom" || fail "cannot scrape /metrics"
for step in 10 20 30; do
  OMP_NUM_THREADS=1 "$fid" checkpoint --checkpoint "$run_dir/checkpoints/step_0000000$step" \
    --ref "$work/ref.npz" --inception "$work/inception.pt" "${protocol[@]}" \
    > "$work/fid$step.log" 2>&1 || fail "ddpm_fid checkpoint of step $step"
done
"$python" - "$work" "$job_dir" "$run" "$job" <<'PY' || fail "results (above)"
import csv, json, re, struct, sys
work, job_dir, run, job = sys.argv[1:]
r = json.load(open(f"{work}/get.json"))
results = r["evaluation"]["results"]
rows = list(csv.DictReader(open(f"{job_dir}/sweep.csv")))
prom = open(f"{work}/metrics.prom").read()
get = open(f"{work}/get.txt").read()
assert [int(x["step"]) for x in results] == [10, 20, 30], results
assert [int(x["step"]) for x in rows] == [10, 20, 30], rows
for result, row in zip(results, rows):
    step = int(row["step"])
    alone = open(f"{work}/fid{step}.log").read()
    fid = float(re.search(r"^FID (\S+)", alone, re.M).group(1))
    score, spread = map(float, re.search(r"^IS (\S+) \+- (\S+)", alone, re.M).groups())
    # ddpm_fid prints 4 decimals; the job's numbers are those of the same moments.
    assert abs(float(row["fid"]) - fid) <= 5e-5, (step, row["fid"], fid)
    assert abs(float(row["inception_score"]) - score) <= 5e-5, (step, row, score)
    assert abs(float(row["inception_score_std"]) - spread) <= 5e-5, (step, row, spread)
    kid, kid_std = map(float, re.search(r"^KID (\S+) \+- (\S+) \(100 subsets of 24\)$", alone, re.M).groups())
    assert abs(float(row["kid"]) - kid) <= 6e-7 and abs(float(row["kid_std"]) - kid_std) <= 6e-7, (step, row, kid)
    assert abs(result["kid"] - float(row["kid"])) <= 1e-12 * max(1, abs(result["kid"])), (result, row)
    assert row["precision"] == "", row  # not asked for
    assert abs(result["fid"] - float(row["fid"])) <= 1e-9 * max(1, abs(result["fid"])), (result, row)
    assert row["num_samples"] == "24" and row["sampler"] == "ddim" and row["sampling_steps"] == "4", row
    assert row["is_logits"] == "unbiased", row
    line = [l for l in prom.splitlines() if l.startswith("ddpm_eval_checkpoint_fid{") and f'step="{step}"' in l]
    assert len(line) == 1 and f'run="{run}"' in line[0] and f'job="{job}"' in line[0], line
    assert abs(float(line[0].split()[-1]) - result["fid"]) <= 1e-9 * max(1, result["fid"]), line
    assert any(l.startswith("ddpm_eval_checkpoint_inception_score{") and f'step="{step}"' in l
               for l in prom.splitlines()), "no IS series for step %d" % step
    assert result["guidance"] == 2, result
    assert re.search(r"^\s+%d\s+%.4f\s+%.4f \+- %.4f\s+%s \+- %.6f\s+24  ddim 4 steps, unbiased logits, guidance 2$" % (
        step, result["fid"], result["inception_score"], result["inception_score_std"],
        re.escape("%.6f" % result["kid"]), result["kid_std"]), get, re.M), get
    assert any(l.startswith("ddpm_eval_checkpoint_kid{") and f'step="{step}"' in l
               for l in prom.splitlines()), "no KID series for step %d" % step
best = min(rows, key=lambda row: float(row["fid"]))
text = open(f"{job_dir}/best.txt").read().splitlines()
assert text[0] == "step " + best["step"] and text[1] == "fid " + best["fid"], (text, best)
assert text[2].startswith("checkpoint ") and text[2].endswith("/checkpoints/step_%09d" % int(best["step"])), text
assert r["best"]["step"] == best["step"] and r["best"]["metric"] == "fid", r["best"]
assert re.search(r"^  best\s+fid \S+ at step %s \(.*/checkpoints/step_%09d\)$" % (best["step"], int(best["step"])), get, re.M), get
# The memorization report of each checkpoint: 24 samples against the run's 64 shapes, in pixel and
# feature space, its share in the results.
assert re.search(r"^  memorization\s+against run:.*/%s \(memorization/step_\*/ in the run dir\)$" % run, get, re.M), get
for result in results:
    out = "%s/memorization/step_%09d" % (job_dir, int(result["step"]))
    rows = list(csv.DictReader(open(out + "/neighbours.csv")))
    assert len(rows) == 24 and all(0 <= int(x["pixel_nearest"]) < 64 and 0 <= int(x["feature_nearest"]) < 64 for x in rows), out
    flagged = sum(float(x["pixel_ratio"]) < 1 / 3 for x in rows) / 24
    assert abs(result["memorized_pixel"] - flagged) <= 1e-12 if "memorized_pixel" in result else flagged == 0, (result, flagged)
    assert "feature space: " in open(out + "/summary.txt").read(), out
    assert open(out + "/closest_pairs.png", "rb").read()[:8] == b"\x89PNG\r\n\x1a\n", out
png = open(f"{job_dir}/sweep.png", "rb").read()
assert png[:8] == b"\x89PNG\r\n\x1a\n", "sweep.png is not a PNG"
width, height = struct.unpack(">II", png[16:24])
assert (width, height) == (720, 584), (width, height)
assert r["total_steps"] == "72" and r["kind"] == "EVALUATION", (r["total_steps"], r["kind"])
print("FID per checkpoint:", [(x["step"], round(x["fid"], 4)) for x in results])
PY
grep -q "evaluates .*checkpoints all of run $run" "$work/get.txt" || fail "get: $(cat "$work/get.txt")"
[ "$(field "$job" '" ".join(t["to"] for t in r["transitions"])')" = \
  "QUEUED STARTING RUNNING FAILED QUEUED STARTING RUNNING COMPLETED" ] ||
  fail "transitions: $(ctl get "$job")"

say "5. ddpm_fid checkpoint over a list of guidance scales: one row per scale, w = 2 the job's"
OMP_NUM_THREADS=1 "$fid" checkpoint --checkpoint "$run_dir/checkpoints/step_000000030" \
  --ref "$work/ref.npz" --inception "$work/inception.pt" "${protocol[@]}" --guidance 4,0,2 \
  --out "$work/guidance" > "$work/guidance.log" 2>&1 || fail "ddpm_fid --guidance 4,0,2: $(cat "$work/guidance.log")"
"$python" - "$work" <<'PY' || fail "guidance sweep (above)"
import csv, re, struct, sys
work = sys.argv[1]
rows = list(csv.DictReader(open(f"{work}/guidance.csv")))
assert [float(r["guidance"]) for r in rows] == [0, 2, 4], rows
alone = open(f"{work}/fid30.log").read()
fid = float(re.search(r"^FID (\S+)", alone, re.M).group(1))
assert abs(float(rows[1]["fid"]) - fid) <= 5e-5, (rows[1]["fid"], fid)
assert len({r["fid"] for r in rows}) == 3, "the scales gave the same FID: %s" % rows
png = open(f"{work}/guidance.png", "rb").read()
assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (720, 584)
print("FID against guidance:", [(r["guidance"], round(float(r["fid"]), 4)) for r in rows])
PY
"$fid" checkpoint --checkpoint "$run_dir/checkpoints/step_000000030" --ref "$work/ref.npz" \
  --guidance 1,nan > "$work/bad-guidance.log" 2>&1 && fail "--guidance 1,nan was accepted"
grep -qF -- "--guidance: 'nan' is not a finite number" "$work/bad-guidance.log" ||
  fail "bad guidance: $(cat "$work/bad-guidance.log")"

say "clean shutdown"
kill -TERM "$group_pid"
wait "$group_pid" || true
kill -TERM "$coordinator_pid"
wait "$coordinator_pid" || fail "the coordinator did not exit cleanly"
say "PASS"
