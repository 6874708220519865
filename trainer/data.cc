#include "trainer/data.h"

#include <archive.h>
#include <archive_entry.h>
#include <stb/stb_image.h>
#include <stb/stb_image_resize.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <stdexcept>

#include "base/log.h"

namespace ddpm {

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

namespace {

// The first draws of shape image index: its colours and its kind; the stream goes on with the
// shape's size and place.
struct ShapeDraw {
  SplitMix64 rng;
  std::array<int, 3> background{}, colour{};
  int kind = 0;  // 0 circle, 1 square, 2 triangle
};

ShapeDraw DrawShape(uint64_t seed, int64_t index, int64_t size) {
  if (index < 0 || index >= size) {
    throw std::out_of_range("shapes dataset: index " + std::to_string(index) + " is outside [0, " +
                            std::to_string(size) + ")");
  }
  ShapeDraw draw{SplitMix64(seed ^ (0x5851f42d4c957f2dULL * static_cast<uint64_t>(index + 1)))};
  for (int& c : draw.background) c = static_cast<int>(draw.rng.Below(256));
  // A shape colour far enough from the background to be clearly visible.
  do {
    for (int& c : draw.colour) c = static_cast<int>(draw.rng.Below(256));
  } while (std::abs(draw.colour[0] - draw.background[0]) +
               std::abs(draw.colour[1] - draw.background[1]) +
               std::abs(draw.colour[2] - draw.background[2]) <
           180);
  draw.kind = static_cast<int>(draw.rng.Below(3));
  return draw;
}

}  // namespace

int ShapesDataset::label(int64_t index) const { return DrawShape(seed_, index, size_).kind; }

void ShapesDataset::Read(int64_t index, uint8_t* chw) const {
  ShapeDraw draw = DrawShape(seed_, index, size_);
  SplitMix64& rng = draw.rng;
  const std::array<int, 3>& background = draw.background;
  const std::array<int, 3>& colour = draw.colour;
  const int kind = draw.kind;
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

namespace fs = std::filesystem;

std::vector<std::string> Cifar10Dataset::FileNames(CifarSplit split) {
  if (split == CifarSplit::kTest) return {"test_batch.bin"};
  return {"data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin",
          "data_batch_5.bin"};
}

namespace {

std::vector<uint8_t> ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw DataError(path + ": cannot open");
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)),
                              std::istreambuf_iterator<char>());
}

// libarchive's message for its last error; it may have none (a null pointer).
std::string ArchiveError(archive* reader) {
  const char* message = archive_error_string(reader);
  return message != nullptr ? message : "unknown error";
}

// A member's path as the archive names it; a member may have none.
std::string MemberName(archive_entry* entry) {
  const char* name = archive_entry_pathname(entry);
  return name != nullptr ? name : "(a member without a name)";
}

// Reads the wanted members of a (compressed) tar archive with libarchive, keyed by base name.
std::map<std::string, std::vector<uint8_t>> ReadArchiveMembers(
    const std::string& path, const std::vector<std::string>& wanted) {
  if (!fs::exists(path)) throw DataError(path + ": no such file");
  std::unique_ptr<archive, int (*)(archive*)> reader(archive_read_new(), archive_read_free);
  archive_read_support_filter_all(reader.get());
  archive_read_support_format_all(reader.get());
  if (archive_read_open_filename(reader.get(), path.c_str(), 1 << 16) != ARCHIVE_OK) {
    throw DataError(path + ": cannot open archive: " + ArchiveError(reader.get()));
  }
  std::map<std::string, std::vector<uint8_t>> members;
  archive_entry* entry = nullptr;
  while (true) {
    const int status = archive_read_next_header(reader.get(), &entry);
    if (status == ARCHIVE_EOF) break;
    if (status != ARCHIVE_OK) {
      throw DataError(path + ": corrupt or truncated archive: " + ArchiveError(reader.get()));
    }
    const std::string name = fs::path(MemberName(entry)).filename().string();
    if (std::find(wanted.begin(), wanted.end(), name) == wanted.end()) continue;
    std::vector<uint8_t> bytes;
    std::array<uint8_t, 1 << 16> chunk{};
    while (true) {
      const la_ssize_t got = archive_read_data(reader.get(), chunk.data(), chunk.size());
      if (got < 0) {
        throw DataError(path + ": " + MemberName(entry) + ": cannot read at byte offset " +
                        std::to_string(bytes.size()) + ": " + ArchiveError(reader.get()));
      }
      if (got == 0) break;
      bytes.insert(bytes.end(), chunk.data(), chunk.data() + got);
    }
    const la_int64_t declared = archive_entry_size(entry);
    if (archive_entry_size_is_set(entry) && declared != static_cast<la_int64_t>(bytes.size())) {
      throw DataError(path + ": " + MemberName(entry) + ": truncated at byte offset " +
                      std::to_string(bytes.size()) + " of " + std::to_string(declared));
    }
    members[name] = std::move(bytes);
  }
  for (const std::string& name : wanted) {
    if (members.count(name) == 0) throw DataError(path + ": the archive has no " + name);
  }
  return members;
}

}  // namespace

