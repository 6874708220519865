// The variational bound in bits/dim (Ho et al. Eq. 5): its Gaussian KL and discretized decoder
// against SciPy's numerical integration (tests/reference/bound_ref.py), its prior term and,
// for Gaussian data with the exact denoiser, every KL term against closed forms in float64;
// learned variances; and the settings that go with them.
#include "eval/likelihood.h"

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "base/errors.h"
#include "config/config.h"
#include "test_env.h"
#include "trainer/communicator.h"
#include "trainer/data.h"
#include "trainer/diffusion.h"
#include "trainer/tensor_io.h"
#include "trainer/unet.h"

namespace ddpm {
namespace {

constexpr double kLn2 = 0.69314718055994530942;

// A one-level UNet on 8x8 images with learned variances, quick enough to run in tests.
ModelConfig SmallLearnedSigmaModel() {
  ModelConfig m;
  m.ch = 16;
  m.ch_mult = {1};
  m.num_res_blocks = 1;
  m.attn_resolutions = {};
  m.image_size = 8;
  m.norm_groups = 8;
  m.learn_sigma = true;
  return m;
}

TEST(Bound, KlAndDiscretizedDecoderMatchSciPyIntegration) {
  const std::string python = DDPM_REFERENCE_PYTHON;
  if (std::system((python + " -c 'import torch, scipy' > /dev/null 2>&1").c_str()) != 0) {
    GTEST_SKIP() << "the reference needs " << python
                 << " with torch and scipy (Debian: python3-torch python3-scipy)";
  }
  const std::string path =
      (std::filesystem::temp_directory_path() / ("ddpm_bound_" + std::to_string(getpid()) + ".pt"))
          .string();
  ASSERT_EQ(std::system(
                (python + " " + DDPM_SOURCE_DIR + "/tests/reference/bound_ref.py " + path).c_str()),
            0);
  const auto ref = LoadTensors(path);
  std::filesystem::remove(path);

  const torch::Tensor kl =
      NormalKl(ref.at("kl.mean1"), ref.at("kl.logvar1"), ref.at("kl.mean2"), ref.at("kl.logvar2"));
  const torch::Tensor kl_expected = ref.at("kl.expected");
  for (int64_t i = 0; i < kl.numel(); ++i) {
    const double want = kl_expected[i].item<double>();
    EXPECT_NEAR(kl[i].item<double>(), want, 1e-8 * std::max(1.0, want)) << "pair " << i;
  }

  const torch::Tensor log_p = DiscretizedGaussianLogLikelihood(
      ref.at("dgll.x"), ref.at("dgll.mean"), ref.at("dgll.log_scale"));
  const torch::Tensor log_p_expected = ref.at("dgll.expected");
  for (int64_t i = 0; i < log_p.numel(); ++i) {
    const double want = log_p_expected[i].item<double>();
    EXPECT_NEAR(log_p[i].item<double>(), want, 1e-9 + 1e-8 * std::abs(want))
        << "x " << ref.at("dgll.x")[i].item<double>() << " mean "
        << ref.at("dgll.mean")[i].item<double>() << " log_scale "
        << ref.at("dgll.log_scale")[i].item<double>();
  }
}

// Data x_0 ~ N(0, s^2 I) and the exact denoiser eps(x_t) = E[eps | x_t]: with p's variance
// beta-tilde_t (fixedsmall), each KL term's expectation is, per dimension,
// 0.5 coef1_t^2 Var(x_0 | x_t) / beta-tilde_t with Var(x_0 | x_t) = s^2 (1 - abar) / v and
// v = abar s^2 + 1 - abar; the prior term is exact for each image.
TEST(Bound, GaussianDataWithTheExactDenoiserMatchesTheClosedForm) {
  DiffusionConfig dc;
  dc.timesteps = 40;
  dc.beta_end = 0.25;
  const GaussianDiffusion diffusion(dc);
  const double s = 0.5;
  const auto& sched = diffusion.schedule64();
  const Denoiser exact = [&](const torch::Tensor& x_t, const torch::Tensor& t) {
    const torch::Tensor abar = sched.alphas_cumprod.index_select(0, t).view({-1, 1, 1, 1});
    return (torch::sqrt(1.0 - abar) / (abar * s * s + 1.0 - abar) * x_t.to(torch::kFloat64))
        .to(torch::kFloat32);
  };
  torch::manual_seed(3);
  const torch::Tensor x0 = s * torch::randn({64, 3, 16, 16});
  torch::Generator generator = MakeCpuGenerator(5);
  const VariationalBound bound =
      diffusion.Bound(exact, x0, /*num_timesteps=*/0, VarianceKind::kFixedSmall, generator);
  ASSERT_EQ(bound.terms.sizes(), (torch::IntArrayRef{64, dc.timesteps}));

  // Each term is a mean over N = 64 x 768 dimensions of a scaled chi-square(1) variable: its
  // relative standard deviation is sqrt(2 / N) = 0.64%; 4% is over six of them.
  std::vector<double> closed(dc.timesteps, 0.0);
  double closed_kl_sum = 0;
  for (int t = 1; t < dc.timesteps; ++t) {
    const double abar = sched.alphas_cumprod[t].item<double>();
    const double v = abar * s * s + 1.0 - abar;
    const double var_x0 = s * s * (1.0 - abar) / v;
    const double coef1 = sched.posterior_mean_coef1[t].item<double>();
    const double beta_tilde = sched.posterior_variance[t].item<double>();
    closed[t] = 0.5 * coef1 * coef1 * var_x0 / beta_tilde / kLn2;
    closed_kl_sum += closed[t];
    const double measured = bound.terms.select(1, t).mean().item<double>();
    EXPECT_NEAR(measured, closed[t], 0.04 * closed[t]) << "t = " << t;
  }
  const double measured_kl_sum = bound.terms.slice(1, 1).sum(1).mean().item<double>();
  EXPECT_NEAR(measured_kl_sum, closed_kl_sum, 0.01 * closed_kl_sum);

  const double abar_last = sched.alphas_cumprod[dc.timesteps - 1].item<double>();
  for (int64_t i = 0; i < 4; ++i) {
    const double mean_sq = x0[i].to(torch::kFloat64).square().mean().item<double>();
    const double prior =
        0.5 * (-1.0 - std::log(1.0 - abar_last) + (1.0 - abar_last) + abar_last * mean_sq) / kLn2;
    EXPECT_NEAR(bound.prior[i].item<double>(), prior, 1e-9 * prior);
  }
  EXPECT_TRUE(torch::allclose(bound.total, bound.prior + bound.terms.sum(1)));

  // The stratified estimate from 9 of the 40 terms: its error is at most, per stratum, its size
  // times the spread of the closed-form terms inside it, plus the Monte Carlo error above.
  torch::Generator strata_generator = MakeCpuGenerator(9);
  const VariationalBound estimate =
      diffusion.Bound(exact, x0, 9, VarianceKind::kFixedSmall, strata_generator);
  ASSERT_EQ(estimate.timesteps.numel(), 9);
  EXPECT_EQ(estimate.timesteps[0].item<int64_t>(), 0);
  EXPECT_DOUBLE_EQ(estimate.weights.sum().item<double>(), dc.timesteps);
  double spread = 0;
  for (int k = 0; k < 8; ++k) {
    const int begin = 1 + k * (dc.timesteps - 1) / 8, end = 1 + (k + 1) * (dc.timesteps - 1) / 8;
    double low = closed[begin], high = closed[begin];
    for (int t = begin; t < end; ++t) {
      low = std::min(low, closed[t]);
      high = std::max(high, closed[t]);
    }
    spread += (end - begin) * (high - low);
    const int64_t drawn = estimate.timesteps[k + 1].item<int64_t>();
    EXPECT_TRUE(drawn >= begin && drawn < end) << "stratum " << k << " drew " << drawn;
  }
  const double estimated_kl =
      (estimate.terms.slice(1, 1) * estimate.weights.slice(0, 1)).sum(1).mean().item<double>();
  EXPECT_NEAR(estimated_kl, closed_kl_sum, spread + 0.04 * closed_kl_sum);
}

TEST(Bound, LearnedVarianceInterpolatesBetweenBetaTildeAndBeta) {
  DiffusionConfig dc;
  dc.timesteps = 10;
  dc.beta_end = 0.3;
  const GaussianDiffusion diffusion(dc);
  const torch::Tensor x_t = torch::randn({3, 2, 4, 4});
  const torch::Tensor t = torch::tensor({0, 4, 9}, torch::kLong);
  const auto& sched = diffusion.schedule64();
  // v = -1 gives beta-tilde_t (clipped at t = 0), v = 1 gives beta_t, v = 0 their geometric mean.
  for (const double v : {-1.0, 0.0, 1.0}) {
    const torch::Tensor out =
        torch::cat({torch::zeros({3, 2, 4, 4}), torch::full({3, 2, 4, 4}, v)}, 1);
    const Posterior p =
        diffusion.PosteriorFromOutput(x_t, t, out, VarianceKind::kFixedLarge, false);
    for (int64_t i = 0; i < 3; ++i) {
      const int64_t step = t[i].item<int64_t>();
      const double small = sched.posterior_log_variance_clipped[step].item<double>();
      const double large = std::log(sched.betas[step].item<double>());
      const double fraction = (v + 1.0) / 2.0;
      EXPECT_NEAR(p.log_variance[i].mean().item<double>(),
                  fraction * large + (1.0 - fraction) * small, 1e-5)
          << "v " << v << " t " << step;
    }
  }
}

TEST(Bound, SettingsAreCheckedByName) {
  Config c;
  c.diffusion.loss = LossKind::kHybrid;
  try {
    c.Validate(1);
    FAIL() << "hybrid without learned variances was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("model.learn_sigma"), std::string::npos) << e.what();
  }
  c.model.learn_sigma = true;
  EXPECT_NO_THROW(c.Validate(1));
  c.diffusion.weighting = LossWeighting::kP2;
  EXPECT_THROW(c.Validate(1), ConfigError);
  c.diffusion.weighting = LossWeighting::kNone;
  c.diffusion.vlb_weight = -1;
  EXPECT_THROW(c.Validate(1), ConfigError);

  // The UNet's output doubles; a checkpoint's weights of the other kind do not load.
  ModelConfig m = SmallLearnedSigmaModel();
  UNet learned(m, 1);
  EXPECT_EQ(learned->forward(torch::zeros({2, 3, 8, 8}), torch::zeros({2}, torch::kLong)).size(1),
            6);
  m.learn_sigma = false;
  UNet fixed(m, 1);
  EXPECT_THROW(LoadStateDict(*fixed, StateDict(*learned), "learned.pt"), WeightsError);
  for (const bool config_learns : {false, true}) {
    m.learn_sigma = config_learns;
    try {
      CheckLearnSigma(m, StateDict(config_learns ? *fixed : *learned), "w.pt");
      FAIL() << "a mismatch was accepted";
    } catch (const std::runtime_error& e) {
      const std::string expected =
          std::string("w.pt: the weights have ") + (config_learns ? "3" : "6") +
          " output channels, a model with learn_sigma: " + (config_learns ? "false" : "true") +
          "; the config says model.learn_sigma: " + (config_learns ? "true" : "false");
      EXPECT_EQ(e.what(), expected);
    }
  }
  m.learn_sigma = true;
  EXPECT_NO_THROW(CheckLearnSigma(m, StateDict(*learned), "w.pt"));
}

}  // namespace
}  // namespace ddpm

