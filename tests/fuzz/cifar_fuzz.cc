// The CIFAR-10 reader on arbitrary bytes, as the binary test_batch.bin (first byte even) or as
// cifar-10-binary.tar.gz (odd): it reads whole records or refuses with DataError naming the
// file; every image it reports reads.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "tests/fuzz/fuzz_util.h"
#include "trainer/data.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  const bool archive = (data[0] & 1) != 0;
  const std::string dir = ddpm::fuzz::ScratchDir() + "/cifar";
  std::filesystem::remove_all(dir);
  const std::string path =
      archive ? dir + "/cifar-10-binary.tar.gz" : dir + "/folder/test_batch.bin";
  ddpm::fuzz::WriteFile(path, data + 1, size - 1);
  try {
    const ddpm::Cifar10Dataset dataset(archive ? path : dir + "/folder", ddpm::CifarSplit::kTest);
    std::vector<uint8_t> image(3 * 32 * 32);
    for (int64_t i = 0; i < dataset.size(); ++i) {
      dataset.Read(i, image.data());
      if (dataset.label(i) < 0 || dataset.label(i) > 9) std::abort();
    }
  } catch (const ddpm::DataError&) {
  }
  return 0;
}
