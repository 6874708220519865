#!/usr/bin/env bash
# Alternating rounds of ddpm_bench under different settings (environment overrides such as
# DDPM_TRAIN_CHANNELS_LAST=true, or another binary), then each key's mean per variant and its
# ratio to the first variant (below 1: faster or smaller than the first).
# usage: bench/variants.sh CONFIG BATCH STEPS ROUNDS VARIANT...
#   VARIANT: space-separated VAR=value settings, "-" for none, or bin=PATH for another
#   ddpm_bench (for instance an older build, for a before/after).
set -euo pipefail
cd "$(dirname "$0")/.."
config=$1 batch=$2 steps=$3 rounds=$4
shift 4
threads=${DDPM_BENCH_THREADS:-$(nproc)}
build_dir=${DDPM_BUILD_DIR:-build}
python=${DDPM_REFERENCE_PYTHON:-/usr/bin/python3}
bash scripts/build.sh > /dev/null
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for round in $(seq "$rounds"); do
  for i in $(seq 0 $(($# - 1))); do
    variant=${*:$((i + 1)):1}
    bin=$build_dir/bench/ddpm_bench
    settings=()
    for word in $variant; do
      case $word in
        -) ;;
        bin=*) bin=${word#bin=} ;;
        *) settings+=("$word") ;;
      esac
    done
    line=$(env "${settings[@]}" "$bin" --config "$config" --batch "$batch" --steps "$steps" \
             --threads "$threads" --sample-batch "$batch")
    echo "round $round variant $i [$variant]: $line" | tee -a "$log"
  done
done
"$python" - "$log" "$@" <<'PY'
import re, statistics, sys
rows = [(int(m.group(1)), dict(re.findall(r"(\w+)=(\S+)", line)))
        for line in open(sys.argv[1]) for m in [re.search(r"variant (\d+)", line)]]
names = sys.argv[2:]
keys = ["train_ms_median", "fwd_bwd_ms_median", "update_ms_median", "ddpm_step_ms",
        "ddim_step_ms", "peak_rss_mb"]
def mean(v, key):
    values = [float(r[key]) for i, r in rows if i == v and key in r]
    return statistics.mean(values) if values else float("nan")
print("means over rounds, and the ratio to variant 0 [" + names[0] + "]:")
for key in keys:
    base = mean(0, key)
    cells = [f"{mean(v, key):9.2f} ({mean(v, key) / base:.3f})" for v in range(len(names))]
    print(f"  {key:18s} " + "  ".join(cells))
PY
