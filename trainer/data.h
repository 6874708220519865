// Training images: the dataset interface, the built-in shapes dataset, and the epoch sampler.
// Torch-free: images are uint8 CHW buffers.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "trainer/config.h"

namespace ddpm {

/// A random-access set of square images, read as uint8 CHW.
class ImageDataset {
 public:
  virtual ~ImageDataset() = default;
  /// Number of images.
  virtual int64_t size() const = 0;
  /// Height and width of every image.
  virtual int image_size() const = 0;
  /// Channels of every image.
  virtual int channels() const = 0;
  /// Writes image index (0 <= index < size()) as channels() x image_size()^2 bytes, CHW.
  /// Safe to call from several threads at once.
  virtual void Read(int64_t index, uint8_t* chw) const = 0;
  /// One line that says what this dataset is, for logs.
  virtual std::string Describe() const = 0;
};

/// Coloured circles, squares and triangles on plain backgrounds. Image i depends only on
/// (seed, i), so the dataset is the same on every machine.
class ShapesDataset : public ImageDataset {
 public:
  ShapesDataset(int64_t size, int image_size, uint64_t seed);
  int64_t size() const override { return size_; }
  int image_size() const override { return image_size_; }
  int channels() const override { return 3; }
  void Read(int64_t index, uint8_t* chw) const override;
  std::string Describe() const override;

 private:
  int64_t size_;
  int image_size_;
  uint64_t seed_;
};

/// Builds the dataset that config names, for images of model.image_size and model.in_channels.
std::unique_ptr<ImageDataset> MakeDataset(const Config& config);

/// SplitMix64: a small, fast, portable 64-bit generator for data order and augmentation.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t Next();
  /// Uniform in [0, bound) without modulo bias.
  uint64_t Below(uint64_t bound);
  /// Uniform in [0, 1).
  double Uniform();

 private:
  uint64_t state_;
};

/// Where the sampler is: which epoch, and how many of its indices were handed out.
struct DataCursor {
  int64_t epoch = 0;
  int64_t offset = 0;
};

/// Walks the dataset in a fresh permutation each epoch, seeded by (seed, epoch). The same
/// seed gives the same order on every platform.
class EpochSampler {
 public:
  EpochSampler(int64_t dataset_size, uint64_t seed, DataCursor cursor = {});
  /// The next count indices, rolling into the next epoch as needed.
  std::vector<int64_t> Next(int64_t count);
  /// Position after the indices handed out so far.
  DataCursor cursor() const { return cursor_; }
  /// The permutation of one epoch.
  std::vector<int64_t> Permutation(int64_t epoch) const;

 private:
  int64_t size_;
  uint64_t seed_;
  DataCursor cursor_;
  std::vector<int64_t> order_;
};

/// Reads the images at indices into one uint8 NCHW buffer, flipping each horizontally with
/// probability 1/2 when flip is true. The flips draw from rng.
std::vector<uint8_t> ReadBatch(const ImageDataset& dataset, const std::vector<int64_t>& indices,
                               bool flip, SplitMix64& rng);

}  // namespace ddpm
