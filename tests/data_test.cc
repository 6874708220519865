// Dataset readers against small files written here in the real formats, and the loader.
#include "trainer/data.h"

#include <archive.h>
#include <archive_entry.h>
#include <gtest/gtest.h>
#include <stb/stb_image_write.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <filesystem>
#include <fstream>
#include <numeric>

namespace ddpm {
namespace {

namespace fs = std::filesystem;

class TempDir {
 public:
  TempDir()
      : path_(fs::temp_directory_path() /
              ("ddpm_data_" + std::to_string(getpid()) + "_" + std::to_string(counter_++))) {
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }
  std::string str() const { return path_.string(); }

 private:
  static inline int counter_ = 0;
  fs::path path_;
};

// CIFAR-10 records: label (i % 10), then pixel p of image i in plane c = (i * 7 + c * 3 + p) % 256.
std::vector<uint8_t> CifarRecords(int first, int count) {
  std::vector<uint8_t> bytes;
  for (int i = first; i < first + count; ++i) {
    bytes.push_back(static_cast<uint8_t>(i % 10));
    for (int c = 0; c < 3; ++c) {
      for (int p = 0; p < 1024; ++p)
        bytes.push_back(static_cast<uint8_t>((i * 7 + c * 3 + p) % 256));
    }
  }
  return bytes;
}

void WriteFile(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

// Five training batches of 3 records each (images 0..14), as the official names.
void WriteCifarFolder(const std::string& dir) {
  fs::create_directories(dir);
  for (int b = 0; b < 5; ++b) {
    WriteFile(dir + "/data_batch_" + std::to_string(b + 1) + ".bin", CifarRecords(3 * b, 3));
  }
  WriteFile(dir + "/test_batch.bin", CifarRecords(100, 2));
}

// A gzipped tar of every file in dir under cifar-10-batches-bin/, written with libarchive.
void WriteCifarArchive(const std::string& dir, const std::string& archive_path) {
  archive* writer = archive_write_new();
  archive_write_add_filter_gzip(writer);
  archive_write_set_format_pax_restricted(writer);
  ASSERT_EQ(archive_write_open_filename(writer, archive_path.c_str()), ARCHIVE_OK);
  for (const auto& file : fs::directory_iterator(dir)) {
    std::ifstream in(file.path(), std::ios::binary);
    const std::vector<char> bytes((std::istreambuf_iterator<char>(in)),
                                  std::istreambuf_iterator<char>());
    archive_entry* entry = archive_entry_new();
    archive_entry_set_pathname(entry,
                               ("cifar-10-batches-bin/" + file.path().filename().string()).c_str());
    archive_entry_set_size(entry, static_cast<la_int64_t>(bytes.size()));
    archive_entry_set_filetype(entry, AE_IFREG);
    archive_entry_set_perm(entry, 0644);
    archive_write_header(writer, entry);
    archive_write_data(writer, bytes.data(), bytes.size());
    archive_entry_free(entry);
  }
  archive_write_close(writer);
  archive_write_free(writer);
}

std::string ErrorOf(const std::function<void()>& f) {
  try {
    f();
  } catch (const DataError& e) {
    return e.what();
  }
  return "";
}

void ExpectCifarContent(const Cifar10Dataset& data, int first) {
  std::vector<uint8_t> image(3072);
  for (int64_t i = 0; i < data.size(); ++i) {
    data.Read(i, image.data());
    const int source = first + static_cast<int>(i);
    EXPECT_EQ(data.label(i), source % 10);
    EXPECT_EQ(image[0], (source * 7) % 256) << i;                       // R plane, pixel 0
    EXPECT_EQ(image[1024 + 5], (source * 7 + 3 + 5) % 256) << i;        // G plane, pixel 5
    EXPECT_EQ(image[2048 + 1023], (source * 7 + 6 + 1023) % 256) << i;  // B plane, last pixel
  }
}

TEST(Cifar10, ReadsTheExtractedBinFilesInOrder) {
  TempDir dir;
  WriteCifarFolder(dir / "cifar-10-batches-bin");
  // Either the batches folder itself or its parent.
  for (const std::string& path : {dir / "cifar-10-batches-bin", dir.str()}) {
    Cifar10Dataset train(path, CifarSplit::kTrain);
    ASSERT_EQ(train.size(), 15);
    ExpectCifarContent(train, 0);
  }
  Cifar10Dataset test(dir.str(), CifarSplit::kTest);
  ASSERT_EQ(test.size(), 2);
  ExpectCifarContent(test, 100);
}

TEST(Cifar10, ReadsTheTarGzArchive) {
  TempDir dir;
  WriteCifarFolder(dir / "batches");
  WriteCifarArchive(dir / "batches", dir / "cifar-10-binary.tar.gz");
  Cifar10Dataset train(dir / "cifar-10-binary.tar.gz", CifarSplit::kTrain);
  ASSERT_EQ(train.size(), 15);
  ExpectCifarContent(train, 0);
}

TEST(Cifar10, TruncatedFileNamesTheFileRecordAndOffset) {
  TempDir dir;
  WriteCifarFolder(dir.str());
  std::vector<uint8_t> bytes = CifarRecords(6, 3);
  bytes.resize(bytes.size() - 100);
  WriteFile(dir / "data_batch_3.bin", bytes);
  const std::string error = ErrorOf([&] { Cifar10Dataset(dir.str(), CifarSplit::kTrain); });
  EXPECT_NE(error.find("data_batch_3.bin"), std::string::npos) << error;
  EXPECT_NE(error.find("record 2 at byte offset 6146"), std::string::npos) << error;
  EXPECT_NE(error.find("has only 2973 bytes"), std::string::npos) << error;
}

TEST(Cifar10, WrongRecordSizeIsRefused) {
  // 3072-byte records (no label byte) are the commonest mistake.
  TempDir dir;
  WriteCifarFolder(dir.str());
  WriteFile(dir / "data_batch_1.bin", std::vector<uint8_t>(2 * 3072, 1));
  const std::string error = ErrorOf([&] { Cifar10Dataset(dir.str(), CifarSplit::kTrain); });
  EXPECT_NE(error.find("data_batch_1.bin: truncated or wrong record size"), std::string::npos)
      << error;
}

TEST(Cifar10, BadLabelNamesTheRecord) {
  TempDir dir;
  WriteCifarFolder(dir.str());
  std::vector<uint8_t> bytes = CifarRecords(0, 3);
  bytes[3073] = 42;
  WriteFile(dir / "data_batch_1.bin", bytes);
  const std::string error = ErrorOf([&] { Cifar10Dataset(dir.str(), CifarSplit::kTrain); });
  EXPECT_NE(error.find("record 1 at byte offset 3073 has label 42"), std::string::npos) << error;
}

TEST(Cifar10, MissingAndEmptyFilesAreNamed) {
  TempDir dir;
  WriteCifarFolder(dir.str());
  fs::remove(dir / "data_batch_4.bin");
  std::string error = ErrorOf([&] { Cifar10Dataset(dir.str(), CifarSplit::kTrain); });
  EXPECT_NE(error.find("data_batch_4.bin: missing"), std::string::npos) << error;
  WriteFile(dir / "data_batch_4.bin", {});
  error = ErrorOf([&] { Cifar10Dataset(dir.str(), CifarSplit::kTrain); });
  EXPECT_NE(error.find("data_batch_4.bin: empty file"), std::string::npos) << error;
  error = ErrorOf([&] { Cifar10Dataset(dir / "nope.tar.gz", CifarSplit::kTrain); });
  EXPECT_NE(error.find("nope.tar.gz: no such file"), std::string::npos) << error;
}

TEST(Cifar10, TruncatedArchiveIsAnErrorNotAShortDataset) {
  TempDir dir;
  WriteCifarFolder(dir / "batches");
  WriteCifarArchive(dir / "batches", dir / "full.tar.gz");
  std::ifstream in(dir / "full.tar.gz", std::ios::binary);
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)),
                             std::istreambuf_iterator<char>());
  bytes.resize(bytes.size() / 2);
  WriteFile(dir / "half.tar.gz", bytes);
  const std::string error =
      ErrorOf([&] { Cifar10Dataset(dir / "half.tar.gz", CifarSplit::kTrain); });
  EXPECT_NE(error.find("half.tar.gz"), std::string::npos) << error;
  EXPECT_FALSE(error.empty());
}

