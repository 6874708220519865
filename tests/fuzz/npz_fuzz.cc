// FID reference statistics (.npz: numpy's zip of .npy files) from arbitrary bytes: the arrays
// read or the file is refused with std::runtime_error naming it and the array.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <stdexcept>
#include <string>

#include "eval/fid.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  const std::string path =
      ddpm::fuzz::WriteFile(ddpm::fuzz::ScratchDir() + "/stats.npz", data, size);
  try {
    for (const auto& [name, array] : ddpm::ReadNpz(path)) {
      if (!array.defined()) std::abort();
      array.sum();
    }
  } catch (const std::exception&) {
  }
  return 0;
}
