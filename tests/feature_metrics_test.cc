// KID, precision/recall/density/coverage and the exact two-nearest-neighbour search against
// independent NumPy/SciPy references (tests/reference/feature_metrics_ref.py, written from the
// papers and the authors' code), on 1 and 3 ranks (threads as ranks); KID's statistics (an
// unbiased estimator is within its spread of 0 on two draws of one Gaussian, goes below 0, and
// its spread shrinks as 1/m there; it rises with the distance of two means); PRD on sets where
// the answer is known.
#include "eval/feature_metrics.h"

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>

#include "eval/fid.h"
#include "test_env.h"
#include "tests/on_ranks.h"
#include "trainer/communicator.h"

namespace ddpm {
namespace {

namespace fs = std::filesystem;

class FeatureMetricsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    python_ = DDPM_REFERENCE_PYTHON;
    if (std::system((python_ + " -c 'import numpy, scipy' > /dev/null 2>&1").c_str()) != 0) {
      GTEST_SKIP() << "the references need " << python_
                   << " with numpy and scipy (Debian: apt-get install python3-scipy)";
    }
    dir_ = fs::temp_directory_path() /
           ("ddpm-feature-metrics-" + std::to_string(getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
    torch::manual_seed(1234);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes arrays, runs feature_metrics_ref.py COMMAND on them and returns its answer.
  std::map<std::string, torch::Tensor> Reference(const std::string& command,
                                                 const std::map<std::string, torch::Tensor>& in,
                                                 const std::string& args = "") {
    const std::string source = (dir_ / (command + "-in.npz")).string();
    const std::string target = (dir_ / (command + "-out.npz")).string();
    WriteNpz(source, in);
    const std::string line =
        python_ + " " + DDPM_SOURCE_DIR + "/tests/reference/feature_metrics_ref.py " + command +
        " " + source + " " + target + " " + args + " > " + (dir_ / "python.log").string() + " 2>&1";
    EXPECT_EQ(std::system(line.c_str()), 0) << line << "; see " << (dir_ / "python.log").string();
    return ReadNpz(target);
  }

  std::string python_;
  fs::path dir_;
};

// Inception pool3 features are averages of ReLUs: non-negative, correlated, a few large.
torch::Tensor PoolLikeFeatures(int64_t n, int64_t d, double shift) {
  const torch::Tensor mixing = torch::randn({16, d}, torch::kFloat64) * 0.5;
  return (torch::randn({n, d}, torch::kFloat64) +
          torch::randn({n, 16}, torch::kFloat64).mm(mixing) + shift)
      .relu()
      .to(torch::kFloat32);
}

double Value(const torch::Tensor& t) { return t.to(torch::kFloat64).item<double>(); }

TEST_F(FeatureMetricsTest, KidEqualsTheNumpyReferenceOnOneAndThreeRanks) {
  struct Case {
    int64_t fake, real, dim;
    int subsets;
    int64_t expected_size;
  };
  // 2048 wide subsets of 1000; then fewer fake points than 1000, so subsets of all 300.
  for (const Case c : {Case{1200, 1500, 2048, 10, 1000}, Case{300, 2000, 64, 100, 300}}) {
    const torch::Tensor fake = PoolLikeFeatures(c.fake, c.dim, 0.1);
    const torch::Tensor real = PoolLikeFeatures(c.real, c.dim, 0.0);
    KidOptions options;
    options.subsets = c.subsets;
    options.seed = 77;
    const auto expected =
        Reference("kid", {{"fake", fake}, {"real", real}},
                  std::to_string(c.subsets) + " " + std::to_string(c.expected_size) + " 77");
    SoloCommunicator solo;
    const KidResult one = KernelInceptionDistance(fake, real, solo, options);
    EXPECT_EQ(one.subset_size, c.expected_size);
    EXPECT_EQ(one.subsets, c.subsets);
    EXPECT_NEAR(one.mean, Value(expected.at("mean")), 1e-6 * std::abs(Value(expected.at("mean"))))
        << c.dim;
    EXPECT_NEAR(one.std, Value(expected.at("std")), 1e-6 * Value(expected.at("std"))) << c.dim;
    LocalGroup group(3);
    std::vector<KidResult> ranks(3);
    OnRanks(3,
            [&](int r) { ranks[r] = KernelInceptionDistance(fake, real, group.rank(r), options); });
    for (const KidResult& rank : ranks) {
      EXPECT_EQ(rank.mean, one.mean);
      EXPECT_EQ(rank.std, one.std);
    }
  }
}

TEST_F(FeatureMetricsTest, KidIsUnbiasedAroundZeroWithASpreadOfOneOverMAndRisesWithDistance) {
  SoloCommunicator solo;
  const int64_t dim = 64;
  int below_zero = 0;
  for (int draw = 0; draw < 3; ++draw) {
    const torch::Tensor fake = torch::randn({4000, dim}, torch::kFloat64);
    const torch::Tensor real = torch::randn({4000, dim}, torch::kFloat64);
    KidOptions options;
    options.seed = static_cast<uint64_t>(draw);
    const KidResult full = KernelInceptionDistance(fake, real, solo, options);
    // A biased (V-statistic) MMD^2 would sit near 2 (E k(x,x) - E k(x,y)) / m = 0.014 here,
    // about 14 of these spreads above 0.
    EXPECT_LT(std::abs(full.mean), 3 * full.std) << "draw " << draw;
    below_zero += full.mean < 0;
    // Between two draws of one distribution the unbiased MMD^2's spread falls as 1/m (not
    // 1/sqrt(m)): a quarter of the subset size, four times the spread.
    options.max_subset_size = 250;
    const KidResult quarter = KernelInceptionDistance(fake, real, solo, options);
    EXPECT_EQ(quarter.subset_size, 250);
    EXPECT_GT(quarter.std / full.std, 2.8) << "draw " << draw;
    EXPECT_LT(quarter.std / full.std, 6.0) << "draw " << draw;
  }
  EXPECT_GE(below_zero, 1) << "an unbiased estimate goes below 0 between draws of one Gaussian";
  // Means apart by distance: KID grows with it.
  const torch::Tensor real = torch::randn({3000, dim}, torch::kFloat64);
  const torch::Tensor direction = torch::ones({dim}, torch::kFloat64) / std::sqrt(double(dim));
  double previous = -1;
  for (const double distance : {0.0, 0.5, 1.0, 2.0, 4.0}) {
    const torch::Tensor fake = torch::randn({3000, dim}, torch::kFloat64) + distance * direction;
    const double kid = KernelInceptionDistance(fake, real, solo).mean;
    EXPECT_GT(kid, previous) << "distance " << distance;
    previous = kid;
  }
  EXPECT_GT(previous, 0.1);
}

TEST_F(FeatureMetricsTest, PrecisionRecallDensityCoverageEqualTheReferenceCode) {
  const auto check = [&](const torch::Tensor& real, const torch::Tensor& fake, const char* what) {
    const auto expected = Reference("prdc", {{"real", real}, {"fake", fake}});
    for (const int world : {1, 3}) {
      LocalGroup group(world);
      std::vector<PrdResult> got(world);
      OnRanks(world, [&](int r) {
        got[r] = PrecisionRecallDensityCoverage(MakePrdReference(real, group.rank(r)), fake,
                                                group.rank(r));
      });
      for (const PrdResult& g : got) {
        EXPECT_NEAR(g.precision, Value(expected.at("precision")), 1e-12) << what << world;
        EXPECT_NEAR(g.recall, Value(expected.at("recall")), 1e-12) << what << world;
        EXPECT_NEAR(g.density, Value(expected.at("density")), 1e-12) << what << world;
        EXPECT_NEAR(g.coverage, Value(expected.at("coverage")), 1e-12) << what << world;
        EXPECT_EQ(g.real_count, real.size(0));
        EXPECT_EQ(g.fake_count, fake.size(0));
      }
    }
    SoloCommunicator solo;
    return PrecisionRecallDensityCoverage(MakePrdReference(real, solo), fake, solo);
  };
  // Two overlapping clouds: every number strictly between its extremes.
  const torch::Tensor real = PoolLikeFeatures(700, 32, 0.0);
  const PrdResult random = check(real, PoolLikeFeatures(600, 32, 0.3), "overlapping");
  EXPECT_GT(random.precision, 0.05);
  EXPECT_LT(random.precision, 0.95);
  // A set against itself: every point inside its own ball.
  const PrdResult same = check(real, real, "itself");
  EXPECT_EQ(same.precision, 1.0);
  EXPECT_EQ(same.recall, 1.0);
  EXPECT_EQ(same.coverage, 1.0);
  // A copy moved far away: nothing inside anything.
  const PrdResult far = check(real, real + 1000, "far");
  EXPECT_EQ(far.precision, 0.0);
  EXPECT_EQ(far.recall, 0.0);
  EXPECT_EQ(far.density, 0.0);
  EXPECT_EQ(far.coverage, 0.0);
  // Half the real points copied, half moved away: precision exactly 1/2; the rest as the
  // reference computes it.
  const torch::Tensor half = torch::cat({real.slice(0, 0, 350), real.slice(0, 350) + 1000});
  const PrdResult halved = check(real, half, "half");
  EXPECT_EQ(halved.precision, 0.5);
}

TEST_F(FeatureMetricsTest, NearestTwoIsExactAndTheSameOnOneAndThreeRanks) {
  const torch::Tensor queries = torch::randn({300, 48});
  const torch::Tensor train = torch::randn({1001, 48});
  const auto expected = Reference("nearest", {{"queries", queries}, {"train", train}});
  std::vector<NearestTwo> by_world;
  for (const int world : {1, 3}) {
    LocalGroup group(world);
    std::vector<NearestTwo> got(world);
    std::vector<int64_t> rows_read(world, 0);
    OnRanks(world, [&](int r) {
      got[r] = FindNearestTwo(
          queries,
          [&](int64_t first, int64_t count) {
            rows_read[r] += count;
            return train.slice(0, first, first + count);
          },
          train.size(0), group.rank(r), /*block=*/128);
    });
    // Each rank reads its own share, and all ranks together read the set once.
    int64_t total = 0;
    for (const int64_t n : rows_read) {
      EXPECT_LE(n, train.size(0) / world + 1);
      total += n;
    }
    EXPECT_EQ(total, train.size(0));
    for (const NearestTwo& g : got) {
      EXPECT_TRUE(torch::equal(g.index, expected.at("index"))) << "world " << world;
      EXPECT_TRUE(torch::allclose(g.distance, expected.at("distance"), 1e-9, 1e-9))
          << "world " << world;
    }
    by_world.push_back(got[0]);
  }
  EXPECT_TRUE(torch::equal(by_world[0].index, by_world[1].index));
}

TEST_F(FeatureMetricsTest, BadShapesAreRefusedByName) {
  SoloCommunicator solo;
  try {
    KernelInceptionDistance(torch::rand({10, 8}), torch::rand({10, 9}), solo);
    ADD_FAILURE() << "different widths were accepted";
  } catch (const std::invalid_argument& error) {
    EXPECT_STREQ(error.what(), "fake features have 8 dimensions, real ones 9");
  }
  try {
    KernelInceptionDistance(torch::rand({1, 8}), torch::rand({10, 8}), solo);
    ADD_FAILURE() << "one fake point was accepted";
  } catch (const std::invalid_argument& error) {
    EXPECT_STREQ(error.what(), "KID needs at least 2 fake and 2 real points, got 1 and 10");
  }
  try {
    MakePrdReference(torch::rand({5, 8}), solo);
    ADD_FAILURE() << "5 points were accepted for a 5th neighbour";
  } catch (const std::invalid_argument& error) {
    EXPECT_STREQ(error.what(), "the distance to the 5 nearest neighbours needs 6 points, got 5");
  }
}

}  // namespace
}  // namespace ddpm
