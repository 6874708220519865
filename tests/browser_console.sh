#!/usr/bin/env bash
# The console in a real browser (headless Chromium over WebDriver, tests/browser_console.py),
# over a real service on loopback: a coordinator, a 2-rank worker group under mpirun, and a run
# with checkpoints, sample grids and an in-training FID evaluation (random Inception weights in
# the standard layout, from tests/reference/fid_ref.py). Takes 1280x800 screenshots of the runs
# page and the run page into SCREENSHOT_DIR.
# usage: browser_console.sh MPIEXEC DDPM_COORDINATOR DDPM_WORKER DDPMCTL PYTHON SOURCE_DIR SCREENSHOT_DIR
# Skips (77), saying why, without chromium, chromedriver, or PYTHON's selenium, torch and
# torchvision, or where the name localhost does not resolve.
set -euo pipefail
mpiexec=$1 coordinator=$2 worker=$3 ctl=$4 python=$5 src=$6 shots=$7
name=browser-console
for tool in chromium chromedriver; do
  command -v "$tool" > /dev/null ||
    { echo "$name: SKIPPED: $tool is not installed (Debian: chromium, chromium-driver)"; exit 77; }
done
"$python" -c 'import selenium' 2> /dev/null ||
  { echo "$name: SKIPPED: $python has no selenium (Debian: python3-selenium)"; exit 77; }
# Selenium reaches chromedriver at localhost: a machine with no /etc/hosts (a bare chroot)
# resolves no such name.
"$python" -c 'import socket; socket.getaddrinfo("localhost", 80)' 2> /dev/null ||
  { echo "$name: SKIPPED: the name localhost does not resolve (no /etc/hosts?); Selenium reaches chromedriver by it"; exit 77; }
"$python" -c 'import torch, torchvision, numpy' 2> /dev/null ||
  { echo "$name: SKIPPED: $python lacks torch or torchvision, which write the test's Inception weights"; exit 77; }
# shellcheck source=tests/service_lib.sh
source "$(dirname "$0")/service_lib.sh"

"$python" "$src/tests/reference/fid_ref.py" network "$work" > "$work/reference.log" 2>&1 ||
  fail "fid_ref.py network"
"$python" "$src/tests/reference/fid_ref.py" gaussian-stats "$work/ref.npz" >> "$work/reference.log" 2>&1 ||
  fail "fid_ref.py gaussian-stats"
# 160 steps, a row every 5, a checkpoint, a sample grid and an evaluation every 40.
sed -e 's/steps: 30,/steps: 160,/' -e 's/log_every: 10,/log_every: 5,/' \
  -e 's/checkpoint_every: 20,/checkpoint_every: 40, sample_every: 40,/' "$work/tiny.yaml" > "$work/run.yaml"
cat >> "$work/run.yaml" <<YAML
eval: {every: 40, num_samples: 20, batch_size: 10, sampler: ddim, steps: 4,
       inception_weights: $work/inception.pt, reference_stats: $work/ref.npz,
       metrics: [fid, is, kid, prd], select: fid}
YAML

start_coordinator
console=$(cat "$data/console_address")
start_group group.log
say "coordinator at $address, console at $console; a 2-rank group"
OMP_NUM_THREADS=1 "$python" "$src/tests/browser_console.py" --console "$console" \
  --ctl "$ctl" --address "$address" --data "$data" --config "$work/run.yaml" \
  --endless "$work/endless.yaml" --screenshots "$shots" --work "$work" ||
  fail "the browser checks (above)"
say "PASS"
