// The run directory's fence file (RUN_DIR/ATTEMPT, base/fence.h) as a superseded or damaged
// group might leave it: it reads or is refused with std::runtime_error; a fence that reads
// takes a grant of the next attempt and reads back with it.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "base/fence.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  const std::string dir = ddpm::fuzz::ScratchDir() + "/fence";
  ddpm::fuzz::WriteFile(dir + "/ATTEMPT", data, size);
  const ddpm::RunFence fence(dir);
  std::vector<ddpm::AttemptRecord> records;
  int current = 0;
  try {
    records = fence.Read();
    current = fence.Current();
    fence.Stale(1, 1000);
  } catch (const std::runtime_error&) {
    return 0;
  }
  if (current >= 1 << 30) return 0;
  fence.Grant(current + 1);
  const std::vector<ddpm::AttemptRecord> after = fence.Read();
  if (after.size() != records.size() + 1 || after.back().attempt != current + 1) std::abort();
  return 0;
}
