#!/usr/bin/env bash
# Prints the Debian packages that own the shared libraries the given binaries link directly,
# one per line: what the slim runtime stage of docker/Dockerfile.* installs (apt brings their
# own dependencies). Libraries no package owns (an official LibTorch under /opt) are left to the
# image that copies them.
# usage: runtime-packages.sh BINARY...
set -euo pipefail
for binary in "$@"; do
  needed=$(objdump -p "$binary" | awk '/NEEDED/ {print $2}')
  ldd "$binary" | awk '/=> \// {print $1, $3}' | while read -r name path; do
    if grep -qx "$name" <<< "$needed"; then echo "$path"; fi
  done
done | sort -u | while read -r library; do
  dpkg-query -S "$(readlink -f "$library")" 2>/dev/null || dpkg-query -S "$library" 2>/dev/null || true
done | cut -d: -f1 | sort -u
