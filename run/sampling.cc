#include "run/sampling.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <vector>

#include "base/file_io.h"
#include "base/text.h"
#include "trainer/image_io.h"
#include "trainer/trainer.h"

namespace ddpm {

torch::Tensor ToBytes(const torch::Tensor& images) {
  return ((images.detach().to(torch::kCPU).clamp(-1, 1) + 1) * 127.5)
      .round()
      .to(torch::kUInt8)
      .contiguous();
}

void WriteSampleGrid(const torch::Tensor& images, const std::string& path, int columns) {
  const torch::Tensor bytes = ToBytes(images);
  const int count = static_cast<int>(bytes.size(0));
  if (columns <= 0) columns = static_cast<int>(std::ceil(std::sqrt(static_cast<double>(count))));
  const int size = static_cast<int>(bytes.size(2));
  const int scale = std::max(1, 64 / size);
  WritePng(path, TileGrid(bytes.data_ptr<uint8_t>(), count, static_cast<int>(bytes.size(1)), size,
                          columns, 2, 255, scale));
}

std::string SampleFileName(int64_t index) {
  char name[32];
  std::snprintf(name, sizeof(name), "%06lld.png", static_cast<long long>(index));
  return name;
}

std::vector<std::string> WriteSampleFiles(const torch::Tensor& images, const std::string& dir,
                                          const std::vector<int64_t>& indices) {
  TORCH_CHECK(static_cast<int64_t>(indices.size()) == images.size(0),
              "WriteSampleFiles: ", indices.size(), " indices for ", images.size(0), " images");
  MakeDirectories(dir);
  const torch::Tensor bytes = ToBytes(images);
  std::vector<std::string> written;
  for (int64_t k = 0; k < bytes.size(0); ++k) {
    const std::string path = (std::filesystem::path(dir) / SampleFileName(indices[k])).string();
    WritePng(path, TileGrid(bytes[k].data_ptr<uint8_t>(), 1, static_cast<int>(bytes.size(1)),
                            static_cast<int>(bytes.size(2)), 1, 0));
    written.push_back(path);
  }
  return written;
}

torch::Tensor ReadSampleFiles(const std::string& dir, int64_t first, int64_t n, int channels,
                              int size) {
  torch::Tensor bytes = torch::empty({n, channels, size, size}, torch::kUInt8);
  for (int64_t k = 0; k < n; ++k) {
    const std::string path = (std::filesystem::path(dir) / SampleFileName(first + k)).string();
    if (!std::filesystem::exists(path)) return {};
    Image image;
    try {
      image = ReadImageFile(path);
    } catch (const std::exception&) {
      return {};  // Unreadable: drawn again.
    }
    if (image.width != size || image.height != size || image.channels != channels) return {};
    // HWC to CHW.
    bytes[k].copy_(torch::from_blob(image.pixels.data(), {size, size, channels}, torch::kUInt8)
                       .permute({2, 0, 1}));
  }
  // As RunEvaluator quantizes: a byte b stands for b / 127.5 - 1.
  return bytes.to(torch::kFloat32) / 127.5 - 1;
}

std::vector<std::string> WriteSampleFiles(const torch::Tensor& images, const std::string& dir) {
  std::vector<int64_t> indices(images.size(0));
  for (int64_t k = 0; k < images.size(0); ++k) indices[k] = k;
  return WriteSampleFiles(images, dir, indices);
}

SampleProgress ProgressPrinter(const std::string& what, ProgressMode mode) {
  const ProgressMode resolved = ResolveProgressMode(mode);
  if (resolved == ProgressMode::kOff) return nullptr;
  const bool tty = resolved == ProgressMode::kBar;
  return [what, tty, start = std::chrono::steady_clock::now()](int done, int total) {
    if (tty) {
      std::printf("\r%s: %d/%d steps (%.1fs)%s", what.c_str(), done, total, SecondsSince(start),
                  done == total ? "\n" : "");
      std::fflush(stdout);
    } else if (done == total || done % std::max(1, total / 4) == 0) {
      std::printf("%s: %d/%d steps (%.1fs)\n", what.c_str(), done, total, SecondsSince(start));
      std::fflush(stdout);
    }
  };
}

torch::Tensor SampleImages(const GaussianDiffusion& diffusion, UNet& model, const Config& config,
                           int count, int batch_size, const std::string& what,
                           ProgressMode progress) {
  const ModelConfig& m = config.model;
  std::vector<torch::Tensor> parts;
  const int batches = (count + batch_size - 1) / batch_size;
  for (int b = 0; b < batches; ++b) {
    const int n = std::min(batch_size, count - b * batch_size);
    SampleConfig sample = config.sample;
    sample.seed = config.sample.seed + static_cast<uint64_t>(b);
    const std::string label = batches == 1 ? what
                                           : what + " (batch " + std::to_string(b + 1) + "/" +
                                                 std::to_string(batches) + ")";
    std::vector<int64_t> indices(n);
    for (int k = 0; k < n; ++k) indices[k] = static_cast<int64_t>(b) * batch_size + k;
    const torch::Tensor labels = BlockLabels(ClassesToSample(config), indices, count);
    parts.push_back(
        diffusion
            .Sample(EvalDenoiser(model, config.train.precision, labels, config.sample.guidance),
                    {n, m.in_channels, m.image_size, m.image_size}, sample,
                    ProgressPrinter(label, progress))
            .to(torch::kCPU));
  }
  return torch::cat(parts);
}

}  // namespace ddpm
