#!/usr/bin/env bash
# Compiles (syntax only) every translation unit that includes LibTorch against LibTorch 2.x's
# CUDA headers, with DDPM_HAS_CUDA and DDPM_WITH_NCCL defined: the code paths that Debian's
# LibTorch 1.13 (CPU) never builds, and the 2.x API. The headers come from Debian's
# libtorch-cuda-dev (trixie, contrib), unpacked into .libtorch2/ (git-ignored); CUDA's from
# /usr/local/cuda. Needs build/compile_commands.json (scripts/build.sh). Exits 77 when the
# headers cannot be fetched, 1 when a file does not compile. A unit that compiled before,
# byte for byte after preprocessing, is not compiled again (the cache below).
# usage: scripts/check-libtorch2.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${1:-${DDPM_BUILD_DIR:-build}}
cache=.libtorch2
cuda_include=${CUDA_HOME:-/usr/local/cuda}/include
if [ ! -f "$cuda_include/cuda_runtime.h" ]; then
  echo "check-libtorch2: skipped: no CUDA toolkit headers at $cuda_include" >&2
  exit 77
fi
if [ ! -f "$cache/usr/include/ATen/cuda/CUDAGraph.h" ]; then
  mkdir -p "$cache"
  # The archive this machine's apt uses (scripts/debian-mirror.sh; DDPM_DEBIAN_MIRROR overrides).
  if ! mirror=$(scripts/debian-mirror.sh); then
    echo "check-libtorch2: skipped: no Debian archive to fetch libtorch-cuda-dev from" >&2
    exit 77
  fi
  if ! curl -fsS --max-time 120 "$mirror/dists/trixie/contrib/binary-amd64/Packages.xz" \
       -o "$cache/Packages.xz"; then
    echo "check-libtorch2: skipped: cannot fetch trixie's package list from $mirror" >&2
    exit 77
  fi
  xz -dc "$cache/Packages.xz" > "$cache/Packages"
  deb=$(awk '/^Package: libtorch-cuda-dev$/ {found = 1} found && /^Filename:/ {print $2; exit}' \
        "$cache/Packages")
  if [ -z "$deb" ] || ! curl -fsS --max-time 300 "$mirror/$deb" -o "$cache/headers.deb"; then
    echo "check-libtorch2: skipped: cannot fetch libtorch-cuda-dev from $mirror" >&2
    exit 77
  fi
  dpkg-deb -x "$cache/headers.deb" "$cache"
fi
include=$PWD/$cache/usr/include
version=$(grep -E "define TORCH_VERSION_(MAJOR|MINOR)" \
          "$include/torch/csrc/api/include/torch/version.h" | awk '{printf "%s.", $3}')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
commands=$work/commands
# Each torch-using compile command, with 2.x's headers first, the CUDA defines, no PCH, and
# -fsyntax-only; the NCCL communicator (built only against a CUDA LibTorch) from the MPI communicator's.
/usr/bin/python3 - "$build_dir/compile_commands.json" "$include" "$cuda_include" "$PWD" \
  > "$commands" <<'PY'
import json, re, shlex, sys
entries, include, cuda, root = sys.argv[1:5]
seen = {}
for e in json.load(open(entries)):
    command = e["command"]
    if "torch/csrc/api/include" not in command or e["file"] in seen:
        continue
    command = re.sub(r" -o \S+", "", command)
    command = re.sub(r" -include \S+", "", command)
    command = re.sub(r"\S*ccache\S* ", "", command)
    command = re.sub(r"^.*? (\S*(c\+\+|g\+\+|clang\+\+)) ", r"\1 ", command)
    command = command.replace("-isystem /usr/include/torch/csrc/api/include",
                              f"-isystem {include}/torch/csrc/api/include -isystem {include}")
    command = command.replace(" -c ", f" -fsyntax-only -DDDPM_HAS_CUDA -DDDPM_WITH_NCCL -I{cuda} ")
    seen[e["file"]] = command
mpi = root + "/comm/mpi_communicator.cc"
if mpi in seen:
    nccl = root + "/comm/nccl_communicator.cc"
    seen[nccl] = seen[mpi].replace(mpi, nccl)
for name, command in seen.items():
    print(shlex.quote(name) + "\t" + command)
PY
echo "check-libtorch2: $(wc -l < "$commands") translation units against LibTorch ${version%.} (CUDA headers)"
# Results are remembered, as ccache remembers objects: a unit whose command and preprocessed
# text are those of one that compiled before (the same bytes to the same compiler) is not
# compiled again. The key is the SHA-256 of the compiler's version, the command and the
# preprocessed unit, with this checkout's path replaced so that every clone shares the cache.
# Only successes are remembered. DDPM_LIBTORCH2_CACHE=off compiles every unit.
export RESULTS=${DDPM_LIBTORCH2_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ddpm-libtorch2}
export WORK=$work ROOT=$PWD BUILD_DIR=$build_dir
cat > "$work/job" <<'JOB'
# One translation unit: job N (its command in $WORK/N.cmd).
set -uo pipefail
n=$1
cd "$BUILD_DIR" || exit 1
command=$(cat "$WORK/$n.cmd")
key=
if [ "$RESULTS" != off ] && eval "${command/ -fsyntax-only / -E -P }" > "$WORK/$n.i" 2> /dev/null; then
  key=$( { "${command%% *}" --version; printf '%s\n' "$command"; cat "$WORK/$n.i"; } |
        sed "s|$ROOT|@ROOT@|g" | sha256sum | cut -c1-64)
  rm -f "$WORK/$n.i"
  if [ -e "$RESULTS/$key" ]; then touch "$WORK/$n.cached"; exit 0; fi
fi
eval "$command" || exit 1
if [ -n "$key" ]; then mkdir -p "$RESULTS" && touch "$RESULTS/$key"; fi
JOB
# One job per translation unit, as many at a time as there are cores.
n=0
while IFS=$'\t' read -r file command; do
  printf '%s\n' "$file" > "$work/$n.name"
  printf '%s\n' "$command" > "$work/$n.cmd"
  n=$((n + 1))
done < "$commands"
seq 0 $((n - 1)) | xargs -P "$(nproc)" -I{} sh -c \
  'bash "$WORK/job" {} > "$WORK/{}.log" 2>&1 || touch "$WORK/{}.failed"'
failed=0
for ((i = 0; i < n; i++)); do
  if [ -e "$work/$i.failed" ]; then
    echo "FAILED: $(cat "$work/$i.name")"
    grep -E "error" -A3 "$work/$i.log" | head -20
    failed=1
  fi
done
cached=$(find "$work" -name '*.cached' | wc -l)
[ "$failed" = 0 ] &&
  echo "check-libtorch2: all $n compile ($cached unchanged since they last compiled, remembered in $RESULTS)"
exit $failed