void WritePng(const std::string& path, int width, int height, int channels, uint8_t value) {
  std::vector<uint8_t> pixels(static_cast<std::size_t>(width) * height * channels, value);
  // A distinct left half, so cropping shows.
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width / 2; ++x) pixels[(y * width + x) * channels] = 0;
  }
  ASSERT_NE(stbi_write_png(path.c_str(), width, height, channels, pixels.data(), width * channels),
            0);
}

TEST(ImageFolder, ReadsCropsAndResizesPngs) {
  TempDir dir;
  fs::create_directories(dir / "sub");
  WritePng(dir / "b.png", 64, 64, 3, 200);
  WritePng(dir / "sub/a.PNG", 96, 48, 3, 100);  // wide: centre crop to 48x48
  WritePng(dir / "c.png", 16, 16, 1, 50);       // grey: expanded to RGB
  std::ofstream(dir / "notes.txt") << "ignored";
  ImageFolderDataset data(dir.str(), 16, 3);
  ASSERT_EQ(data.size(), 3);
  std::vector<uint8_t> image(3 * 16 * 16);
  // Sorted paths: b.png, c.png, sub/a.PNG.
  data.Read(0, image.data());
  EXPECT_EQ(image[256 + 8 * 16 + 8], 200) << "G channel of b.png";
  EXPECT_LT(image[8 * 16 + 1], 20) << "R of b.png's left half is 0";
  data.Read(1, image.data());
  EXPECT_EQ(image[2 * 256 + 5], image[5]) << "grey expanded to equal channels";
  data.Read(2, image.data());
  // The 96x48 image's centre 48x48 spans x in [24, 72): its left third (24..47) is red-free.
  EXPECT_LT(image[8 * 16 + 2], 20);
  EXPECT_GT(image[8 * 16 + 14], 80);
}

