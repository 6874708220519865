#!/usr/bin/env bash
# Runs a C++ benchmark and its Python peer in alternating rounds (this machine is noisy: ratios
# measured side by side mean more than any one time), prints every round, then the means over
# rounds of each key and the C++/PyTorch ratio (below 1: C++ is faster or smaller).
# Each command prints one line of key=value pairs with impl=cpp or impl=pytorch.
# usage: alternate.sh ROUNDS "KEY..." CPP_COMMAND... -- PYTHON_COMMAND...
set -euo pipefail
rounds=$1 keys=$2
shift 2
cpp=()
while [ "$1" != "--" ]; do cpp+=("$1"); shift; done
shift
python_command=("$@")
python=${DDPM_REFERENCE_PYTHON:-/usr/bin/python3}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for round in $(seq "$rounds"); do
  echo "round $round: $("${cpp[@]}")" | tee -a "$log"
  echo "round $round: $("${python_command[@]}")" | tee -a "$log"
done
"$python" - "$log" $keys <<'PY'
import re, statistics, sys
rows = [dict(re.findall(r"(\w+)=(\S+)", line)) for line in open(sys.argv[1])]
def mean(impl, key):
    return statistics.mean(float(r[key]) for r in rows if r["impl"] == impl)
print("means over rounds (C++ / PyTorch):")
for key in sys.argv[2:]:
    cpp, py = mean("cpp", key), mean("pytorch", key)
    print(f"  {key:18s} {cpp:9.2f} / {py:9.2f}   ratio C++/PyTorch {cpp / py:.3f}")
PY
