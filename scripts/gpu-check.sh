#!/usr/bin/env bash
# The GPU check, run from the repository root on the GPU machine (PyTorch with CUDA, nvcc and
# CMake; no network, no yaml-cpp, GoogleTest, ...). It builds the trainer, the GPU tests and the
# benchmark with DDPM_BUILD_SERVICE=OFF against that PyTorch's LibTorch and the Debian packages
# that scripts/gpu-deps.sh fetched into .gpu-deps beforehand, runs ctest -L gpu, then benchmarks
# the paper's config at batch 128: steps/s, images/s, MFU, peak device memory, and the time to
# draw 256 images with DDPM (1000 steps) and DDIM. Logs go to OUT_DIR (default $OUT, else
# gpu-check-out). Meant to finish within 8 minutes on one H200.
#
# From the development machine, with the device tool:
#   bash scripts/gpu-deps.sh                       # once, here
#   run(command="bash scripts/gpu-check.sh", carry=[".gpu-deps"], timeout_s=540)
#
# Environment: DDPM_GPU_PYTHON (python3), DDPM_TORCH_PREFIX (from torch.utils.cmake_prefix_path),
# DDPM_GPU_DEVICE (cuda), DDPM_PEAK_TFLOPS (790: an H200's dense bf16 matmul rate, as measured),
# DDPM_GPU_CHECK_QUICK=1 (a few small steps: a dry run of the script itself on any machine).
# usage: scripts/gpu-check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-check-out}}
mkdir -p "$out"
start=$SECONDS
say() { echo "gpu-check [$((SECONDS - start))s]: $*"; }
deps=$PWD/.gpu-deps
if ! ls "$deps"/debs/*.deb > /dev/null 2>&1; then
  echo "gpu-check: no packages in $deps/debs: run scripts/gpu-deps.sh on the development" \
       "machine and carry .gpu-deps" >&2
  exit 2
fi

# The packages unpack into a prefix of their own in the build folder, never over the
# machine's / (and not into .gpu-deps, which must stay small enough to carry).
build=${DDPM_GPU_BUILD_DIR:-build-gpu}
mkdir -p "$build"
build=$(cd "$build" && pwd)
root=$build/deps
rm -rf "$root"
mkdir -p "$root"
for deb in "$deps"/debs/*.deb; do
  if command -v dpkg-deb > /dev/null; then
    dpkg-deb -x "$deb" "$root"
  else
    tmp=$(mktemp -d)
    (cd "$tmp" && ar x "$deb" && tar -xf data.tar.* -C "$root")
    rm -rf "$tmp"
  fi
done
lib=$root/usr/lib/x86_64-linux-gnu
say "unpacked $(ls "$deps"/debs/*.deb | wc -l) Debian packages into $root"

python=${DDPM_GPU_PYTHON:-python3}
device=${DDPM_GPU_DEVICE:-cuda}
torch_prefix=${DDPM_TORCH_PREFIX:-$($python -c 'import torch; print(torch.utils.cmake_prefix_path)')}
read -r torch_version cuda_version cxx_standard < <($python - <<'PY'
import torch
major, minor = (int(part) for part in torch.__version__.split(".")[:2])
# LibTorch's headers want C++20 from 2.10 on; C++17 before.
print(torch.__version__, torch.version.cuda, 20 if (major, minor) >= (2, 10) else 17)
PY
)
say "PyTorch $torch_version, CUDA $cuda_version, LibTorch at $torch_prefix, C++$cxx_standard"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
fi

# pip's LibTorch needs the CUDA libraries of the nvidia-* wheels beside it (cuBLAS, cuDNN, ...),
# which its own RUNPATH finds at run time; the linker needs to be shown them.
nvidia_dirs=$($python - <<'PY'
import glob, os, torch
site = os.path.dirname(os.path.dirname(torch.__file__))
dirs = sorted({os.path.dirname(f) for f in glob.glob(os.path.join(site, "nvidia", "**", "lib*.so*"),
                                                     recursive=True)})
print(":".join(dirs + [os.path.join(os.path.dirname(torch.__file__), "lib")]))
PY
)
export LDFLAGS="-Wl,-rpath-link,$nvidia_dirs${LDFLAGS:+ $LDFLAGS}"
[ -x /usr/local/cuda/bin/nvcc ] && export PATH=/usr/local/cuda/bin:$PATH

# The unpacked libraries and headers, for the compiler, the linker and the programs; pip's
# LibTorch is found through its own CMake files and RPATH.
export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LIBRARY_PATH=$lib${LIBRARY_PATH:+:$LIBRARY_PATH}
export CPATH=$root/usr/include${CPATH:+:$CPATH}
generator=()
command -v ninja > /dev/null && generator=(-G Ninja)
set -o pipefail
cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DDDPM_BUILD_SERVICE=OFF \
  -DCMAKE_PREFIX_PATH="$root/usr;$torch_prefix" -DOPENSSL_ROOT_DIR="$root/usr" \
  -DCMAKE_CXX_STANDARD="$cxx_standard" -DDDPM_REFERENCE_PYTHON="$(command -v "$python")" \
  -DTORCH_CUDA_ARCH_LIST=9.0 > "$out/configure.log" 2>&1 ||
  { tail -40 "$out/configure.log"; exit 1; }
grep -E "ddpm:|Found CUDA|CUDA detected|Caffe2: CUDA" "$out/configure.log" || true
cmake --build "$build" -j "$(nproc)" --target ddpm_gpu_tests ddpm_bench > "$out/build.log" 2>&1 ||
  { grep -E "error|Error" -A4 "$out/build.log" | head -60; exit 1; }
say "built ddpm_gpu_tests and ddpm_bench"

status=0
(cd "$build" && ctest -L gpu --output-on-failure --timeout 300) 2>&1 | tee "$out/ctest.log" ||
  status=1
say "ctest -L gpu done (status $status)"

# The benchmark: the paper's UNet (35.7M parameters) at batch 128, fp32 eager against the fast
# path, then the fast path's sampling of 256 images. Alternating variants would be fairer on a
# noisy machine; on a dedicated GPU one pass each fits the time.
bench=$build/bench/ddpm_bench
peak=${DDPM_PEAK_TFLOPS:-790}
if [ "${DDPM_GPU_CHECK_QUICK:-0}" = 1 ]; then
  train=(--batch 4 --steps 2 --round 1 --warmup 1 --threads 2)
  sample=(--sample-images 2 --sample-batch 2)
  sample_config=$(mktemp)
  printf 'diffusion: {timesteps: 4}\nsample: {steps: 2}\neval: {steps: 2}\n' > "$sample_config"
else
  train=(--batch 128 --steps 60 --round 10 --warmup 5 --threads 8)
  sample=(--sample-images 256 --sample-batch 256)
  sample_config=""
fi
run_bench() {  # LABEL PRECISION CHANNELS_LAST CUDA_GRAPHS ARGS...
  local label=$1 precision=$2 channels_last=$3 graphs=$4
  shift 4
  local line
  line=$(DDPM_TRAIN_PRECISION=$precision DDPM_TRAIN_CHANNELS_LAST=$channels_last \
         DDPM_TRAIN_CUDA_GRAPHS=$graphs timeout 240 "$bench" --config configs/cifar10.yaml \
         --device "$device" --peak-tflops "$peak" "$@") || { echo "$label: failed"; return 1; }
  echo "$label: $line" | tee -a "$out/bench.txt"
}
: > "$out/bench.txt"
graphs=true
[ "$device" = cpu ] && graphs=false
run_bench fp32-eager fp32 false false "${train[@]}" --sample-steps 2 || status=1
run_bench bf16-nhwc-eager bf16 true false "${train[@]}" --sample-steps 2 || status=1
run_bench bf16-nhwc-graph bf16 true "$graphs" "${train[@]}" --sample-steps 2 || status=1
# 8-GPU data parallelism puts batch 16 on each GPU: its compute time is the projection's base.
per_gpu=(--batch 16 --steps 60 --round 10 --warmup 5 --threads 8)
[ "${DDPM_GPU_CHECK_QUICK:-0}" = 1 ] && per_gpu=(--batch 2 --steps 2 --round 1 --warmup 1 --threads 2)
run_bench bf16-nhwc-graph-batch16 bf16 true "$graphs" "${per_gpu[@]}" --sample-steps 2 || status=1
if [ -n "$sample_config" ]; then
  # The quick run samples on a 4-step schedule: a dry run of the code path only.
  line=$(DDPM_TRAIN_PRECISION=bf16 DDPM_TRAIN_CHANNELS_LAST=true "$bench" --config "$sample_config" \
         --device "$device" --batch 2 --steps 1 --warmup 1 --threads 2 "${sample[@]}") || status=1
  echo "sampling-quick: $line" | tee -a "$out/bench.txt"
else
  run_bench sampling-256 bf16 true false --batch 128 --steps 10 --warmup 2 --threads 8 \
    "${sample[@]}" || status=1
fi
say "done (status $status); logs in $out"
exit $status
