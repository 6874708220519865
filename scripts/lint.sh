#!/usr/bin/env bash
# Formatting and lint, as CI runs them (ctest's lint.format_and_tidy):
#   1. clang-format: every tracked C++ file is formatted as .clang-format says (no diff);
#   2. clang-tidy, with the checks .clang-tidy enables, over every translation unit that
#      includes no LibTorch plus a fixed sample of those that do (parsing LibTorch's headers
#      costs clang-tidy about a minute a file on 2 cores: all 40-odd of them would add half an
#      hour to CI). Findings are errors (WarningsAsErrors in .clang-tidy).
# usage: lint.sh BUILD_DIR [SOURCE_DIR]   (BUILD_DIR holds compile_commands.json)
# Exits 77 (skipped) when clang-format or clang-tidy is not installed.
set -euo pipefail
build=$(realpath "${1:?usage: lint.sh BUILD_DIR [SOURCE_DIR]}")
src=$(realpath "${2:-$(dirname "$0")/..}")
cd "$src"
for tool in clang-format clang-tidy; do
  command -v "$tool" > /dev/null || { echo "lint: SKIPPED: $tool is not installed (Debian: $tool)"; exit 77; }
done
[ -f "$build/compile_commands.json" ] || { echo "lint: FAIL: no $build/compile_commands.json"; exit 1; }

mapfile -t sources < <(git ls-files '*.cc' '*.h')
unformatted=()
for file in "${sources[@]}"; do
  clang-format --dry-run -Werror "$file" > /dev/null 2>&1 || unformatted+=("$file")
done
if [ ${#unformatted[@]} -gt 0 ]; then
  echo "lint: FAIL: not clang-formatted (run: clang-format -i ${unformatted[*]}):"
  for file in "${unformatted[@]}"; do clang-format --dry-run "$file" 2>&1 | head -6; done
  exit 1
fi
echo "lint: clang-format: ${#sources[@]} files formatted"

# The translation units clang-tidy reads: those compiled without LibTorch's include paths, and
# this fixed sample of LibTorch ones (the run layer, the optimizer, the checkpoint writer, the
# unpickler of untrusted files). Its compile database is the build's without GCC's precompiled
# header, which clang cannot read.
sample="run/training_run.cc run/run_checkpoints.cc run/evaluation_job.cc run/run_control.cc trainer/optimizer.cc trainer/checkpoint.cc trainer/unpickler.cc"
database=$(mktemp -d)
trap 'rm -rf "$database"' EXIT
mapfile -t units < <(python3 - "$build/compile_commands.json" "$src" "$sample" "$database" <<'PY'
import json, os, re, sys
entries, src, sample, out = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3].split(), sys.argv[4]
kept = []
for e in entries:
    path = os.path.relpath(os.path.realpath(e["file"]), src)
    if path.startswith(("..", "build")) or "/gen/" in path:
        continue
    if "torch" not in e["command"] or path in sample:
        e["command"] = re.sub(r"\s-include\s+\S*cmake_pch\.hxx|\s-Winvalid-pch", "", e["command"])
        kept.append(e)
        print(path)
json.dump(kept, open(os.path.join(out, "compile_commands.json"), "w"))
PY
)
echo "lint: clang-tidy: ${#units[@]} translation units, $(nproc) at a time"
log=$database/tidy.log
if ! printf '%s\n' "${units[@]}" | xargs -P "$(nproc)" -n 1 clang-tidy -p "$database" --quiet \
  > "$log" 2>&1; then
  grep -E "(warning|error):" "$log" | sort -u
  echo "lint: FAIL: clang-tidy findings (above)"
  exit 1
fi
echo "lint: PASS"