TEST(ImageFolder, AnImageOfTheTargetSizeIsReadAsStoredNotResampled) {
  // Noise pixels, which any resampling filter would change: FID of sample files must see the
  // files' own pixels.
  TempDir dir;
  std::vector<uint8_t> pixels(16 * 16 * 3);
  for (std::size_t i = 0; i < pixels.size(); ++i) pixels[i] = static_cast<uint8_t>(i * 97 % 251);
  ASSERT_NE(stbi_write_png((dir / "n.png").c_str(), 16, 16, 3, pixels.data(), 16 * 3), 0);
  ImageFolderDataset data(dir.str(), 16, 3);
  std::vector<uint8_t> chw(3 * 16 * 16);
  data.Read(0, chw.data());
  for (int p = 0; p < 256; ++p) {
    for (int c = 0; c < 3; ++c) ASSERT_EQ(chw[c * 256 + p], pixels[p * 3 + c]) << p << " " << c;
  }
}

TEST(ImageFolder, EmptyMissingAndCorruptAreNamed) {
  TempDir dir;
  std::string error = ErrorOf([&] { ImageFolderDataset(dir.str(), 16, 3); });
  EXPECT_NE(error.find("no PNG or JPEG images found"), std::string::npos) << error;
  error = ErrorOf([&] { ImageFolderDataset(dir / "absent", 16, 3); });
  EXPECT_NE(error.find("absent: no such directory"), std::string::npos) << error;
  std::ofstream(dir / "broken.jpg") << "not really a jpeg";
  error = ErrorOf([&] { ImageFolderDataset(dir.str(), 16, 3); });
  EXPECT_NE(error.find("broken.jpg: cannot decode image"), std::string::npos) << error;
}

TEST(Loader, BatchesDependOnlyOnSeedAndState) {
  ShapesDataset data(50, 16, 1);
  auto take = [&](DataCursor start, int batches) {
    BatchLoader loader(data, DataShard::Of(8, 0, 1), true, 9, start, 2);
    std::vector<LoadedBatch> out;
    for (int i = 0; i < batches; ++i) out.push_back(loader.Next());
    return out;
  };
  const auto a = take(DataCursor{}, 10);  // 80 images: crosses into epoch 1
  const auto b = take(DataCursor{}, 10);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(a[i].pixels, b[i].pixels) << i;
  EXPECT_EQ(a[9].after.epoch, 1);
  EXPECT_EQ(a[9].after.offset, 30);
  // Resuming from the state after batch 3 gives batches 4.. again.
  const auto resumed = take(a[3].after, 6);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(resumed[i].pixels, a[4 + i].pixels) << i;
  // Without flips, the first batch is the first 8 images of the (seed, epoch 0) permutation.
  const auto order = EpochSampler(50, 9).Permutation(0);
  BatchLoader plain(data, DataShard::Of(8, 0, 1), false, 9, DataCursor{}, 2);
  EXPECT_EQ(plain.Next().pixels,
            ReadBatch(data, std::vector<int64_t>(order.begin(), order.begin() + 8)));
}

TEST(Loader, ReadErrorsReachTheCaller) {
  // A dataset whose image 3 cannot be read.
  class Failing : public ShapesDataset {
   public:
    Failing() : ShapesDataset(10, 8, 0) {}
    void Read(int64_t index, uint8_t* chw) const override {
      if (index == 3) throw DataError("failing: image 3 is unreadable");
      ShapesDataset::Read(index, chw);
    }
  } data;
  BatchLoader loader(data, DataShard::Of(10, 0, 1), false, 0, DataCursor{}, 1);
  EXPECT_THROW(loader.Next(), DataError);
}

