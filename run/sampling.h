// Drawing images from a model and writing them as PNG: the run's sample grids and ddpm_sample.
#pragma once

#include <torch/torch.h>

#include <string>

#include "config/config.h"
#include "run/run.h"
#include "trainer/diffusion.h"
#include "trainer/unet.h"

namespace ddpm {

/// Images in [-1, 1], [N, C, H, W], as uint8 NCHW on the CPU.
torch::Tensor ToBytes(const torch::Tensor& images);

/// Writes images ([-1, 1], [N, C, H, W]) as one square-ish PNG grid; small images are enlarged
/// (nearest neighbour) to at least 64 pixels, for looking at.
/// columns: images per row (0: square-ish).
void WriteSampleGrid(const torch::Tensor& images, const std::string& path, int columns = 0);

/// Writes each image as its own PNG, DIR/000000.png onwards; returns the paths.
std::vector<std::string> WriteSampleFiles(const torch::Tensor& images, const std::string& dir);
/// Writes image k of images as DIR/SampleFileName(indices[k]), each file whole or not at all
/// (written aside and renamed); returns the paths.
std::vector<std::string> WriteSampleFiles(const torch::Tensor& images, const std::string& dir,
                                          const std::vector<int64_t>& indices);
/// The file name of sample index in a directory of samples: 000000.png onwards.
std::string SampleFileName(int64_t index);
/// Samples first .. first + n - 1 of dir as [n, channels, size, size] in [-1, 1] (float32, CPU),
/// the values they were written from after 8-bit quantization; an undefined tensor when any is
/// missing or not of that shape.
torch::Tensor ReadSampleFiles(const std::string& dir, int64_t first, int64_t n, int channels,
                              int size);

/// A sampler progress report labelled `what`: a line rewritten in place (kBar), a few plain
/// lines (kLines), or nothing (kOff); kAuto is resolved first.
SampleProgress ProgressPrinter(const std::string& what, ProgressMode mode);

/// Samples count images with config.sample's sampler, batch_size at a time (batch b uses seed
/// sample.seed + b), reporting progress as `what`; returns them on the CPU. A conditional model
/// draws ClassesToSample in contiguous blocks with sample.guidance.
torch::Tensor SampleImages(const GaussianDiffusion& diffusion, UNet& model, const Config& config,
                           int count, int batch_size, const std::string& what,
                           ProgressMode progress = ProgressMode::kAuto);

}  // namespace ddpm
