// FID and IS against independent references in Debian's Python (tests/reference/fid_ref.py):
// the Frechet distance and IS against pytorch-fid's formula with scipy.linalg.sqrtm and the
// original 10-split IS; the network against torchvision's Inception3 with FID's block changes,
// on the same random weights; the .npz layout against numpy in both directions; the weights
// file's errors; and FID of a set against itself and against noisier copies.
#include "eval/fid.h"

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "base/sha256.h"
#include "eval/evaluation.h"
#include "eval/inception.h"
#include "test_env.h"
#include "trainer/data.h"
#include "trainer/tensor_io.h"
#include "trainer/trainer.h"

namespace ddpm {
namespace {

namespace fs = std::filesystem;

class FidTest : public ::testing::Test {
 protected:
  void SetUp() override {
    python_ = DDPM_REFERENCE_PYTHON;
    if (std::system(
            (python_ + " -c 'import torch, torchvision, scipy' > /dev/null 2>&1").c_str()) != 0) {
      GTEST_SKIP() << "FID references need " << python_
                   << " with torch, torchvision and scipy (Debian: apt-get install "
                      "python3-torchvision python3-scipy); they cannot run here";
    }
    dir_ = fs::temp_directory_path() /
           ("ddpm-fid-" + std::to_string(getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  // Runs a fid_ref.py command on target; fails the test when it fails.
  void Reference(const std::string& command, const std::string& target) {
    const std::string line = python_ + " " + DDPM_SOURCE_DIR + "/tests/reference/fid_ref.py " +
                             command + " " + target + " > " + (dir_ / "python.log").string() +
                             " 2>&1";
    ASSERT_EQ(std::system(line.c_str()), 0)
        << "fid_ref.py " << command << " failed; see " << (dir_ / "python.log").string();
  }
  std::string python_;
  fs::path dir_;
};

TEST_F(FidTest, FrechetDistanceAndInceptionScoreMatchScipy) {
  Reference("metrics", dir_.string());
  std::map<std::string, torch::Tensor> features = ReadNpz((dir_ / "features.npz").string());
  std::map<std::string, torch::Tensor> expected = ReadNpz((dir_ / "expected.npz").string());
  for (const std::string name : {"d64", "d64_deficient", "d2048", "d2048_deficient"}) {
    SCOPED_TRACE(name);
    const torch::Tensor a = features.at(name + "_a"), b = features.at(name + "_b");
    FeatureMoments moments_a(a.size(1)), moments_b(b.size(1));
    // In uneven chunks, as batches arrive.
    for (int64_t start = 0; start < a.size(0); start += 97)
      moments_a.Add(a.slice(0, start, start + 97));
    moments_b.Add(b);
    if (expected.count(name + "_mu")) {
      EXPECT_TRUE(torch::allclose(moments_a.Mean(), expected.at(name + "_mu"), 1e-12, 1e-12));
      EXPECT_TRUE(
          torch::allclose(moments_a.Covariance(), expected.at(name + "_sigma"), 1e-10, 1e-12));
    }
    const FrechetResult result = FrechetDistance(moments_a.Mean(), moments_a.Covariance(),
                                                 moments_b.Mean(), moments_b.Covariance());
    const double reference = expected.at(name + "_fid").item<double>();
    EXPECT_NEAR(result.fid, reference, 1e-6 * std::abs(reference)) << "scipy: " << reference;
    EXPECT_FALSE(result.regularized);
  }
  for (const std::string name : {"is250", "is1003"}) {
    SCOPED_TRACE(name);
    const torch::Tensor logits = features.at(name + "_logits");
    ScoreMoments moments(logits.size(0), 1008);
    for (int64_t start = 0; start < logits.size(0); start += 64) {
      moments.Add(logits.slice(0, start, start + 64), start);
    }
    const auto [mean, std] = moments.Score();
    const double want_mean = expected.at(name + "_mean").item<double>();
    const double want_std = expected.at(name + "_std").item<double>();
    EXPECT_NEAR(mean, want_mean, 1e-6 * want_mean);
    EXPECT_NEAR(std, want_std, 1e-6 * want_std + 1e-12);
  }
}

TEST_F(FidTest, FrechetDistanceRefusesMismatchedStatisticsAndRegularizesBrokenOnes) {
  const torch::Tensor mu = torch::zeros({3}, torch::kFloat64);
  EXPECT_THROW(FrechetDistance(mu, torch::eye(3, torch::kFloat64),
                               torch::zeros({4}, torch::kFloat64), torch::eye(4, torch::kFloat64)),
               std::invalid_argument);
  // Not a covariance (a negative eigenvalue well beyond rounding): regularized, and said so.
  torch::Tensor broken = torch::eye(3, torch::kFloat64);
  broken[2][2] = -0.5;
  const FrechetResult result = FrechetDistance(mu, broken, mu, torch::eye(3, torch::kFloat64));
  EXPECT_TRUE(result.regularized);
  EXPECT_EQ(result.eps, 1e-6);
  // Identical Gaussians, one of them singular: exactly 0 without any offset.
  torch::Tensor singular = torch::zeros({3, 3}, torch::kFloat64);
  singular[0][0] = 2;
  const FrechetResult same = FrechetDistance(mu, singular, mu, singular);
  EXPECT_NEAR(same.fid, 0, 1e-12);
  EXPECT_FALSE(same.regularized);
}

TEST_F(FidTest, NetworkMatchesTorchvisionInception3WithTheFidBlocks) {
  Reference("network", dir_.string());
  const std::string weights = (dir_ / "inception.pt").string();
  FidInception model = LoadFidInception(weights, torch::kCPU);
  const std::map<std::string, torch::Tensor> expected =
      LoadTensors((dir_ / "expected.pt").string());
  const torch::Tensor images = expected.at("images");
  torch::NoGradGuard no_grad;
  const InceptionOutput out = model->forward(images);
  ASSERT_EQ(out.pool3.sizes(), torch::IntArrayRef({3, 2048}));
  ASSERT_EQ(out.logits.sizes(), torch::IntArrayRef({3, 1008}));
  const double pool_error = (out.pool3 - expected.at("pool3")).abs().max().item<double>();
  const double logit_error = (out.logits - expected.at("logits")).abs().max().item<double>();
  EXPECT_LT(pool_error, 1e-4) << "pool3 max " << expected.at("pool3").abs().max().item<double>();
  EXPECT_LT(logit_error, 1e-4) << "logits max " << expected.at("logits").abs().max().item<double>();
  // The Inception Score of 20 images from the original TF code's logits (pool3 W^T, no bias)
  // and from the fc's output, against NumPy's over the reference network's pool3. A random
  // network scores near 1 (1.0012 and 1.0010 here); the two differ by 2e-4, and each must match
  // to 2e-6, a hundredth of that.
  const double unbiased = expected.at("is_unbiased")[0].item<double>();
  const double biased = expected.at("is_biased")[0].item<double>();
  EXPECT_GT(std::abs(unbiased - biased), 1e-4) << "the fc bias must change the score";
  for (const IsLogits kind : {IsLogits::kUnbiased, IsLogits::kBiased}) {
    InceptionStatistics stats(model, 20, kind);
    const torch::Tensor is_images = expected.at("is_images");
    stats.Add(is_images.slice(0, 0, 7), 0);  // in two batches, as they arrive
    stats.Add(is_images.slice(0, 7, 20), 7);
    const auto [mean, std] = stats.scores().Score();
    const torch::Tensor want =
        expected.at(kind == IsLogits::kUnbiased ? "is_unbiased" : "is_biased");
    EXPECT_NEAR(mean, want[0].item<double>(), 2e-6) << Name(kind);
    EXPECT_NEAR(std, want[1].item<double>(), 2e-6) << Name(kind);
  }
  // The hash recorded with results is the file's SHA-256, as sha256sum computes it.
  const std::string command = "sha256sum " + weights + " > " + (dir_ / "sum.txt").string();
  ASSERT_EQ(std::system(command.c_str()), 0);
  std::ifstream sum(dir_ / "sum.txt");
  std::string want;
  sum >> want;
  EXPECT_EQ(Sha256File(weights), want);
}

TEST_F(FidTest, WeightsFileErrorsNameTheProblemAndTheFix) {
  auto message = [](const std::string& path) {
    try {
      LoadFidInception(path, torch::kCPU);
    } catch (const std::exception& error) {
      return std::string(error.what());
    }
    return std::string("(loaded)");
  };
  const std::string missing = (dir_ / "pt_inception.pth").string();
  EXPECT_NE(message(missing).find(missing + ": no such Inception weights file"), std::string::npos);
  EXPECT_NE(message(missing).find("github.com/mseitzer/pytorch-fid/releases"), std::string::npos);
  const std::string legacy = (dir_ / "legacy.pth").string();
  std::ofstream(legacy) << "\x80\x02\x8a\x0alegacy pickle";
  EXPECT_NE(message(legacy).find("legacy (pre-1.6) format"), std::string::npos) << message(legacy);
  // A state dict in the right layout but without one tensor names it.
  std::map<std::string, torch::Tensor> state = StateDict(*FidInception());
  state.erase("Mixed_6c.branch7x7_2.conv.weight");
  const std::string partial = (dir_ / "partial.pt").string();
  SaveTensors(state, partial);
  EXPECT_NE(message(partial).find("missing tensor 'Mixed_6c.branch7x7_2.conv.weight'"),
            std::string::npos)
      << message(partial);
}

TEST_F(FidTest, NpzRoundTripsWithNumpy) {
  Reference("npz-write", dir_.string());
  for (const char* file : {"plain.npz", "compressed.npz"}) {
    SCOPED_TRACE(file);
    std::map<std::string, torch::Tensor> arrays = ReadNpz((dir_ / file).string());
    ASSERT_EQ(arrays.size(), 5u);
    EXPECT_TRUE(torch::allclose(arrays.at("mu"), torch::linspace(-1, 1, 7, torch::kFloat64)));
    EXPECT_TRUE(
        torch::equal(arrays.at("sigma"), torch::arange(12, torch::kFloat64).reshape({3, 4}) / 7));
    EXPECT_TRUE(
        torch::equal(arrays.at("fortran"), torch::arange(6, torch::kFloat32).reshape({2, 3})));
    EXPECT_TRUE(torch::equal(arrays.at("counts"), torch::arange(5, torch::kLong) * 3));
    const torch::Tensor pixels =
        (torch::arange(2 * 4 * 4 * 3, torch::kLong) * 37).remainder(256).to(torch::kUInt8);
    EXPECT_TRUE(torch::equal(arrays.at("arr_0"), pixels.reshape({2, 4, 4, 3})));
    // As a sample archive: image 1, pixel (row 2, column 3), as CHW bytes.
    const auto archive = OpenImageSet("npz:" + (dir_ / file).string(), 32);
    ASSERT_EQ(archive->size(), 2);
    ASSERT_EQ(archive->image_size(), 4);
    ASSERT_EQ(archive->channels(), 3);
    std::vector<uint8_t> chw(3 * 16);
    archive->Read(1, chw.data());
    for (int c = 0; c < 3; ++c) {
      EXPECT_EQ(chw[c * 16 + 2 * 4 + 3], pixels[((1 * 4 + 2) * 4 + 3) * 3 + c].item<uint8_t>());
    }
    // Written back by C++, numpy reads the same arrays.
    const std::string back = (dir_ / ("back-" + std::string(file))).string();
    WriteNpz(back, arrays);
    Reference("npz-check", back);
  }
  // Sample archives that are not: arr_0 of floats, of the wrong shape, or missing.
  const std::pair<std::map<std::string, torch::Tensor>, std::string> bad[] = {
      {{{"arr_0", torch::zeros({2, 4, 4, 3}, torch::kFloat32)}}, "arr_0 is Float"},
      {{{"arr_0", torch::zeros({2, 4, 3}, torch::kUInt8)}}, "arr_0 has shape [2, 4, 3]"},
      {{{"arr_0", torch::zeros({2, 4, 5, 3}, torch::kUInt8)}}, "arr_0 has shape [2, 4, 5, 3]"},
      {{{"images", torch::zeros({2, 4, 4, 3}, torch::kUInt8)}}, "no array arr_0"}};
  for (const auto& [arrays, reason] : bad) {
    const std::string path = (dir_ / "bad.npz").string();
    WriteNpz(path, arrays);
    try {
      OpenImageSet("npz:" + path, 32);
      ADD_FAILURE() << "read a bad archive: " << reason;
    } catch (const std::runtime_error& error) {
      EXPECT_NE(std::string(error.what()).find(path + ": " + reason), std::string::npos)
          << error.what();
    }
  }
  std::ofstream(dir_ / "junk.npz") << "not a zip";
  try {
    ReadReferenceStats((dir_ / "junk.npz").string());
    FAIL() << "read junk";
  } catch (const std::runtime_error& error) {
    EXPECT_NE(std::string(error.what()).find("junk.npz: cannot open as a .npz"), std::string::npos)
        << error.what();
  }
  try {
    ReadReferenceStats((dir_ / "plain.npz").string());  // sigma is 3 x 4
    FAIL() << "read a sigma that is not square";
  } catch (const std::runtime_error& error) {
    EXPECT_NE(std::string(error.what()).find("sigma is [3, 4], mu has 7 entries"),
              std::string::npos)
        << error.what();
  }
}

TEST_F(FidTest, FidOfASetAgainstItselfIsZeroAndGrowsWithNoise) {
  Reference("network", dir_.string());
  FidInception model = LoadFidInception((dir_ / "inception.pt").string(), torch::kCPU);
  ShapesDataset shapes(8, 32, 3);
  torch::Tensor images = torch::empty({8, 3, 32, 32}, torch::kUInt8);
  for (int64_t i = 0; i < 8; ++i) shapes.Read(i, images[i].data_ptr<uint8_t>());
  const torch::Tensor clean = images.to(torch::kFloat32) / 127.5 - 1;
  torch::NoGradGuard no_grad;
  auto moments_of = [&](const torch::Tensor& batch) {
    FeatureMoments moments(2048);
    moments.Add(model->forward(batch).pool3);
    return moments;
  };
  const FeatureMoments reference = moments_of(clean);
  auto fid_to = [&](const FeatureMoments& other) {
    return FrechetDistance(reference.Mean(), reference.Covariance(), other.Mean(),
                           other.Covariance())
        .fid;
  };
  // Zero up to rounding, relative to the size of the statistics (tr sigma).
  EXPECT_NEAR(fid_to(reference), 0, 1e-6 * reference.Covariance().trace().item<double>());
  torch::manual_seed(11);
  const torch::Tensor noise = torch::randn_like(clean);
  double previous = 0;
  for (double level : {0.1, 0.4, 1.0}) {
    const double fid = fid_to(moments_of((clean + level * noise).clamp(-1, 1)));
    EXPECT_GT(fid, previous) << "noise " << level;
    previous = fid;
  }
}

}  // namespace
}  // namespace ddpm
