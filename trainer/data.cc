#include "trainer/data.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <stdexcept>

namespace ddpm {

uint64_t SplitMix64::Next() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

uint64_t SplitMix64::Below(uint64_t bound) {
  // Lemire's rejection: reject the low values that would bias the modulo.
  const uint64_t threshold = (0 - bound) % bound;
  while (true) {
    const uint64_t r = Next();
    if (r >= threshold) return r % bound;
  }
}

double SplitMix64::Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

ShapesDataset::ShapesDataset(int64_t size, int image_size, uint64_t seed)
    : size_(size), image_size_(image_size), seed_(seed) {
  if (size < 1) throw std::invalid_argument("shapes dataset: size must be >= 1");
  if (image_size < 8) throw std::invalid_argument("shapes dataset: image_size must be >= 8");
}

std::string ShapesDataset::Describe() const {
  return "shapes: " + std::to_string(size_) + " procedural images of " +
         std::to_string(image_size_) + "x" + std::to_string(image_size_) + ", seed " +
         std::to_string(seed_);
}

void ShapesDataset::Read(int64_t index, uint8_t* chw) const {
  if (index < 0 || index >= size_) {
    throw std::out_of_range("shapes dataset: index " + std::to_string(index) +
                            " is outside [0, " + std::to_string(size_) + ")");
  }
  SplitMix64 rng(seed_ ^ (0x5851f42d4c957f2dULL * static_cast<uint64_t>(index + 1)));
  std::array<int, 3> background{}, colour{};
  for (int& c : background) c = static_cast<int>(rng.Below(256));
  // A shape colour far enough from the background to be clearly visible.
  do {
    for (int& c : colour) c = static_cast<int>(rng.Below(256));
  } while (std::abs(colour[0] - background[0]) + std::abs(colour[1] - background[1]) +
               std::abs(colour[2] - background[2]) < 180);
  const int kind = static_cast<int>(rng.Below(3));  // 0 circle, 1 square, 2 triangle
  const double n = image_size_;
  const double radius = n * (0.18 + 0.14 * rng.Uniform());
  const double cx = radius + (n - 2 * radius) * rng.Uniform();
  const double cy = radius + (n - 2 * radius) * rng.Uniform();

  auto inside = [&](double x, double y) {
    const double dx = x - cx, dy = y - cy;
    switch (kind) {
      case 0:
        return dx * dx + dy * dy <= radius * radius;
      case 1:
        return std::abs(dx) <= radius * 0.85 && std::abs(dy) <= radius * 0.85;
      default: {
        // Upright triangle with apex (cx, cy - r) and base y = cy + r from cx - r to cx + r.
        if (dy > radius || dy < -radius) return false;
        const double half_width = radius * (dy + radius) / (2 * radius);
        return std::abs(dx) <= half_width;
      }
    }
  };

  // 4x4 supersampling gives smooth edges.
  constexpr int kSub = 4;
  const int64_t plane = static_cast<int64_t>(image_size_) * image_size_;
  for (int y = 0; y < image_size_; ++y) {
    for (int x = 0; x < image_size_; ++x) {
      int hits = 0;
      for (int sy = 0; sy < kSub; ++sy) {
        for (int sx = 0; sx < kSub; ++sx) {
          hits += inside(x + (sx + 0.5) / kSub, y + (sy + 0.5) / kSub) ? 1 : 0;
        }
      }
      const double coverage = static_cast<double>(hits) / (kSub * kSub);
      for (int c = 0; c < 3; ++c) {
        const double value = background[c] + coverage * (colour[c] - background[c]);
        chw[c * plane + y * image_size_ + x] = static_cast<uint8_t>(std::lround(value));
      }
    }
  }
}

std::unique_ptr<ImageDataset> MakeDataset(const Config& config) {
  switch (config.data.dataset) {
    case DatasetKind::kShapes:
      if (config.model.in_channels != 3) {
        throw ConfigError("config: data.dataset: shapes makes 3-channel images, but "
                          "model.in_channels is " + std::to_string(config.model.in_channels));
      }
      return std::make_unique<ShapesDataset>(config.data.shapes_size, config.model.image_size,
                                             config.train.seed);
  }
  throw ConfigError("config: data.dataset: unknown dataset");
}

EpochSampler::EpochSampler(int64_t dataset_size, uint64_t seed, DataCursor cursor)
    : size_(dataset_size), seed_(seed), cursor_(cursor) {
  if (dataset_size < 1) throw std::invalid_argument("sampler: the dataset is empty");
  if (cursor.offset < 0 || cursor.offset > dataset_size || cursor.epoch < 0) {
    throw std::invalid_argument("sampler: cursor (epoch " + std::to_string(cursor.epoch) +
                                ", offset " + std::to_string(cursor.offset) +
                                ") is outside a dataset of " + std::to_string(dataset_size));
  }
  order_ = Permutation(cursor_.epoch);
}

std::vector<int64_t> EpochSampler::Permutation(int64_t epoch) const {
  std::vector<int64_t> order(size_);
  for (int64_t i = 0; i < size_; ++i) order[i] = i;
  SplitMix64 rng(seed_ * 0x9e3779b97f4a7c15ULL + static_cast<uint64_t>(epoch) + 1);
  // Fisher-Yates, written out so that the order does not depend on the standard library.
  for (int64_t i = size_ - 1; i > 0; --i) {
    std::swap(order[i], order[rng.Below(static_cast<uint64_t>(i + 1))]);
  }
  return order;
}

std::vector<int64_t> EpochSampler::Next(int64_t count) {
  std::vector<int64_t> out;
  out.reserve(count);
  while (static_cast<int64_t>(out.size()) < count) {
    if (cursor_.offset == size_) {
      ++cursor_.epoch;
      cursor_.offset = 0;
      order_ = Permutation(cursor_.epoch);
    }
    out.push_back(order_[cursor_.offset++]);
  }
  return out;
}

std::vector<uint8_t> ReadBatch(const ImageDataset& dataset, const std::vector<int64_t>& indices,
                               bool flip, SplitMix64& rng) {
  const int size = dataset.image_size();
  const int64_t image_bytes = static_cast<int64_t>(dataset.channels()) * size * size;
  std::vector<uint8_t> out(indices.size() * image_bytes);
  for (std::size_t i = 0; i < indices.size(); ++i) {
    uint8_t* image = out.data() + i * image_bytes;
    dataset.Read(indices[i], image);
    if (flip && (rng.Next() & 1)) {
      for (int64_t row = 0; row < image_bytes / size; ++row) {
        std::reverse(image + row * size, image + (row + 1) * size);
      }
    }
  }
  return out;
}

}  // namespace ddpm
