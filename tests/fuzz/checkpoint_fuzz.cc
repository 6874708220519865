// A checkpoint directory from arbitrary bytes: the first two bytes give the length of its
// manifest.json, the rest is its one shard (shard-00000-of-00001); COMMITTED is there. Reading
// it returns tensors or refuses with CheckpointError naming the file; a checkpoint that reads
// has the shapes its manifest promised.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>

#include "tests/fuzz/fuzz_util.h"
#include "trainer/checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  if (size < 2) return 0;
  const std::size_t manifest = std::min<std::size_t>(size - 2, data[0] | (data[1] << 8));
  const std::string dir = ddpm::fuzz::ScratchDir() + "/checkpoint/step_000000001";
  std::filesystem::remove_all(dir);
  ddpm::fuzz::WriteFile(dir + "/manifest.json", data + 2, manifest);
  ddpm::fuzz::WriteFile(dir + "/shard-00000-of-00001", data + 2 + manifest, size - 2 - manifest);
  std::ofstream(dir + "/COMMITTED") << "1\n";
  try {
    const std::map<std::string, torch::Tensor> tensors = ddpm::ReadCheckpoint(dir);
    for (const auto& [name, tensor] : tensors) {
      if (!tensor.defined()) std::abort();
      tensor.sum();  // every byte the tensor claims is there to be read
    }
  } catch (const ddpm::CheckpointError&) {
  }
  return 0;
}