namespace ddpm {
namespace {

// The bound of a small model on shapes, measured by ddpm_nll's code on one rank and on two
// threads acting as ranks (each takes half the images; a batch's noise depends only on its
// first image), and directly with GaussianDiffusion::Bound: the three agree.
TEST(MeasureBound, OneRankTwoRanksAndDirectAgreeAndTheFilesAreWritten) {
  ModelConfig m = SmallLearnedSigmaModel();
  DiffusionConfig dc;
  dc.timesteps = 12;
  const GaussianDiffusion diffusion(dc);
  const ShapesDataset data(8, 8, 3);
  BoundOptions options;
  options.batch_size = 4;
  options.seed = 21;
  options.variance = VarianceKind::kFixedSmall;

  UNet model(m, 4);
  SoloCommunicator solo;
  const BoundReport one = MeasureBound(diffusion, model, data, options, solo, torch::kCPU, {});
  EXPECT_EQ(one.images, 8);
  EXPECT_TRUE(one.full());

  BoundReport halves[2];
  {
    LocalGroup group(2);
    std::vector<std::thread> ranks;
    for (int r = 0; r < 2; ++r) {
      ranks.emplace_back([&, r] {
        UNet replica(m, 4);
        halves[r] = MeasureBound(diffusion, replica, data, options, group.rank(r), torch::kCPU, {});
      });
    }
    for (auto& rank : ranks) rank.join();
  }
  for (const BoundReport& half : halves) {
    EXPECT_EQ(half.images, 8);
    EXPECT_NEAR(half.total_mean, one.total_mean, 1e-12 * one.total_mean);
    for (std::size_t i = 0; i < one.term_means.size(); ++i) {
      EXPECT_NEAR(half.term_means[i], one.term_means[i],
                  1e-12 * std::abs(one.term_means[i]) + 1e-15);
    }
  }

  // Directly: the same batches with the same generators.
  double direct = 0;
  for (int64_t begin = 0; begin < 8; begin += 4) {
    const std::vector<uint8_t> bytes = ReadBatch(data, {begin, begin + 1, begin + 2, begin + 3});
    const torch::Tensor x0 =
        torch::from_blob(const_cast<uint8_t*>(bytes.data()), {4, 3, 8, 8}, torch::kUInt8)
                .to(torch::kFloat32) /
            127.5 -
        1.0;
    torch::Generator generator = MakeCpuGenerator(21 * 1000003ULL + begin + 1);
    const Denoiser denoiser = [&](const torch::Tensor& x, const torch::Tensor& t) {
      return model->forward(x, t);
    };
    direct += diffusion.Bound(denoiser, x0, 0, VarianceKind::kFixedSmall, generator)
                  .total.sum()
                  .item<double>();
  }
  EXPECT_NEAR(one.total_mean, direct / 8, 1e-12 * direct);

  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("ddpm_nll_" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  WriteBoundCsv(one, (dir / "terms.csv").string());
  WriteBoundPlot(one, (dir / "terms.png").string());
  std::ifstream csv(dir / "terms.csv");
  std::string line;
  std::getline(csv, line);
  EXPECT_EQ(line, "t,weight,bits_per_dim");
  int rows = 0;
  double sum = 0;
  while (std::getline(csv, line)) {
    ++rows;
    sum += std::stod(line.substr(line.rfind(',') + 1));
  }
  EXPECT_EQ(rows, dc.timesteps + 1) << "every t and the prior";
  EXPECT_NEAR(sum, one.total_mean, 1e-8 * one.total_mean) << "the rows add up to the bound";
  EXPECT_GT(std::filesystem::file_size(dir / "terms.png"), 1000u);
  std::filesystem::remove_all(dir);

  // Bad options name the flag.
  options.num_timesteps = 1;
  try {
    MeasureBound(diffusion, model, data, options, solo, torch::kCPU, {});
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("--timesteps 1"), std::string::npos) << e.what();
  }
  options.num_timesteps = 0;
  options.num_images = 9;
  EXPECT_THROW(MeasureBound(diffusion, model, data, options, solo, torch::kCPU, {}),
               std::invalid_argument);
}

}  // namespace
}  // namespace ddpm
