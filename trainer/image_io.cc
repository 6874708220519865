#include "trainer/image_io.h"

#include <fcntl.h>
#include <stb/stb_image.h>
#include <stb/stb_image_write.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <system_error>

#include "base/errors.h"
#include "base/file_io.h"

namespace ddpm {

Image TileGrid(const uint8_t* nchw, int count, int channels, int size, int columns, int padding,
               uint8_t border, int scale) {
  if (count < 1 || columns < 1 || scale < 1)
    throw std::invalid_argument("TileGrid: nothing to tile");
  const int64_t plane = static_cast<int64_t>(size) * size;
  size *= scale;
  const int rows = (count + columns - 1) / columns;
  const int used_columns = count < columns ? count : columns;
  Image grid;
  grid.channels = channels;
  grid.width = used_columns * (size + padding) + padding;
  grid.height = rows * (size + padding) + padding;
  grid.pixels.assign(static_cast<std::size_t>(grid.width) * grid.height * channels, border);
  const int source_size = size / scale;
  for (int i = 0; i < count; ++i) {
    const int x0 = padding + (i % columns) * (size + padding);
    const int y0 = padding + (i / columns) * (size + padding);
    const uint8_t* image = nchw + static_cast<int64_t>(i) * channels * plane;
    for (int y = 0; y < size; ++y) {
      for (int x = 0; x < size; ++x) {
        uint8_t* out =
            &grid.pixels[((static_cast<std::size_t>(y0 + y) * grid.width) + x0 + x) * channels];
        const int64_t source = (y / scale) * source_size + x / scale;
        for (int c = 0; c < channels; ++c) out[c] = image[c * plane + source];
      }
    }
  }
  return grid;
}

void WritePng(const std::string& path, const Image& image) {
  // Encoded in memory, then written with every error checked (stb's own file writer ignores
  // them, so a full disk would leave a truncated PNG), and renamed into place.
  std::string png;
  const auto append = [](void* context, void* data, int size) {
    static_cast<std::string*>(context)->append(static_cast<const char*>(data),
                                               static_cast<std::size_t>(size));
  };
  if (stbi_write_png_to_func(append, &png, image.width, image.height, image.channels,
                             image.pixels.data(), image.width * image.channels) == 0) {
    throw FileError(path + ": cannot encode PNG");
  }
  WriteFileAtomically(path, png, Durability::kRenamed);
}

Image ReadImageFile(const std::string& path) {
  Image image;
  stbi_uc* decoded = stbi_load(path.c_str(), &image.width, &image.height, &image.channels, 0);
  if (decoded == nullptr) {
    throw FormatError(path + ": cannot decode image: " + stbi_failure_reason());
  }
  image.pixels.assign(
      decoded, decoded + static_cast<std::size_t>(image.width) * image.height * image.channels);
  stbi_image_free(decoded);
  return image;
}

}  // namespace ddpm