Cifar10Dataset::Cifar10Dataset(const std::string& path, CifarSplit split) : source_(path) {
  const std::vector<std::string> names = FileNames(split);
  if (fs::is_directory(path)) {
    std::string dir = path;
    if (!fs::exists(fs::path(dir) / names[0]) &&
        fs::exists(fs::path(dir) / "cifar-10-batches-bin")) {
      dir = (fs::path(dir) / "cifar-10-batches-bin").string();
    }
    for (const std::string& name : names) {
      const std::string file = (fs::path(dir) / name).string();
      if (!fs::exists(file)) {
        std::string all;
        for (const auto& n : names) all += (all.empty() ? "" : ", ") + n;
        throw DataError(file + ": missing; the " + Name(split) + " split needs " + all + " in " +
                        dir);
      }
      AppendRecords(file, ReadWholeFile(file));
    }
  } else {
    const auto members = ReadArchiveMembers(path, names);
    for (const std::string& name : names) AppendRecords(path + ": " + name, members.at(name));
  }
}

void Cifar10Dataset::AppendRecords(const std::string& name, const std::vector<uint8_t>& bytes) {
  const int64_t size = static_cast<int64_t>(bytes.size());
  if (size == 0) throw DataError(name + ": empty file, expected 3073-byte CIFAR-10 records");
  if (size % kRecordBytes != 0) {
    const int64_t whole = size / kRecordBytes;
    throw DataError(name + ": truncated or wrong record size: " + std::to_string(size) +
                    " bytes is not a whole number of 3073-byte records (1 label + 3072 pixels); "
                    "record " +
                    std::to_string(whole) + " at byte offset " +
                    std::to_string(whole * kRecordBytes) + " has only " +
                    std::to_string(size - whole * kRecordBytes) + " bytes");
  }
  const int64_t records = size / kRecordBytes;
  labels_.reserve(labels_.size() + records);
  pixels_.reserve(pixels_.size() + records * (kRecordBytes - 1));
  for (int64_t r = 0; r < records; ++r) {
    const uint8_t* record = bytes.data() + r * kRecordBytes;
    if (record[0] > 9) {
      throw DataError(name + ": record " + std::to_string(r) + " at byte offset " +
                      std::to_string(r * kRecordBytes) + " has label " + std::to_string(record[0]) +
                      "; CIFAR-10 labels are 0-9 (is this the CIFAR-100 or the Python version?)");
    }
    labels_.push_back(record[0]);
    pixels_.insert(pixels_.end(), record + 1, record + kRecordBytes);
  }
}

void Cifar10Dataset::Read(int64_t index, uint8_t* chw) const {
  if (index < 0 || index >= size()) {
    throw std::out_of_range("cifar10: index " + std::to_string(index) + " outside [0, " +
                            std::to_string(size()) + ")");
  }
  // The record's pixels are already planar R, G, B: CHW.
  std::copy_n(pixels_.data() + index * (kRecordBytes - 1), kRecordBytes - 1, chw);
}

