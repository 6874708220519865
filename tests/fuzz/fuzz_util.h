// What the fuzz targets share: a scratch folder of this process, and files written into it.
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

namespace ddpm::fuzz {

/// A folder of this process under the temporary directory, made once.
inline const std::string& ScratchDir() {
  static const std::string dir = [] {
    const std::filesystem::path path =
        std::filesystem::temp_directory_path() / ("ddpm_fuzz_" + std::to_string(::getpid()));
    std::filesystem::create_directories(path);
    return path.string();
  }();
  return dir;
}

/// Writes the fuzz input to path (replacing it) and returns path.
inline std::string WriteFile(const std::string& path, const uint8_t* data, std::size_t size) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  return path;
}

}  // namespace ddpm::fuzz
