// Classifier-free guidance (Ho & Salimans 2022) as the samplers use it: the guided denoiser's
// arithmetic and its exact special cases, the labels of a sampling job, and, with the exact
// denoiser of a two-class Gaussian mixture, that the sampled class-conditional distribution is
// what the closed form says at w = 0 and w = 1 and that larger w moves samples further toward
// the class.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "trainer/diffusion.h"
#include "trainer/trainer.h"
#include "trainer/unet.h"

namespace ddpm {
namespace {

TEST(Guidance, TheGuidedEpsIsTheUnconditionalPlusWTimesTheDifferenceInOneBatch) {
  // A labelled "model" whose output depends on the label and records its batch sizes.
  std::vector<int64_t> batches;
  const LabelledDenoiser model = [&](const torch::Tensor& x, const torch::Tensor& t,
                                     const torch::Tensor& y) {
    batches.push_back(x.size(0));
    const torch::Tensor label = y.to(torch::kFloat32).view({-1, 1, 1, 1});
    // Two channels: eps, and a "variance" channel.
    return torch::cat(
        {x * (1 + label) + t.to(torch::kFloat32).view({-1, 1, 1, 1}) * 0.01, x * 0 + label * 10},
        1);
  };
  torch::manual_seed(2);
  const torch::Tensor x = torch::randn({3, 1, 2, 2});
  const torch::Tensor t = torch::tensor({5, 50, 500}, torch::kLong);
  const torch::Tensor labels = torch::tensor({0, 1, 2}, torch::kLong);
  const int64_t none = 3;
  const torch::Tensor conditional = model(x, t, labels);
  const torch::Tensor unconditional = model(x, t, torch::full({3}, none, torch::kLong));
  batches.clear();
  for (double w : {2.5, -0.5, 7.0}) {
    const torch::Tensor guided = GuidedDenoiser(model, labels, none, w, 1)(x, t);
    const torch::Tensor expected =
        unconditional.narrow(1, 0, 1) +
        w * (conditional.narrow(1, 0, 1) - unconditional.narrow(1, 0, 1));
    EXPECT_TRUE(torch::allclose(guided.narrow(1, 0, 1), expected, 1e-6, 1e-6)) << w;
    // The variance channel is the conditional pass's, unguided.
    EXPECT_TRUE(torch::equal(guided.narrow(1, 1, 1), conditional.narrow(1, 1, 1))) << w;
  }
  EXPECT_EQ(batches, (std::vector<int64_t>{6, 6, 6}));  // both halves as one batch of 2B
  // w = 1 and w = 0 are the conditional and the unconditional model in one pass of B.
  batches.clear();
  EXPECT_TRUE(torch::equal(GuidedDenoiser(model, labels, none, 1.0, 1)(x, t), conditional));
  EXPECT_TRUE(torch::equal(GuidedDenoiser(model, labels, none, 0.0, 1)(x, t), unconditional));
  EXPECT_EQ(batches, (std::vector<int64_t>{3, 3}));
  EXPECT_THROW(GuidedDenoiser(model, labels, none, std::nan(""), 1), c10::Error);
}

TEST(Guidance, AtWOneTheSamplerIsThePlainConditionalSamplerBitForBit) {
  ModelConfig m;
  m.ch = 16;
  m.ch_mult = {1};
  m.num_res_blocks = 1;
  m.attn_resolutions = {};
  m.image_size = 8;
  m.norm_groups = 8;
  m.num_classes = 4;
  UNet model(m, 3);
  model->eval();
  const GaussianDiffusion diffusion(DiffusionConfig{});
  SampleConfig sample;
  sample.sampler = SamplerKind::kDdim;
  sample.steps = 5;
  const torch::Tensor labels = torch::tensor({3, 0, 2}, torch::kLong);
  const Denoiser plain = [&](const torch::Tensor& x, const torch::Tensor& t) {
    return model->forward(x, t, labels);
  };
  const torch::Tensor a = diffusion.Sample(plain, {3, 3, 8, 8}, sample);
  const torch::Tensor b =
      diffusion.Sample(EvalDenoiser(model, Precision::kFp32, labels, 1.0), {3, 3, 8, 8}, sample);
  EXPECT_TRUE(torch::equal(a, b));
  const Denoiser none = [&](const torch::Tensor& x, const torch::Tensor& t) {
    return model->forward(x, t);  // "no class"
  };
  EXPECT_TRUE(torch::equal(
      diffusion.Sample(none, {3, 3, 8, 8}, sample),
      diffusion.Sample(EvalDenoiser(model, Precision::kFp32, labels, 0.0), {3, 3, 8, 8}, sample)));
  EXPECT_FALSE(torch::equal(a, diffusion.Sample(none, {3, 3, 8, 8}, sample)));
  // An unconditional model takes no labels.
  m.num_classes = 0;
  UNet unconditional(m, 3);
  EXPECT_THROW(EvalDenoiser(unconditional, Precision::kFp32, labels, 2.0), c10::Error);
}

TEST(Guidance, ASamplingJobsLabelsAreContiguousBlocksOfItsImagesOnAnySplit) {
  const std::vector<int> classes = {2, 0, 1};
  std::vector<int64_t> all(9);
  for (int i = 0; i < 9; ++i) all[i] = i;
  const torch::Tensor whole = BlockLabels(classes, all, 9);
  EXPECT_TRUE(torch::equal(whole, torch::tensor({2, 2, 2, 0, 0, 0, 1, 1, 1}, torch::kLong)));
  // Any subset (a rank's share, a resumed job's missing images) gets the same labels.
  EXPECT_TRUE(
      torch::equal(BlockLabels(classes, {7, 1, 4}, 9), torch::tensor({1, 2, 0}, torch::kLong)));
  EXPECT_FALSE(BlockLabels({}, all, 9).defined());
  Config config;
  config.model.num_classes = 3;
  EXPECT_EQ(ClassesToSample(config), (std::vector<int>{0, 1, 2}));
  config.sample.classes = {1};
  EXPECT_EQ(ClassesToSample(config), (std::vector<int>{1}));
  config.Validate();
  config.sample.classes = {3};
  EXPECT_THROW(config.Validate(), ConfigError);
  config.sample.classes = {};
  config.sample.guidance = std::nan("");
  EXPECT_THROW(config.Validate(), ConfigError);
}

// The exact denoiser of p(x0 | c) = N(mu_c, s^2), classes 0 and 1 equally likely, label 2 "no
// class": at step t, x_t | c ~ N(sqrt(abar) mu_c, abar s^2 + 1 - abar), and eps is
// -sqrt(1 - abar) times the score of p(x_t | c), or of the mixture for "no class".
LabelledDenoiser MixtureDenoiser(const GaussianDiffusion& diffusion, double mu0, double mu1,
                                 double s) {
  const torch::Tensor abar = diffusion.schedule64().alphas_cumprod;
  return
      [abar, mu0, mu1, s](const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& y) {
        const torch::Tensor a = abar.index({t}).view({-1, 1, 1, 1});
        const torch::Tensor xd = x.to(torch::kFloat64);
        const torch::Tensor var = a * s * s + (1 - a);
        const torch::Tensor m0 = a.sqrt() * mu0, m1 = a.sqrt() * mu1;
        const torch::Tensor score0 = -(xd - m0) / var, score1 = -(xd - m1) / var;
        // Responsibilities of the two components (equal variances: a logistic of the difference).
        const torch::Tensor r1 = torch::sigmoid((-(xd - m1).pow(2) + (xd - m0).pow(2)) / (2 * var));
        const torch::Tensor mixture = (1 - r1) * score0 + r1 * score1;
        const torch::Tensor label = y.view({-1, 1, 1, 1});
        const torch::Tensor score =
            torch::where(label == 0, score0, torch::where(label == 1, score1, mixture));
        return (-(1 - a).sqrt() * score).to(torch::kFloat32);
      };
}

TEST(Guidance, WithAnExactDenoiserGuidanceMovesSamplesToTheirClassAsTheClosedFormSays) {
  const GaussianDiffusion diffusion(DiffusionConfig{});
  const double mu0 = -0.5, mu1 = 0.5, s = 0.5;
  const LabelledDenoiser model = MixtureDenoiser(diffusion, mu0, mu1, s);
  SampleConfig sample;  // the paper's ancestral sampler over all 1000 steps
  sample.clip_x0 = false;
  sample.seed = 9;
  const int64_t n = 4000;
  const torch::Tensor labels = torch::ones({n}, torch::kLong);  // every sample of class 1
  // Share of class-1 samples on class 1's side (x > 0), and their mean, at each w.
  const auto draw = [&](double w) {
    const torch::Tensor x =
        diffusion.Sample(GuidedDenoiser(model, labels, 2, w, 1), {n, 1, 1, 1}, sample);
    return std::make_pair((x > 0).to(torch::kFloat64).mean().item<double>(),
                          x.to(torch::kFloat64).mean().item<double>());
  };
  const auto [share0, mean0] = draw(0.0);
  const auto [share1, mean1] = draw(1.0);
  const auto [share3, mean3] = draw(3.0);
  // Closed forms: w = 0 samples the symmetric mixture (share 1/2, mean 0); w = 1 samples
  // N(mu1, s^2) (share Phi(mu1 / s) = Phi(1), mean mu1). Bound: 4 Monte Carlo standard errors
  // of n samples, plus 0.01 for the 1000-step discretization.
  const double phi1 = 0.5 * std::erfc(-1 / std::sqrt(2.0));
  const double share_bound = 4 * std::sqrt(0.25 / n) + 0.01;
  const double mean0_bound = 4 * std::sqrt((s * s + 0.25) / n) + 0.01;  // mixture variance
  const double mean1_bound = 4 * std::sqrt(s * s / n) + 0.01;
  std::printf(
      "guidance: share on the class side / mean at w = 0: %.4f / %.4f, w = 1: %.4f / %.4f "
      "(closed form %.4f / %.1f), w = 3: %.4f / %.4f\n",
      share0, mean0, share1, mean1, phi1, mu1, share3, mean3);
  EXPECT_NEAR(share0, 0.5, share_bound);
  EXPECT_NEAR(mean0, 0.0, mean0_bound);
  EXPECT_NEAR(share1, phi1, share_bound);
  EXPECT_NEAR(mean1, mu1, mean1_bound);
  // Beyond w = 1 the unconditional score is subtracted: samples move further from class 0.
  EXPECT_GT(share3, share1 + 2 * share_bound) << share1 << " -> " << share3;
  EXPECT_GT(mean3, mean1 + 2 * mean1_bound) << mean1 << " -> " << mean3;
}

}  // namespace
}  // namespace ddpm
