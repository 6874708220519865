#!/usr/bin/env bash
# The sanitizers (clang) over everything that builds without LibTorch. AddressSanitizer and
# UndefinedBehaviorSanitizer: the config and fence suites, the dataset readers and the loader,
# the coordinator's core and its gRPC service in process (the service suites), and the
# libFuzzer targets of tests/fuzz/, each run DDPM_FUZZ_RUNS times (default 20000; 4000 for the
# coordinator's) from its committed seed corpus. ThreadSanitizer (in BUILD_DIR-thread): the loader, and the
# coordinator's core called from many threads at once. Any sanitizer finding or fuzzer crash fails it; a crashing input is left in
# BUILD_DIR/fuzz-artifacts/. ctest runs it as sanitize.asan_ubsan_and_fuzzers; README "Tests"
# says what runs sanitized and what does not.
# usage: scripts/sanitize.sh [BUILD_DIR]   (default build-sanitize)
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${1:-build-sanitize}
# Executions per fuzz target: the coordinator's opens a fresh SQLite registry for each input
# (about 7 ms), the others take well under a millisecond.
runs=${DDPM_FUZZ_RUNS:-20000}
coordinator_runs=${DDPM_FUZZ_RUNS:-4000}
if ! command -v clang++ > /dev/null; then
  echo "sanitize: SKIP: clang++ is not installed (Debian: clang, libclang-rt-dev)"
  exit 77
fi
configure() {  # BUILD_DIR CMAKE_OPTIONS...
  local dir=$1
  shift
  if [ -f "$dir/CMakeCache.txt" ]; then return; fi
  mkdir -p "$dir"
  local generator=()
  if command -v ninja > /dev/null; then generator=(-G Ninja); fi
  CC=clang CXX=clang++ cmake -S . -B "$dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DDDPM_USE_PCH=OFF "$@" > "$dir/configure.log" 2>&1 || { cat "$dir/configure.log"; exit 1; }
}
run_suites() {  # SANITIZERS BUILD_DIR SUITE...
  local what=$1 dir=$2 suite log
  shift 2
  for suite in "$@"; do
    echo "sanitize: $suite under $what"
    log=$dir/$suite.log
    if ! "$dir/tests/$suite" > "$log" 2>&1; then
      tail -60 "$log"
      echo "sanitize: FAIL: $suite under $what (the whole log: $log)"
      exit 1
    fi
    grep -E "^\[  PASSED  \]" "$log"
  done
}

# 1. AddressSanitizer and UndefinedBehaviorSanitizer: the suites, then the fuzz targets.
configure "$build_dir" -DDDPM_SANITIZE_ADDRESS=ON -DDDPM_SANITIZE_UNDEFINED=ON -DDDPM_BUILD_FUZZERS=ON
suites=(ddpm_config_tests ddpm_data_tests ddpm_service_tests)
fuzzers=(fuzz_config fuzz_fence fuzz_cifar fuzz_image fuzz_coordinator fuzz_checkpoint fuzz_npz
  fuzz_pickle)
echo "sanitize: building ${suites[*]} ${fuzzers[*]} with ASan and UBSan in $build_dir"
cmake --build "$build_dir" --parallel "$(nproc)" --target "${suites[@]}" "${fuzzers[@]}"
export ASAN_OPTIONS=abort_on_error=1:detect_leaks=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
run_suites "ASan and UBSan" "$build_dir" "${suites[@]}"

artifacts=$build_dir/fuzz-artifacts
mkdir -p "$artifacts"
summary=()
for fuzzer in "${fuzzers[@]}"; do
  # A scratch copy of the seeds: what the fuzzer adds stays out of the source tree.
  corpus=$build_dir/fuzz-corpus/$fuzzer
  rm -rf "$corpus"
  mkdir -p "$corpus"
  cp tests/fuzz/corpus/"$fuzzer"/* "$corpus"/
  log=$build_dir/$fuzzer.log
  target_runs=$runs
  [ "$fuzzer" != fuzz_coordinator ] || target_runs=$coordinator_runs
  if ! "$build_dir/tests/fuzz/$fuzzer" -runs="$target_runs" -max_len=8192 -seed=1 -timeout=30 \
      -artifact_prefix="$artifacts/$fuzzer-" "$corpus" > "$log" 2>&1; then
    tail -40 "$log"
    echo "sanitize: FAIL: $fuzzer crashed; the input is in $artifacts/ (commit it under tests/fuzz/corpus/$fuzzer/ once fixed)"
    exit 1
  fi
  done_line=$(grep -E "^Done [0-9]+ runs" "$log" | tail -1)
  coverage=$(grep -oE "cov: [0-9]+" "$log" | tail -1)
  summary+=("$fuzzer: $(echo "$done_line" | awk '{print $2}') executions ($coverage edges), 0 crashes")
done

# 2. ThreadSanitizer: the coordinator's core called from many threads at once (without gRPC,
# which is not built with TSan and reports races inside itself), and the loader's thread with
# its consumer.
thread_dir=$build_dir-thread
configure "$thread_dir" -DDDPM_SANITIZE_THREAD=ON
thread_suites=(ddpm_data_tests ddpm_core_tests)
echo "sanitize: building ${thread_suites[*]} with TSan in $thread_dir"
cmake --build "$thread_dir" --parallel "$(nproc)" --target "${thread_suites[@]}"
export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1
run_suites TSan "$thread_dir" "${thread_suites[@]}"

printf 'sanitize: %s\n' "${summary[@]}"
echo "sanitize: PASS"