std::vector<std::string> Cifar10Dataset::class_names() const {
  return {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"};
}

std::string Cifar10Dataset::Origin(int64_t index) const {
  return "record " + std::to_string(index) + " of " + source_;
}

std::string Cifar10Dataset::Describe() const {
  return "cifar10: " + std::to_string(size()) + " images of 32x32 from " + source_;
}

ImageFolderDataset::ImageFolderDataset(const std::string& path, int image_size, int channels)
    : path_(path), image_size_(image_size), channels_(channels) {
  if (!fs::is_directory(path)) throw DataError(path + ": no such directory");
  std::vector<std::string> files;
  for (const auto& entry : fs::recursive_directory_iterator(path)) {
    if (!entry.is_regular_file()) continue;
    std::string ext = entry.path().extension().string();
    for (char& c : ext) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (ext == ".png" || ext == ".jpg" || ext == ".jpeg") files.push_back(entry.path().string());
  }
  if (files.empty()) throw DataError(path + ": no PNG or JPEG images found (searched recursively)");
  std::sort(files.begin(), files.end());
  // Classes: the first-level subfolders that hold images, by name.
  std::vector<std::string> subfolder(files.size());
  for (std::size_t i = 0; i < files.size(); ++i) {
    const fs::path relative = fs::path(files[i]).lexically_relative(path);
    if (std::distance(relative.begin(), relative.end()) > 1) {
      subfolder[i] = relative.begin()->string();
      classes_.push_back(subfolder[i]);
    }
  }
  std::sort(classes_.begin(), classes_.end());
  classes_.erase(std::unique(classes_.begin(), classes_.end()), classes_.end());
  for (const std::string& name : subfolder) {
    labels_.push_back(
        name.empty() ? -1
                     : static_cast<int>(std::lower_bound(classes_.begin(), classes_.end(), name) -
                                        classes_.begin()));
  }
  files_ = files;
  const int64_t image_bytes = static_cast<int64_t>(channels) * image_size * image_size;
  pixels_.resize(files.size() * image_bytes);
  std::vector<uint8_t> resized(image_bytes);
  for (std::size_t i = 0; i < files.size(); ++i) {
    int width = 0, height = 0, file_channels = 0;
    std::unique_ptr<stbi_uc, void (*)(void*)> decoded(
        stbi_load(files[i].c_str(), &width, &height, &file_channels, channels), stbi_image_free);
    if (!decoded) {
      throw DataError(files[i] + ": cannot decode image: " + stbi_failure_reason());
    }
    // Centre crop to a square, then resize (stb's default filter: Mitchell down, cubic up).
    const int side = std::min(width, height);
    const stbi_uc* crop =
        decoded.get() +
        (static_cast<int64_t>((height - side) / 2) * width + (width - side) / 2) * channels;
    if (side == image_size) {
      // Already the size: the pixels as stored (stb's filter is not the identity at scale 1,
      // and FID of sample files must see the files' pixels).
      for (int row = 0; row < side; ++row) {
        std::copy_n(crop + static_cast<int64_t>(row) * width * channels,
                    static_cast<int64_t>(side) * channels,
                    resized.data() + static_cast<int64_t>(row) * side * channels);
      }
    } else if (!stbir_resize_uint8(crop, side, side, width * channels, resized.data(), image_size,
                                   image_size, 0, channels)) {
      throw DataError(files[i] + ": cannot resize " + std::to_string(width) + "x" +
                      std::to_string(height) + " to " + std::to_string(image_size));
    }
    uint8_t* out = pixels_.data() + i * image_bytes;
    const int64_t plane = static_cast<int64_t>(image_size) * image_size;
    for (int64_t p = 0; p < plane; ++p) {
      for (int c = 0; c < channels; ++c) out[c * plane + p] = resized[p * channels + c];
    }
    if ((i + 1) % 10000 == 0) {
      LogInfo("folder: decoded %zu/%zu images\n", i + 1, files.size());
    }
  }
  count_ = static_cast<int64_t>(files.size());
}

void ImageFolderDataset::Read(int64_t index, uint8_t* chw) const {
  if (index < 0 || index >= count_) {
    throw std::out_of_range("folder: index " + std::to_string(index) + " outside [0, " +
                            std::to_string(count_) + ")");
  }
  const int64_t image_bytes = static_cast<int64_t>(channels_) * image_size_ * image_size_;
  std::copy_n(pixels_.data() + index * image_bytes, image_bytes, chw);
}

std::string ImageFolderDataset::Describe() const {
  return "folder: " + std::to_string(count_) + " images from " + path_ + ", centre-cropped to " +
         std::to_string(image_size_) + "x" + std::to_string(image_size_);
}

void CheckLabels(const ImageDataset& data, int num_classes) {
  if (data.num_classes() != num_classes) {
    throw ConfigError("model.num_classes: " + std::to_string(num_classes) + ", but the data (" +
                      data.Describe() + ") has " + std::to_string(data.num_classes()) + " classes" +
                      (data.num_classes() == 0 ? " (it is unlabelled; a folder's classes are its "
                                                 "first-level subfolders)"
                                               : ""));
  }
  for (int64_t i = 0; i < data.size(); ++i) {
    const int label = data.label(i);
    if (label < 0 || label >= num_classes) {
      throw DataError(data.Origin(i) + ": " +
                      (label < 0 ? std::string("has no class (it is not in a class subfolder)")
                                 : "has class " + std::to_string(label) + ", outside [0, " +
                                       std::to_string(num_classes) + ")") +
                      "; a class-conditional model trains on labelled images only");
    }
  }
}

std::unique_ptr<ImageDataset> MakeDataset(const Config& config) {
  switch (config.data.dataset) {
    case DatasetKind::kCifar10:
      return std::make_unique<Cifar10Dataset>(config.data.path, config.data.split);
    case DatasetKind::kFolder:
      return std::make_unique<ImageFolderDataset>(config.data.path, config.model.image_size,
                                                  config.model.in_channels);
    case DatasetKind::kShapes:
      if (config.model.in_channels != 3) {
        throw ConfigError(
            "config: data.dataset: shapes makes 3-channel images, but "
            "model.in_channels is " +
            std::to_string(config.model.in_channels));
      }
      return std::make_unique<ShapesDataset>(config.data.shapes_size, config.model.image_size,
                                             config.train.seed);
  }
  throw ConfigError("config: data.dataset: unknown dataset");
}

EpochSampler::EpochSampler(int64_t dataset_size, uint64_t seed, DataCursor cursor)
    : size_(dataset_size), seed_(seed), cursor_(cursor) {
  CheckCursor(dataset_size, cursor);
  order_ = Permutation(cursor_.epoch);
}

void EpochSampler::CheckCursor(int64_t dataset_size, DataCursor cursor) {
  if (dataset_size < 1) throw std::invalid_argument("sampler: the dataset is empty");
  if (cursor.offset < 0 || cursor.offset > dataset_size || cursor.epoch < 0) {
    throw std::invalid_argument("sampler: cursor (epoch " + std::to_string(cursor.epoch) +
                                ", offset " + std::to_string(cursor.offset) +
                                ") is outside a dataset of " + std::to_string(dataset_size));
  }
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

std::vector<int64_t> EpochSampler::Next(int64_t count, std::vector<uint8_t>* flips) {
  std::vector<int64_t> out;
  out.reserve(count);
  if (flips != nullptr) flips->clear();
  while (static_cast<int64_t>(out.size()) < count) {
    if (cursor_.offset == size_) {
      ++cursor_.epoch;
      cursor_.offset = 0;
      order_ = Permutation(cursor_.epoch);
    }
    if (flips != nullptr) {
      // A coin of its own per (seed, epoch, position): the same wherever the sample lands.
      SplitMix64 coin((seed_ ^ 0x6a09e667f3bcc909ULL) * 0x9e3779b97f4a7c15ULL +
                      static_cast<uint64_t>(cursor_.epoch) * 0xbf58476d1ce4e5b9ULL +
                      static_cast<uint64_t>(cursor_.offset));
      flips->push_back(static_cast<uint8_t>(coin.Next() & 1));
    }
    out.push_back(order_[cursor_.offset++]);
  }
  return out;
}

std::vector<uint8_t> ReadBatch(const ImageDataset& dataset, const std::vector<int64_t>& indices,
                               const std::vector<uint8_t>& flips) {
  if (!flips.empty() && flips.size() != indices.size()) {
    throw std::invalid_argument("ReadBatch: " + std::to_string(flips.size()) + " flips for " +
                                std::to_string(indices.size()) + " images");
  }
  const int size = dataset.image_size();
  const int64_t image_bytes = static_cast<int64_t>(dataset.channels()) * size * size;
  std::vector<uint8_t> out(indices.size() * image_bytes);
  for (std::size_t i = 0; i < indices.size(); ++i) {
    uint8_t* image = out.data() + i * image_bytes;
    dataset.Read(indices[i], image);
    if (!flips.empty() && flips[i] != 0) {
      for (int64_t row = 0; row < image_bytes / size; ++row) {
        std::reverse(image + row * size, image + (row + 1) * size);
      }
    }
  }
  return out;
}

DataShard DataShard::Of(int64_t global_batch, int rank, int world_size) {
  if (world_size < 1 || rank < 0 || rank >= world_size || global_batch % world_size != 0) {
    throw std::invalid_argument("data shard: a global batch of " + std::to_string(global_batch) +
                                " does not split into " + std::to_string(world_size) +
                                " equal shards (rank " + std::to_string(rank) + ")");
  }
  const int64_t per_rank = global_batch / world_size;
  return DataShard{global_batch, rank * per_rank, per_rank};
}

BatchLoader::BatchLoader(const ImageDataset& dataset, DataShard shard, bool flip, uint64_t seed,
                         DataCursor start, int prefetch)
    : dataset_(dataset),
      shard_(shard),
      flip_(flip),
      seed_(seed),
      prefetch_(static_cast<std::size_t>(std::max(1, prefetch))) {
  if (shard.global_batch < 1 || shard.first < 0 || shard.count < 1 ||
      shard.first + shard.count > shard.global_batch) {
    throw std::invalid_argument("BatchLoader: shard [" + std::to_string(shard.first) + ", " +
                                std::to_string(shard.first + shard.count) +
                                ") is not inside a global batch of " +
                                std::to_string(shard.global_batch));
  }
  // Check the start state here, so that a bad cursor fails in the caller's thread.
  EpochSampler::CheckCursor(dataset.size(), start);
  thread_ = std::thread([this, start] { Run(start); });
}

BatchLoader::~BatchLoader() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  changed_.notify_all();
  thread_.join();
}

void BatchLoader::Run(DataCursor start) {
  try {
    EpochSampler sampler(dataset_.size(), seed_, start);
    std::vector<uint8_t> flips;
    while (true) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        changed_.wait(lock, [&] { return stop_ || ready_.size() < prefetch_; });
        if (stop_) return;
      }
      // Every rank walks the whole global batch's order and reads only its own slice.
      std::vector<int64_t> indices = sampler.Next(shard_.global_batch, flip_ ? &flips : nullptr);
      const auto first = static_cast<std::ptrdiff_t>(shard_.first);
      const auto last = first + static_cast<std::ptrdiff_t>(shard_.count);
      indices = std::vector<int64_t>(indices.begin() + first, indices.begin() + last);
      if (flip_) flips = std::vector<uint8_t>(flips.begin() + first, flips.begin() + last);
      LoadedBatch batch;
      batch.pixels = ReadBatch(dataset_, indices, flips);
      batch.labels.reserve(indices.size());
      for (int64_t index : indices) batch.labels.push_back(dataset_.label(index));
      batch.count = shard_.count;
      batch.after = sampler.cursor();
      {
        std::lock_guard<std::mutex> lock(mutex_);
        ready_.push_back(std::move(batch));
      }
      changed_.notify_all();
    }
  } catch (...) {
    std::lock_guard<std::mutex> lock(mutex_);
    error_ = std::current_exception();
    changed_.notify_all();
  }
}

LoadedBatch BatchLoader::Next() {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [&] { return !ready_.empty() || error_; });
  if (ready_.empty()) std::rethrow_exception(error_);
  LoadedBatch batch = std::move(ready_.front());
  ready_.pop_front();
  lock.unlock();
  changed_.notify_all();
  return batch;
}

}  // namespace ddpm
