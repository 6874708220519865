#!/usr/bin/env bash
# Installs the Debian packages ddpm-train needs, from scripts/packages.txt. Idempotent: packages
# already present are skipped, and apt-get runs only when something is missing.
# usage: setup.sh [--list] [SECTION...] [--exclude PACKAGE...]
#   SECTION: build, runtime, test, containers or ssh (default: build, runtime and test;
#   containers is the opt-in Compose test's podman, ssh the images' sshd for the MPI
#   Operator). --exclude leaves packages out (the CUDA image brings its own LibTorch instead
#   of libtorch-dev). --list prints the packages and
#   installs nothing.
set -euo pipefail
list="$(dirname "$0")/packages.txt"
sections=()
excluded=()
list_only=false
while [ $# -gt 0 ]; do
  case $1 in
    --list) list_only=true; shift ;;
    --exclude) shift; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do excluded+=("$1"); shift; done ;;
    -*) echo "setup: unknown option $1 (usage: setup.sh [--list] [SECTION...] [--exclude PACKAGE...])" >&2; exit 2 ;;
    *) sections+=("$1"); shift ;;
  esac
done
known=$(sed -n 's/^\[\(.*\)\]$/\1/p' "$list")
[ ${#sections[@]} -gt 0 ] || sections=(build runtime test)
for section in "${sections[@]}"; do
  grep -qx "$section" <<< "$known" || { echo "setup: no section [$section] in $list (sections: $(echo $known))" >&2; exit 2; }
done

# The packages of the chosen sections, comments and blank lines dropped, each once.
packages=()
section=""
while IFS= read -r line; do
  line=${line%%#*}
  if [[ $line =~ ^\[(.*)\]$ ]]; then section=${BASH_REMATCH[1]}; continue; fi
  if [ ${#sections[@]} -gt 0 ] && ! printf '%s\n' "${sections[@]}" | grep -qx "$section"; then continue; fi
  for p in $line; do
    if printf '%s\n' "${excluded[@]}" "${packages[@]}" | grep -qx "$p"; then continue; fi
    packages+=("$p")
  done
done < "$list"

if $list_only; then
  printf '%s\n' "${packages[@]}"
  exit 0
fi

# A package counts as present when it is installed or an installed package provides it (as
# NodeSource's nodejs provides npm, which then cannot be installed beside it).
provided=$(dpkg-query -W -f='${Status}|${Provides}\n' 2>/dev/null |
  sed -n 's/^install ok installed|//p' | tr ',' '\n' | sed -E 's/\(.*\)//; s/^ *//; s/ *$//' |
  sort -u)
missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" &&
     ! grep -qx "$p" <<< "$provided"; then
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
