// Image decoding of the folder dataset on arbitrary bytes named .png or .jpg (first byte): a
// file decodes, is cropped and resized, or is refused with DataError naming it.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include "tests/fuzz/fuzz_util.h"
#include "trainer/data.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  const std::string dir = ddpm::fuzz::ScratchDir() + "/images";
  std::filesystem::remove_all(dir);
  ddpm::fuzz::WriteFile(dir + ((data[0] & 1) != 0 ? "/a.jpg" : "/a.png"), data + 1, size - 1);
  const int channels = (data[0] & 2) != 0 ? 1 : 3;
  try {
    const ddpm::ImageFolderDataset dataset(dir, 16, channels);
    std::vector<uint8_t> image(static_cast<std::size_t>(channels) * 16 * 16);
    for (int64_t i = 0; i < dataset.size(); ++i) dataset.Read(i, image.data());
  } catch (const ddpm::DataError&) {
  }
  return 0;
}
