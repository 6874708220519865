#!/usr/bin/env bash
# The layering of docs/architecture.md, checked from the source text: each folder's files
# (headers and sources) include only their own folder and the folders below it. Prints every
# include that points the wrong way and fails if there is one; run by ctest (unit.layering).
# usage: check_layers.sh SOURCE_DIR
set -euo pipefail
src=${1:-.}
cd "$src"

# folder -> the project folders its files may include (besides system and library headers;
# "ddpm/v1/..." is the generated wire API, which belongs to proto).
declare -A allowed=(
  [base]="base"
  [config]="base config"
  [trainer]="base config trainer"
  [eval]="base config trainer eval"
  [run]="base config trainer eval run"
  [comm]="base config trainer comm"
  [proto]="base config proto"
  [coordinator]="base config proto coordinator"
  [worker]="base config trainer eval run comm proto worker"
  [tools]="base config trainer eval run comm proto tools"
  [bench]="base config trainer eval run comm proto coordinator worker bench"
  [tests]="base config trainer eval run comm proto coordinator worker tools tests"
)
folders="base config trainer eval run comm proto coordinator worker tools bench tests"

bad=0
checked=0
for folder in $folders; do
  [ -d "$folder" ] || { echo "check_layers: FAIL: no folder $folder/ (update this script)"; exit 1; }
  while IFS= read -r file; do
    checked=$((checked + 1))
    while IFS=: read -r line include; do
      target=${include%%/*}
      [ "$target" = "$include" ] && continue  # same-folder or generated file without a folder
      [ "$target" = "ddpm" ] && target=proto
      case " $folders " in *" $target "*) ;; *) continue ;; esac
      case " ${allowed[$folder]} " in
        *" $target "*) ;;
        *)
          echo "check_layers: $file:$line includes \"$include\": $folder/ may include only:" \
            "${allowed[$folder]}"
          bad=$((bad + 1))
          ;;
      esac
    done < <(grep -n '^#include "' "$file" | sed -E 's/^([0-9]+):#include "([^"]+)".*/\1:\2/')
  done < <(find "$folder" -type f \( -name '*.h' -o -name '*.cc' \) | sort)
done
# Every folder with sources is in the table (cmake/ holds only the precompiled header).
for dir in $(git ls-files '*.cc' '*.h' 2> /dev/null | grep / | cut -d/ -f1 | sort -u); do
  [ "$dir" = cmake ] && continue
  case " $folders " in *" $dir "*) ;; *)
    echo "check_layers: FAIL: $dir/ holds sources but has no layer here (add it)"; bad=$((bad + 1)) ;;
  esac
done
if [ "$bad" -gt 0 ]; then
  echo "check_layers: FAIL: $bad include(s) point the wrong way"
  exit 1
fi
echo "check_layers: PASS: $checked files, every include points down or within its folder"
