#!/usr/bin/env bash
# Prints the Debian archive this machine's apt uses (the first http(s) URI ending in /debian,
# from a one-line source or a deb822 .sources file), as apt itself reads them; exits 1 with a
# message naming the files it read when there is none. DDPM_DEBIAN_MIRROR overrides it.
# usage: scripts/debian-mirror.sh
set -euo pipefail
if [ -n "${DDPM_DEBIAN_MIRROR:-}" ]; then
  echo "${DDPM_DEBIAN_MIRROR%/}"
  exit 0
fi
files=()
[ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
for file in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [ -f "$file" ] && files+=("$file")
done
mirror=""
if [ "${#files[@]}" -gt 0 ]; then
  # One-line: "deb [options] URI suite ...". deb822: "URIs: URI [URI ...]". Comments skipped.
  mirror=$(grep -hvE '^[[:space:]]*#' "${files[@]}" |
    grep -oE '^(deb([[:space:]]+\[[^]]*\])?|URIs:)[[:space:]]+https?://[^[:space:]]+/debian/?([[:space:]]|$)' |
    head -n 1 | awk '{print $NF}' || true)
fi
if [ -z "$mirror" ]; then
  echo "debian-mirror: no Debian archive (an http(s) URI ending in /debian) in apt's sources:" \
    "${files[*]:-none found}; set DDPM_DEBIAN_MIRROR" >&2
  exit 1
fi
echo "${mirror%/}"
