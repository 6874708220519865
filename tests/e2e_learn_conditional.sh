#!/usr/bin/env bash
# A class-conditional model learns its classes: a small UNet trained 3000 steps on `shapes`
# (0 circle, 1 square, 2 triangle) with label dropout, then 60 samples with `--class all`
# (20 per row) and classifier-free guidance 3, judged by tests/reference/shape_kind.py, a
# classifier that knows nothing of the model (checked first on 600 shapes it draws itself). At
# least 0.55 of the samples must be the kind asked for, where chance is 1/3 (P(>= 33 of 60 |
# p = 1/3) is about 2e-4), and every row must beat chance.
# usage: e2e_learn_conditional.sh DDPM_WORKER DDPM_SAMPLE PYTHON SOURCE_DIR
set -euo pipefail
worker=$1 sample=$2 python=$3 src=$4
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "learn: FAIL: $*"; tail -n 5 "$work"/*.log; exit 1; }
"$python" "$src/tests/reference/shape_kind.py" check || fail "the classifier itself"
cat > "$work/conditional.yaml" <<'YAML'
model: {ch: 32, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [], image_size: 16,
        norm_groups: 8, dropout: 0.0, num_classes: 3}
train: {steps: 3000, batch_size: 32, lr: 0.002, warmup_steps: 100, ema_decay: 0.995,
        log_every: 500, checkpoint_every: 0, threads: 1, device: cpu, label_dropout: 0.1}
data: {shapes_size: 5000}
sample: {sampler: ddim, steps: 50, num_images: 30, guidance: 3}
YAML
"$worker" --config "$work/conditional.yaml" --run-dir "$work/run" --progress off > "$work/train.log" 2>&1 ||
  fail "training"
echo "learn: trained: $(grep -o 'trained to step.*' "$work/train.log")"
"$sample" --checkpoint "$work/run" --class all --guidance 3 --num 60 --batch 60 \
  --out "$work/samples/" > "$work/sample.log" 2>&1 || fail "ddpm_sample: $(cat "$work/sample.log")"
"$python" "$src/tests/reference/shape_kind.py" judge "$work/samples" 3 0.55 ||
  fail "the samples are not the kinds asked for"
echo "learn: PASS"
