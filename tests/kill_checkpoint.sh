#!/usr/bin/env bash
# SIGKILL at random moments of a run that checkpoints every step in the background: after each
# kill the run resumes from a valid checkpoint and goes on. 12 kills.
# usage: kill_checkpoint.sh DDPM_WORKER DDPM_EXPORT
set -euo pipefail
worker=$1 export_tool=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "kill: FAIL: $*"; tail -5 "$work"/*.log; exit 1; }
cat > "$work/tiny.yaml" <<'YAML'
model: {ch: 32, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [], image_size: 16,
        norm_groups: 8, dropout: 0.1}
train: {steps: 100000, batch_size: 4, log_every: 1000, checkpoint_every: 1, keep_checkpoints: 2,
        threads: 1, device: cpu}
data: {shapes_size: 64}
YAML
RANDOM=7  # the same kill moments on every run of the test
resumed_from=()
for kill in $(seq 12); do
  resume=()
  [ "$kill" -gt 1 ] && resume=(--resume)
  "$worker" --config "$work/tiny.yaml" --run-dir "$work/run" "${resume[@]}" > "$work/run$kill.log" 2>&1 &
  pid=$!
  # Wait for this run's first new checkpoint, then kill at a random moment 0-400 ms later.
  before=$(cat "$work/run/checkpoints/latest" 2> /dev/null || echo none)
  for _ in $(seq 600); do
    now=$(cat "$work/run/checkpoints/latest" 2> /dev/null || echo none)
    [ "$now" != "$before" ] && break
    kill -0 "$pid" 2> /dev/null || fail "run $kill died: $(tail -3 "$work/run$kill.log")"
    sleep 0.05
  done
  sleep "0.$(printf '%03d' $((RANDOM % 400)))"
  kill -KILL "$pid"
  wait "$pid" 2> /dev/null || true
  # What a restart would load must verify.
  "$export_tool" --checkpoint "$work/run" --out "$work/check.pt" > "$work/export$kill.log" 2>&1 ||
    fail "after kill $kill no valid checkpoint loads: $(cat "$work/export$kill.log")"
  resumed_from+=("$(grep -o 'step_[0-9]*' "$work/export$kill.log" | head -1)")
  if ls -d "$work/run/checkpoints/"*.tmp > /dev/null 2>&1; then
    echo "kill $kill: interrupted a checkpoint write ($(ls -d "$work/run/checkpoints/"*.tmp | xargs -n1 basename))"
  fi
done
grep -q "resumed from" "$work/run12.log" || fail "the last run did not resume"
echo "kill: 12 kills; loadable checkpoints after each: ${resumed_from[*]}"
echo "kill: PASS"
