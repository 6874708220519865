// Image files: sample grids as PNG, written whole or not at all, and images read back. Torch-free.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ddpm {

/// An 8-bit image in HWC order.
struct Image {
  int width = 0;
  int height = 0;
  int channels = 0;
  std::vector<uint8_t> pixels;
};

/// Tiles count CHW images of channels x size x size, row-major into columns per row, each
/// enlarged scale times (nearest neighbour), with padding pixels of border colour between and
/// around them.
Image TileGrid(const uint8_t* nchw, int count, int channels, int size, int columns, int padding = 2,
               uint8_t border = 255, int scale = 1);
/// Writes image as a PNG, atomically (WriteFileAtomically, not synced: sample jobs write
/// thousands, and a killed process loses no renamed file). Throws FileError naming the file.
void WritePng(const std::string& path, const Image& image);
/// Reads a PNG (or JPEG) as it is stored: its own size and channels, HWC. Throws naming the file.
Image ReadImageFile(const std::string& path);

}  // namespace ddpm
