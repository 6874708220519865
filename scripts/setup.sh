#!/usr/bin/env bash
# Installs every Debian package ddpm-train needs to build, run and test. Idempotent: packages
# already present are skipped, and apt-get runs only when something is missing.
set -euo pipefail

packages=(
  # toolchain
  cmake g++ ninja-build ccache pkg-config git
  # trainer: LibTorch (CPU) with a fast BLAS, yaml-cpp, image and archive I/O
  libtorch-dev libopenblas0-pthread libyaml-cpp-dev libstb-dev libarchive-dev libzip-dev
  # worker: MPI (NCCL comes with CUDA where there is a GPU); checkpoints: checksums, JSON
  libopenmpi-dev openmpi-bin libxxhash-dev nlohmann-json3-dev
  # coordinator and tools: gRPC, Protobuf, Prometheus, SQLite
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc prometheus-cpp-dev
  libsqlite3-dev libcli11-dev
  # the demo's metrics scrape, and the TLS test's throwaway certificate
  curl openssl
  # tests: GoogleTest, and Debian's PyTorch as the golden reference
  libgtest-dev libgmock-dev python3-torch python3-numpy python3-scipy python3-yaml
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present"
  exit 0
fi

echo "setup: installing ${#missing[@]} packages: ${missing[*]}"
sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "setup: done"
