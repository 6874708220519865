#!/usr/bin/env bash
# Run on the development machine (it reaches Debian's package registry): downloads the Debian
# packages that scripts/gpu-check.sh builds against on the GPU machine, which has PyTorch with
# CUDA, nvcc and CMake but none of our other dependencies and no network. They land in
# .gpu-deps/debs (git-ignored); carry .gpu-deps to the GPU machine.
# usage: scripts/gpu-deps.sh
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.gpu-deps/debs
# What the trainer, the GPU tests and the benchmark link (DDPM_BUILD_SERVICE=OFF), with their
# headers, and what those libraries need at run time.
wanted=(libyaml-cpp-dev libyaml-cpp0.7 nlohmann-json3-dev libstb-dev libstb0 libarchive-dev
        libarchive13 libxxhash-dev libxxhash0 libzip-dev libzip4 libssl-dev libssl3 libgtest-dev)
# The C library, its headers and the compiler's runtime are the GPU machine's own: bookworm's
# must not shadow them. (The -dev packages pull them in through libc6-dev.)
base='^(libc6|libc6-dev|libc-dev-bin|linux-libc-dev|libcrypt1|libcrypt-dev|libnsl2|libnsl-dev|'
base+='libtirpc.*|rpcsvc-proto|libgssapi-krb5-2|libk5crypto3|libkrb5.*|libkeyutils1|libcom-err2|'
base+='libgcc-s1|libstdc\+\+6|gcc-[0-9]+-base)$'
closure=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
            --no-replaces --no-enhances "${wanted[@]}" 2>/dev/null |
          grep -v '^ ' | grep -v '^<' | sort -u | grep -Ev "$base" || true)
rm -rf "$dir"
mkdir -p "$dir"
(cd "$dir" && apt-get -o APT::Sandbox::User=root download $closure > /dev/null)
echo "gpu-deps: $(ls "$dir" | wc -l) packages, $(du -sh "$dir" | cut -f1), in $dir:"
ls "$dir" | sed 's/^/  /'
