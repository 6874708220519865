# shellcheck shell=bash
# Sourced by the benchmarks that need a trained model's weights (bench/nll.sh, bench/sample.sh).
# one_step_run BUILD_DIR CONFIG RUN_DIR: trains CONFIG for one step on the CPU into RUN_DIR, with
# the final sample grid as cheap as it gets; the checkpoint's EMA weights are what the
# benchmark loads (their values do not change what a forward pass costs).
one_step_run() {
  DDPM_TRAIN_STEPS=1 DDPM_TRAIN_DEVICE=cpu DDPM_SAMPLE_NUM_IMAGES=1 DDPM_SAMPLE_SAMPLER=ddim \
    DDPM_SAMPLE_STEPS=1 "$1/worker/ddpm_worker" --config "$2" --run-dir "$3" --progress off \
    > "$3.log" 2>&1
}
