// Training images: the dataset interface, the built-in shapes dataset, and the epoch sampler.
// Torch-free: images are uint8 CHW buffers.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "base/random.h"
#include "config/config.h"

namespace ddpm {

/// Bad training data: the message names the file and the byte offset or record.
class DataError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

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
  /// Classes of a labelled dataset; 0 for an unlabelled one.
  virtual int num_classes() const { return 0; }
  /// The class of image index, in [0, num_classes()); -1 for an image without one.
  virtual int label(int64_t index) const {
    (void)index;
    return -1;
  }
  /// Each class's name, in label order.
  virtual std::vector<std::string> class_names() const { return {}; }
  /// Where image index comes from, for messages ("record 17 of data_batch_2.bin", a file).
  virtual std::string Origin(int64_t index) const { return "image " + std::to_string(index); }
};

/// Coloured circles, squares and triangles on plain backgrounds. Image i depends only on
/// (seed, i), so the dataset is the same on every machine. Its classes are the shape kinds:
/// 0 circle, 1 square, 2 triangle.
class ShapesDataset : public ImageDataset {
 public:
  ShapesDataset(int64_t size, int image_size, uint64_t seed);
  int64_t size() const override { return size_; }
  int image_size() const override { return image_size_; }
  int channels() const override { return 3; }
  void Read(int64_t index, uint8_t* chw) const override;
  std::string Describe() const override;
  int num_classes() const override { return 3; }
  int label(int64_t index) const override;
  std::vector<std::string> class_names() const override { return {"circle", "square", "triangle"}; }

 private:
  int64_t size_;
  int image_size_;
  uint64_t seed_;
};

/// CIFAR-10 in its official binary form: records of 1 label byte and 3072 pixel bytes (the R, G
/// and B planes of a 32x32 image), from cifar-10-binary.tar.gz or the extracted .bin files.
class Cifar10Dataset : public ImageDataset {
 public:
  /// Bytes per record: the label and a 3 x 32 x 32 image.
  static constexpr int64_t kRecordBytes = 1 + 3 * 32 * 32;

  /// Reads the split from path: the .tar.gz archive, or a folder holding the .bin files (or
  /// holding cifar-10-batches-bin/ with them). Throws DataError naming the file and offset.
  Cifar10Dataset(const std::string& path, CifarSplit split);
  int64_t size() const override { return static_cast<int64_t>(labels_.size()); }
  int image_size() const override { return 32; }
  int channels() const override { return 3; }
  void Read(int64_t index, uint8_t* chw) const override;
  std::string Describe() const override;
  /// The class (0-9) of image index.
  int label(int64_t index) const override { return labels_.at(index); }
  int num_classes() const override { return 10; }
  std::vector<std::string> class_names() const override;
  std::string Origin(int64_t index) const override;
  /// The file names a split reads, in order.
  static std::vector<std::string> FileNames(CifarSplit split);

 private:
  void AppendRecords(const std::string& name, const std::vector<uint8_t>& bytes);

  std::string source_;
  std::vector<uint8_t> labels_;
  std::vector<uint8_t> pixels_;
};

/// Every PNG and JPEG under a folder (recursively, in sorted path order), centre-cropped to a
/// square and resized to image_size. Decoded once, up front, so a bad file fails at start. Its
/// classes are its first-level subfolders in sorted name order (an image directly in the
/// folder has none).
class ImageFolderDataset : public ImageDataset {
 public:
  ImageFolderDataset(const std::string& path, int image_size, int channels);
  int64_t size() const override { return count_; }
  int image_size() const override { return image_size_; }
  int channels() const override { return channels_; }
  void Read(int64_t index, uint8_t* chw) const override;
  std::string Describe() const override;
  int num_classes() const override { return static_cast<int>(classes_.size()); }
  int label(int64_t index) const override { return labels_.at(index); }
  std::vector<std::string> class_names() const override { return classes_; }
  std::string Origin(int64_t index) const override { return files_.at(index); }

 private:
  std::vector<std::string> files_;
  std::vector<std::string> classes_;
  std::vector<int> labels_;
  std::string path_;
  int image_size_;
  int channels_;
  int64_t count_ = 0;
  std::vector<uint8_t> pixels_;
};

/// Builds the dataset that config names, for images of model.image_size and model.in_channels.
std::unique_ptr<ImageDataset> MakeDataset(const Config& config);

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
  /// Throws std::invalid_argument unless cursor is a position in a dataset of dataset_size.
  static void CheckCursor(int64_t dataset_size, DataCursor cursor);
  /// The next count indices, rolling into the next epoch as needed. With flips, also each
  /// sample's horizontal-flip coin, a function of (seed, epoch, position in the epoch) alone.
  std::vector<int64_t> Next(int64_t count, std::vector<uint8_t>* flips = nullptr);
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

/// Reads the images at indices into one uint8 NCHW buffer, flipping image i horizontally when
/// flips[i] is set; empty flips flip nothing.
std::vector<uint8_t> ReadBatch(const ImageDataset& dataset, const std::vector<int64_t>& indices,
                               const std::vector<uint8_t>& flips = {});

/// Which slice of each global batch one rank reads: [first, first + count).
struct DataShard {
  int64_t global_batch = 1;
  int64_t first = 0;
  int64_t count = 1;

  /// Rank's contiguous, equal slice of a global batch split over world_size ranks; throws
  /// std::invalid_argument if it does not divide.
  static DataShard Of(int64_t global_batch, int rank, int world_size);
};

/// The labels a conditional model trains on: checks that data has exactly num_classes classes
/// and that every image has one; throws ConfigError (the counts differ) or DataError (naming
/// the first image without a class).
void CheckLabels(const ImageDataset& data, int num_classes);

/// One batch from the loader: uint8 NCHW pixels, each image's class (-1: none) and the
/// sampler's cursor right after it.
struct LoadedBatch {
  std::vector<uint8_t> pixels;
  std::vector<int64_t> labels;
  int64_t count = 0;
  DataCursor after;
};

/// Prepares batches on a background thread, prefetch ahead of the consumer. Every rank walks
/// the same global order, seeded by (seed, epoch), and reads its shard of each global batch, so
/// the shards of one step are disjoint and together cover the global batch.
class BatchLoader {
 public:
  BatchLoader(const ImageDataset& dataset, DataShard shard, bool flip, uint64_t seed,
              DataCursor start, int prefetch);
  /// Stops and joins the thread.
  ~BatchLoader();
  BatchLoader(const BatchLoader&) = delete;
  BatchLoader& operator=(const BatchLoader&) = delete;
  /// The next batch; blocks until it is ready. Rethrows an error of the loading thread.
  LoadedBatch Next();

 private:
  void Run(DataCursor start);

  const ImageDataset& dataset_;
  const DataShard shard_;
  const bool flip_;
  const uint64_t seed_;
  const std::size_t prefetch_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<LoadedBatch> ready_;
  std::exception_ptr error_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace ddpm