TEST(Labels, ShapesLabelsAreTheKindDrawnAsABoundingBoxFillRatioJudgesIt) {
  // An independent judge of the kind: the share of the shape's bounding box that it fills is
  // pi/4 for a circle, 1 for a square and 1/2 for an upright triangle.
  const ShapesDataset data(90, 32, 7);
  EXPECT_EQ(data.num_classes(), 3);
  EXPECT_EQ(data.class_names(), (std::vector<std::string>{"circle", "square", "triangle"}));
  std::vector<uint8_t> image(3 * 32 * 32);
  int agree = 0;
  std::array<int, 3> seen{};
  for (int64_t i = 0; i < data.size(); ++i) {
    data.Read(i, image.data());
    const auto differs = [&](int p) {
      for (int c = 0; c < 3; ++c) {
        if (image[c * 1024 + p] != image[c * 1024]) return true;  // the corner is background
      }
      return false;
    };
    int filled = 0, x0 = 32, x1 = -1, y0 = 32, y1 = -1;
    for (int p = 0; p < 1024; ++p) {
      if (!differs(p)) continue;
      ++filled;
      x0 = std::min(x0, p % 32), x1 = std::max(x1, p % 32);
      y0 = std::min(y0, p / 32), y1 = std::max(y1, p / 32);
    }
    const double ratio = filled / static_cast<double>((x1 - x0 + 1) * (y1 - y0 + 1));
    const int judged = ratio > 0.9 ? 1 : (ratio > 0.64 ? 0 : 2);
    agree += judged == data.label(i);
    ++seen[data.label(i)];
  }
  EXPECT_GE(agree, 85) << "of 90 images";
  for (int kind = 0; kind < 3; ++kind) EXPECT_GT(seen[kind], 15) << kind;
  EXPECT_THROW(data.label(90), std::out_of_range);
}

TEST(Labels, AFoldersClassesAreItsSubfoldersAndAnImageWithoutOneIsNamed) {
  TempDir dir;
  fs::create_directories(dir / "dogs");
  fs::create_directories(dir / "cats/kittens");
  WritePng(dir / "dogs/1.png", 16, 16, 3, 10);
  WritePng(dir / "cats/2.png", 16, 16, 3, 20);
  WritePng(dir / "cats/kittens/3.png", 16, 16, 3, 30);  // still a cat: the first level counts
  {
    const ImageFolderDataset data(dir.str(), 16, 3);
    EXPECT_EQ(data.class_names(), (std::vector<std::string>{"cats", "dogs"}));
    // Sorted paths: cats/2.png, cats/kittens/3.png, dogs/1.png.
    EXPECT_EQ(data.label(0), 0);
    EXPECT_EQ(data.label(1), 0);
    EXPECT_EQ(data.label(2), 1);
    EXPECT_NO_THROW(CheckLabels(data, 2));
    try {
      CheckLabels(data, 3);
      ADD_FAILURE() << "3 classes accepted for a folder of 2";
    } catch (const ConfigError& error) {
      EXPECT_NE(std::string(error.what())
                    .find("model.num_classes: 3, but the data (folder: 3 "
                          "images from " +
                          dir.str()),
                std::string::npos)
          << error.what();
      EXPECT_NE(std::string(error.what()).find(") has 2 classes"), std::string::npos);
    }
  }
  WritePng(dir / "loose.png", 16, 16, 3, 40);
  const ImageFolderDataset data(dir.str(), 16, 3);
  EXPECT_EQ(data.label(3), -1);
  try {
    CheckLabels(data, 2);
    ADD_FAILURE() << "an image without a class was accepted";
  } catch (const DataError& error) {
    EXPECT_NE(std::string(error.what()).find(dir / "loose.png" + ": has no class"),
              std::string::npos)
        << error.what();
  }
  // Unlabelled data for a conditional model: named as such.
  const ShapesDataset shapes(4, 8, 0);
  EXPECT_NO_THROW(CheckLabels(shapes, 3));
  TempDir flat;
  WritePng(flat / "a.png", 16, 16, 3, 1);
  try {
    CheckLabels(ImageFolderDataset(flat.str(), 16, 3), 10);
    ADD_FAILURE() << "an unlabelled folder was accepted";
  } catch (const ConfigError& error) {
    EXPECT_NE(std::string(error.what()).find("has 0 classes (it is unlabelled"), std::string::npos)
        << error.what();
  }
}

TEST(Labels, TheLoaderCarriesEachImagesClassWithItsShard) {
  const ShapesDataset data(40, 8, 3);
  for (int rank = 0; rank < 2; ++rank) {
    const DataShard shard = DataShard::Of(8, rank, 2);
    BatchLoader loader(data, shard, /*flip=*/true, /*seed=*/5, {}, 2);
    EpochSampler order(data.size(), 5);
    for (int step = 0; step < 7; ++step) {  // into the second epoch
      const LoadedBatch batch = loader.Next();
      const std::vector<int64_t> global = order.Next(8);
      ASSERT_EQ(batch.labels.size(), 4u);
      for (int k = 0; k < 4; ++k) {
        EXPECT_EQ(batch.labels[k], data.label(global[shard.first + k])) << step << " " << k;
      }
    }
  }
}

}  // namespace
}  // namespace ddpm
