// Noise schedules, the forward process, the posterior, the losses and the samplers, each
// checked against quantities computed here independently in double precision.
#include "trainer/diffusion.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <vector>

namespace ddpm {
namespace {

constexpr double kPi = 3.14159265358979323846;

DiffusionConfig Linear(int timesteps = 1000) {
  DiffusionConfig c;
  c.timesteps = timesteps;
  return c;
}

// Linear betas and their running product, by plain loops.
std::vector<double> LinearBetas(int steps, double start, double end) {
  std::vector<double> betas(steps);
  for (int i = 0; i < steps; ++i) betas[i] = start + (end - start) * i / (steps - 1);
  return betas;
}

std::vector<double> CumProd(const std::vector<double>& betas) {
  std::vector<double> out(betas.size());
  double product = 1.0;
  for (std::size_t i = 0; i < betas.size(); ++i) out[i] = product *= 1.0 - betas[i];
  return out;
}

TEST(Schedule, LinearBuffersMatchClosedForms) {
  const NoiseSchedule s = NoiseSchedule::Make(Linear());
  const std::vector<double> betas = LinearBetas(1000, 1e-4, 0.02);
  const std::vector<double> abar = CumProd(betas);
  ASSERT_EQ(s.alphas_cumprod.scalar_type(), torch::kFloat64);
  ASSERT_EQ(s.alphas_cumprod.size(0), 1000);
  EXPECT_NEAR(abar[999], 4.04e-5, 0.01e-5);
  for (int t : {0, 1, 10, 500, 998, 999}) {
    SCOPED_TRACE(t);
    const double prev = t == 0 ? 1.0 : abar[t - 1];
    EXPECT_NEAR(s.betas[t].item<double>(), betas[t], 1e-15);
    EXPECT_NEAR(s.alphas_cumprod[t].item<double>() / abar[t], 1.0, 1e-12);
    EXPECT_NEAR(s.alphas_cumprod_prev[t].item<double>(), prev, 1e-15);
    EXPECT_NEAR(s.sqrt_alphas_cumprod[t].item<double>(), std::sqrt(abar[t]), 1e-12);
    EXPECT_NEAR(s.sqrt_one_minus_alphas_cumprod[t].item<double>(), std::sqrt(1 - abar[t]), 1e-12);
    EXPECT_NEAR(s.log_one_minus_alphas_cumprod[t].item<double>(), std::log(1 - abar[t]), 1e-12);
    EXPECT_NEAR(s.sqrt_recip_alphas_cumprod[t].item<double>() / std::sqrt(1 / abar[t]), 1, 1e-12);
    EXPECT_NEAR(s.sqrt_recipm1_alphas_cumprod[t].item<double>() / std::sqrt(1 / abar[t] - 1), 1,
                1e-12);
    const double posterior_variance = betas[t] * (1 - prev) / (1 - abar[t]);
    EXPECT_NEAR(s.posterior_variance[t].item<double>(), posterior_variance, 1e-15);
    EXPECT_NEAR(s.posterior_mean_coef1[t].item<double>(),
                betas[t] * std::sqrt(prev) / (1 - abar[t]), 1e-12);
    EXPECT_NEAR(s.posterior_mean_coef2[t].item<double>(),
                (1 - prev) * std::sqrt(1 - betas[t]) / (1 - abar[t]), 1e-12);
  }
  // beta-tilde_0 is 0; its log is clipped to log(beta-tilde_1).
  EXPECT_EQ(s.posterior_variance[0].item<double>(), 0.0);
  const double tilde1 = betas[1] * (1 - abar[0]) / (1 - abar[1]);
  EXPECT_NEAR(s.posterior_log_variance_clipped[0].item<double>(), std::log(tilde1), 1e-12);
  EXPECT_NEAR(s.posterior_log_variance_clipped[1].item<double>(), std::log(tilde1), 1e-12);
}

TEST(Schedule, CosineMatchesNicholDhariwal) {
  DiffusionConfig c;
  c.schedule = ScheduleKind::kCosine;
  const NoiseSchedule s = NoiseSchedule::Make(c);
  auto f = [](double t) {
    const double angle = (t / 1000.0 + 0.008) / 1.008 * kPi / 2;
    return std::cos(angle) * std::cos(angle);
  };
  for (int t : {0, 100, 500, 900}) {
    // Away from the clip at 0.999, abar_t = f(t + 1) / f(0).
    EXPECT_NEAR(s.alphas_cumprod[t].item<double>(), f(t + 1) / f(0), 1e-10) << t;
  }
  EXPECT_LE(s.betas.max().item<double>(), 0.999);
  EXPECT_NEAR(s.betas[999].item<double>(), 0.999, 1e-12) << "the last beta is clipped";
}

TEST(Diffusion, QSampleHasTheForwardMoments) {
  const GaussianDiffusion diffusion(Linear());
  const std::vector<double> abar = CumProd(LinearBetas(1000, 1e-4, 0.02));
  torch::manual_seed(0);
  const int64_t n = 200000;
  for (int step : {10, 300, 999}) {
    const torch::Tensor x0 = torch::full({n, 1, 1, 1}, 0.7);
    const torch::Tensor t = torch::full({n}, step, torch::kLong);
    const torch::Tensor x_t = diffusion.q_sample(x0, t, torch::randn({n, 1, 1, 1}));
    const double mean = x_t.mean().item<double>();
    const double var = x_t.to(torch::kFloat64).var().item<double>();
    // Standard errors: sqrt(var / n) < 0.0023 for the mean, var sqrt(2 / n) for the variance.
    EXPECT_NEAR(mean, std::sqrt(abar[step]) * 0.7, 0.01) << step;
    EXPECT_NEAR(var, 1 - abar[step], 0.01 * (1 - abar[step]) + 1e-4) << step;
  }
}

TEST(Diffusion, PosteriorIsBayesRuleOfTheForwardProcess) {
  // q(x_{t-1} | x_t, x0) from x_{t-1} | x0 ~ N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) and
  // x_t | x_{t-1} ~ N(sqrt(alpha_t) x_{t-1}, beta_t): precisions add, means weight by them.
  const GaussianDiffusion diffusion(Linear());
  const std::vector<double> betas = LinearBetas(1000, 1e-4, 0.02);
  const std::vector<double> abar = CumProd(betas);
  for (int step : {1, 5, 250, 999}) {
    const double x0 = -0.3, x_t = 1.1;
    const double prior_var = 1 - abar[step - 1];
    const double precision = 1 / prior_var + (1 - betas[step]) / betas[step];
    const double var = 1 / precision;
    const double mean = var * (std::sqrt(abar[step - 1]) * x0 / prior_var +
                               std::sqrt(1 - betas[step]) * x_t / betas[step]);
    const Posterior p =
        diffusion.q_posterior(torch::full({1, 1, 1, 1}, x0), torch::full({1, 1, 1, 1}, x_t),
                              torch::full({1}, step, torch::kLong));
    EXPECT_NEAR(p.mean.item<double>(), mean, 1e-5 * std::max(1.0, std::abs(mean))) << step;
    EXPECT_NEAR(p.variance.item<double>() / var, 1.0, 1e-5) << step;
    EXPECT_NEAR(p.log_variance.item<double>(), std::log(var), 1e-5) << step;
  }
}

TEST(Diffusion, PredictionsInvertTheForwardProcess) {
  const GaussianDiffusion diffusion(Linear());
  torch::manual_seed(1);
  const torch::Tensor x0 = torch::rand({8, 3, 4, 4}) * 2 - 1;
  const torch::Tensor noise = torch::randn({8, 3, 4, 4});
  const torch::Tensor t = torch::tensor({0, 1, 50, 200, 500, 700, 900, 999}, torch::kLong);
  const torch::Tensor x_t = diffusion.q_sample(x0, t, noise);
  EXPECT_LT((diffusion.predict_start_from_noise(x_t, t, noise) - x0).abs().max().item<double>(),
            2e-3);
  EXPECT_LT((diffusion.predict_noise_from_start(x_t, t, x0) - noise).abs().max().item<double>(),
            2e-3);
  const torch::Tensor v = diffusion.velocity(x0, t, noise);
  EXPECT_LT((diffusion.predict_start_from_v(x_t, t, v) - x0).abs().max().item<double>(), 1e-5);
}

// A denoiser that always predicts zeros, so every loss is a plain function of its target.
torch::Tensor Zeros(const torch::Tensor& x, const torch::Tensor&) { return torch::zeros_like(x); }

TEST(Diffusion, LossTargetsOfEachObjective) {
  torch::manual_seed(2);
  const torch::Tensor x0 = torch::rand({4, 3, 8, 8}) * 2 - 1;
  const torch::Tensor noise = torch::randn({4, 3, 8, 8});
  const torch::Tensor t = torch::tensor({3, 100, 600, 999}, torch::kLong);
  const std::vector<double> abar = CumProd(LinearBetas(1000, 1e-4, 0.02));

  DiffusionConfig c = Linear();
  EXPECT_NEAR(GaussianDiffusion(c).TrainingLoss(Zeros, x0, t, noise).loss.item<double>(),
              noise.square().mean().item<double>(), 1e-6);
  c.loss = LossKind::kL1;
  EXPECT_NEAR(GaussianDiffusion(c).TrainingLoss(Zeros, x0, t, noise).loss.item<double>(),
              noise.abs().mean().item<double>(), 1e-6);
  c.loss = LossKind::kL2;
  c.objective = Objective::kX0;
  EXPECT_NEAR(GaussianDiffusion(c).TrainingLoss(Zeros, x0, t, noise).loss.item<double>(),
              x0.square().mean().item<double>(), 1e-6);
  c.objective = Objective::kV;
  double expected = 0;
  for (int i = 0; i < 4; ++i) {
    const int step = t[i].item<int>();
    const torch::Tensor v = std::sqrt(abar[step]) * noise[i] - std::sqrt(1 - abar[step]) * x0[i];
    expected += v.square().mean().item<double>() / 4;
  }
  EXPECT_NEAR(GaussianDiffusion(c).TrainingLoss(Zeros, x0, t, noise).loss.item<double>(), expected,
              1e-5);
}

// The batch mean of per_sample[i] * weight(snr of t[i]), with snr from abar in double.
template <typename WeightFn>
double WeightedMean(const torch::Tensor& per_sample, const torch::Tensor& t,
                    const std::vector<double>& abar, WeightFn weight) {
  double sum = 0;
  for (int64_t i = 0; i < t.size(0); ++i) {
    const double a = abar[t[i].item<int>()];
    sum += per_sample[i].item<double>() * weight(a / (1 - a));
  }
  return sum / t.size(0);
}

TEST(Diffusion, LossWeightings) {
  torch::manual_seed(3);
  const torch::Tensor x0 = torch::rand({4, 3, 8, 8}) * 2 - 1;
  const torch::Tensor noise = torch::randn({4, 3, 8, 8});
  const torch::Tensor t = torch::tensor({0, 100, 600, 999}, torch::kLong);
  const std::vector<double> abar = CumProd(LinearBetas(1000, 1e-4, 0.02));
  const torch::Tensor per_sample = noise.square().flatten(1).mean(1);

  DiffusionConfig c = Linear();
  c.weighting = LossWeighting::kMinSnr;
  c.min_snr_gamma = 5.0;
  const double expected =
      WeightedMean(per_sample, t, abar, [](double snr) { return std::min(snr, 5.0) / snr; });
  const DiffusionLoss min_snr = GaussianDiffusion(c).TrainingLoss(Zeros, x0, t, noise);
  EXPECT_NEAR(min_snr.loss.item<double>(), expected, 1e-5);
  EXPECT_TRUE(torch::allclose(min_snr.per_sample, per_sample));

  c.weighting = LossWeighting::kP2;
  c.p2_gamma = 0.5;
  c.p2_k = 1.0;
  EXPECT_NEAR(
      GaussianDiffusion(c).TrainingLoss(Zeros, x0, t, noise).loss.item<double>(),
      WeightedMean(per_sample, t, abar, [](double snr) { return std::pow(1.0 + snr, -0.5); }),
      1e-5);
}

// The exact eps-predictor for data x0 ~ N(0, s^2): x_t ~ N(0, abar s^2 + 1 - abar), so
// E[eps | x_t] = sqrt(1 - abar) x_t / (abar s^2 + 1 - abar).
Denoiser GaussianOracle(double data_std) {
  const NoiseSchedule s = NoiseSchedule::Make(Linear());
  const torch::Tensor abar = s.alphas_cumprod.to(torch::kFloat32);
  return [abar, data_std](const torch::Tensor& x, const torch::Tensor& t) {
    const torch::Tensor a = abar.index_select(0, t).view({-1, 1, 1, 1});
    return torch::sqrt(1 - a) * x / (a * data_std * data_std + 1 - a);
  };
}

TEST(Sampler, DdpmWithTheExactDenoiserSamplesTheData) {
  const GaussianDiffusion diffusion(Linear());
  const double data_std = 0.5;
  for (VarianceKind variance : {VarianceKind::kFixedSmall, VarianceKind::kFixedLarge}) {
    const torch::Tensor x = diffusion.SampleDdpm(GaussianOracle(data_std), {4096, 1, 2, 2},
                                                 variance, /*clip_x0=*/false, /*seed=*/5);
    // The standard error of the std over 16384 draws is about 0.003.
    EXPECT_NEAR(x.mean().item<double>(), 0.0, 0.02) << Name(variance);
    EXPECT_NEAR(x.std().item<double>(), data_std, 0.03) << Name(variance);
  }
}

TEST(Sampler, DdimWithEtaOneOverAllStepsMatchesAncestralSampling) {
  const GaussianDiffusion diffusion(Linear());
  const Denoiser oracle = GaussianOracle(0.5);
  const torch::Tensor ddpm =
      diffusion.SampleDdpm(oracle, {2048, 1, 2, 2}, VarianceKind::kFixedSmall, true, 9);
  const torch::Tensor ddim = diffusion.SampleDdim(oracle, {2048, 1, 2, 2}, 1000, 1.0, true, 9);
  // Same statistics ...
  EXPECT_NEAR(ddim.mean().item<double>(), ddpm.mean().item<double>(), 0.01);
  EXPECT_NEAR(ddim.std().item<double>(), ddpm.std().item<double>(), 0.01);
  // ... and, drawing the same noise in the same order, the same samples up to float rounding.
  EXPECT_LT((ddim - ddpm).abs().max().item<double>(), 1e-3);
}

TEST(Sampler, DeterministicDdimWithFewStepsSamplesTheData) {
  const GaussianDiffusion diffusion(Linear());
  const torch::Tensor x =
      diffusion.SampleDdim(GaussianOracle(0.5), {4096, 1, 2, 2}, 100, 0.0, false, 11);
  EXPECT_NEAR(x.std().item<double>(), 0.5, 0.03);
}

TEST(Sampler, SameSeedSameSamplesOtherSeedOtherSamples) {
  const GaussianDiffusion diffusion(Linear(100));
  // A nonlinear denoiser, so that any stray randomness would show.
  const Denoiser model = [](const torch::Tensor& x, const torch::Tensor& t) {
    return torch::tanh(x * 0.3) + t.to(torch::kFloat32).view({-1, 1, 1, 1}) * 1e-3;
  };
  for (SamplerKind kind : {SamplerKind::kDdpm, SamplerKind::kDdim}) {
    SampleConfig sc;
    sc.sampler = kind;
    sc.steps = 20;
    sc.eta = 0.5;
    sc.seed = 42;
    const torch::Tensor a = diffusion.Sample(model, {3, 3, 8, 8}, sc);
    const torch::Tensor b = diffusion.Sample(model, {3, 3, 8, 8}, sc);
    sc.seed = 43;
    const torch::Tensor c = diffusion.Sample(model, {3, 3, 8, 8}, sc);
    EXPECT_TRUE(torch::equal(a, b)) << Name(kind);
    EXPECT_FALSE(torch::allclose(a, c)) << Name(kind);
    EXPECT_LE(a.abs().max().item<double>(), 1.0 + 1e-6) << "clipped x0 keeps samples in range";
  }
}

TEST(Sampler, ReportsProgress) {
  const GaussianDiffusion diffusion(Linear(50));
  int calls = 0, last = 0;
  diffusion.SampleDdim(Zeros, {1, 1, 2, 2}, 10, 0.0, true, 0, [&](int done, int total) {
    ++calls;
    last = done;
    EXPECT_EQ(total, 10);
  });
  EXPECT_EQ(calls, 10);
  EXPECT_EQ(last, 10);
}

// Per-image noise streams (ddpm_sample, sampling across ranks): an image depends on its own
// stream alone, so drawing images 0-4 in one batch or as batches {3, 0} and {4, 1, 2} (any
// split, any order) gives the same images bit for bit, for the ancestral, respaced and DDIM
// samplers; and two different streams give different images.
TEST(NoiseStreams, AnImageDependsOnItsOwnStreamAloneNotOnItsBatch) {
  const GaussianDiffusion diffusion(Linear(20));
  const Denoiser model = [](const torch::Tensor& x, const torch::Tensor& t) {
    return 0.3 * x + 0.001 * t.to(torch::kFloat32).view({-1, 1, 1, 1});
  };
  SampleConfig ddpm, respaced, ddim;
  respaced.steps = 7;
  ddim.sampler = SamplerKind::kDdim;
  ddim.steps = 5;
  ddim.eta = 1.0;
  auto draw = [&](const SampleConfig& config, const std::vector<int64_t>& indices) {
    std::vector<uint64_t> seeds;
    for (int64_t i : indices) seeds.push_back(ImageSeed(11, i));
    NoiseStreams streams(seeds);
    return diffusion.Sample(model, {static_cast<int64_t>(indices.size()), 2, 4, 4}, config,
                            streams);
  };
  for (const SampleConfig& config : {ddpm, respaced, ddim}) {
    const torch::Tensor whole = draw(config, {0, 1, 2, 3, 4});
    const torch::Tensor a = draw(config, {3, 0}), b = draw(config, {4, 1, 2});
    EXPECT_TRUE(torch::equal(a[0], whole[3]) && torch::equal(a[1], whole[0]));
    EXPECT_TRUE(torch::equal(b[0], whole[4]) && torch::equal(b[1], whole[1]) &&
                torch::equal(b[2], whole[2]));
    EXPECT_FALSE(torch::equal(whole[0], whole[1]));
  }
  EXPECT_NE(ImageSeed(11, 0), ImageSeed(11, 1));
  EXPECT_NE(ImageSeed(11, 0), ImageSeed(12, 0));
  // A single stream is what the samplers' seed argument means.
  NoiseStreams one(7);
  EXPECT_TRUE(
      torch::equal(diffusion.SampleDdpm(model, {3, 2, 4, 4}, VarianceKind::kFixedLarge, true, one),
                   diffusion.SampleDdpm(model, {3, 2, 4, 4}, VarianceKind::kFixedLarge, true, 7)));
}

// Respacing (Nichol & Dhariwal, section 4). With every timestep it is the original process:
// the same betas and, for one seed, the same samples bit for bit.
TEST(Respacing, AllTimestepsReproduceTheFullSamplerExactly) {
  const GaussianDiffusion diffusion(Linear(50));
  std::vector<int64_t> all(50);
  for (int i = 0; i < 50; ++i) all[i] = i;
  const GaussianDiffusion respaced = diffusion.Respaced(all);
  EXPECT_TRUE(torch::equal(respaced.schedule64().betas, diffusion.schedule64().betas));
  const Denoiser model = [](const torch::Tensor& x, const torch::Tensor& t) {
    return 0.3 * x + 0.001 * t.to(torch::kFloat32).view({-1, 1, 1, 1});
  };
  for (const VarianceKind variance : {VarianceKind::kFixedLarge, VarianceKind::kFixedSmall}) {
    EXPECT_TRUE(torch::equal(respaced.SampleDdpm(model, {3, 2, 4, 4}, variance, true, 7),
                             diffusion.SampleDdpm(model, {3, 2, 4, 4}, variance, true, 7)));
  }
  // The evenly strided subsequence: first 0, last T - 1, as improved-diffusion spaces them.
  const GaussianDiffusion big(Linear(1000));
  const std::vector<int64_t> strided = big.EvenlyStrided(50);
  EXPECT_EQ(strided.front(), 0);
  EXPECT_EQ(strided.back(), 999);
  EXPECT_EQ(strided[1], 20);  // round(999 / 49) = round(20.39)
  EXPECT_EQ(strided.size(), 50u);
}

// Gaussian data x_0 ~ N(0, s^2) and the exact denoiser E[eps | x_t] at the original timestep:
// every step of the respaced sampler is linear, x <- a_k x + sigma_k z, so the samples'
// variance follows V <- a_k^2 V + sigma_k^2 from V = 1, computed here in float64 from the
// original alphas_cumprod. The sampler must match it; and with 50 of 1000 steps and fixedlarge
// it stays within 10% of s^2 (the recursion gives 1.072 s^2; fixedsmall gives 0.786 s^2).
TEST(Respacing, FiftyStepsOnGaussianDataGiveTheVarianceTheRecursionPredicts) {
  const GaussianDiffusion diffusion(Linear(1000));
  const auto& abar = diffusion.schedule64().alphas_cumprod;
  const double s = 0.5;
  const Denoiser exact = [&](const torch::Tensor& x_t, const torch::Tensor& t) {
    const torch::Tensor ab = abar.index_select(0, t).view({-1, 1, 1, 1});
    return (torch::sqrt(1.0 - ab) / (ab * s * s + 1.0 - ab) * x_t.to(torch::kFloat64))
        .to(torch::kFloat32);
  };
  const std::vector<int64_t> steps = diffusion.EvenlyStrided(50);
  for (const VarianceKind variance : {VarianceKind::kFixedLarge, VarianceKind::kFixedSmall}) {
    double predicted = 1.0;
    for (int k = 49; k >= 0; --k) {
      const double ab = abar[steps[k]].item<double>();
      const double ab_prev = k > 0 ? abar[steps[k - 1]].item<double>() : 1.0;
      const double beta = 1.0 - ab / ab_prev;
      const double c = std::sqrt(ab) * s * s / (ab * s * s + 1.0 - ab);  // E[x0 | x] = c x
      const double a = beta * std::sqrt(ab_prev) / (1.0 - ab) * c +
                       (1.0 - ab_prev) * std::sqrt(ab / ab_prev) / (1.0 - ab);
      const double beta_tilde = beta * (1.0 - ab_prev) / (1.0 - ab);
      const double noise =
          k == 0 ? 0.0 : (variance == VarianceKind::kFixedSmall ? beta_tilde : beta);
      predicted = a * a * predicted + noise;
    }
    SampleConfig config;
    config.sampler = SamplerKind::kDdpm;
    config.variance = variance;
    config.steps = 50;
    config.clip_x0 = false;
    config.seed = 11;
    const torch::Tensor samples = diffusion.Sample(exact, {256, 3, 8, 8}, config);
    const double measured = samples.to(torch::kFloat64).var().item<double>();
    // 49,152 values: the variance estimate's relative standard deviation is sqrt(2/N) = 0.64%.
    EXPECT_NEAR(measured, predicted, 0.04 * predicted) << Name(variance);
    if (variance == VarianceKind::kFixedLarge) {
      EXPECT_NEAR(predicted, s * s, 0.1 * s * s);
    }
  }
}

// EDM's sampler (Karras et al. 2022) on Gaussian data x_0 ~ N(0, s^2) with the exact eps
// model: in EDM's variable x = x_t / sqrt(abar) at noise level sigma = sqrt(1/abar - 1) the
// denoiser is D(x; sigma) = s^2 / (s^2 + sigma^2) x. The test writes Algorithm 1 and Algorithm
// 2 itself in float64 from the paper (Eq. 5 levels, rho = 7, rounded to the nearest trained
// level; Heun except into 0), from the same noise, and the sampler must match them.
namespace heun {

constexpr double kS = 0.5;

// The trained noise levels of the linear schedule, from its closed form.
std::vector<double> TrainedSigmas(int timesteps) {
  std::vector<double> sigmas;
  double abar = 1.0;
  for (int j = 0; j < timesteps; ++j) {
    abar *= 1.0 - (1e-4 + (0.02 - 1e-4) * j / (timesteps - 1));
    sigmas.push_back(std::sqrt(1.0 / abar - 1.0));
  }
  return sigmas;
}

double Nearest(const std::vector<double>& trained, double sigma) {
  double best = trained[0];
  for (double level : trained) {
    if (std::abs(level - sigma) < std::abs(best - sigma)) best = level;
  }
  return best;
}

// Algorithm 2 (Algorithm 1 when churn is 0) on x [N] float64, drawing noise from streams.
torch::Tensor Reference(int steps, double churn, NoiseStreams& streams, torch::IntArrayRef shape) {
  const std::vector<double> trained = TrainedSigmas(1000);
  const double smin = std::max(0.002, trained.front()), smax = std::min(80.0, trained.back());
  std::vector<double> t;
  for (int i = 0; i < steps; ++i) {
    const double level =
        std::pow(std::pow(smax, 1 / 7.0) +
                     i / (steps - 1.0) * (std::pow(smin, 1 / 7.0) - std::pow(smax, 1 / 7.0)),
                 7.0);
    t.push_back(Nearest(trained, level));
  }
  t.push_back(0.0);
  const auto d = [](const torch::Tensor& x, double sigma) {
    return (x - kS * kS / (kS * kS + sigma * sigma) * x) / sigma;
  };
  torch::Tensor x = streams.Draw(shape, false).to(torch::kFloat64) * t[0];
  const double gamma = std::min(churn / steps, std::sqrt(2.0) - 1.0);
  for (int i = 0; i < steps; ++i) {
    double t_hat = t[i];
    if (gamma > 0) {
      t_hat = Nearest(trained, t[i] + gamma * t[i]);
      x = x +
          std::sqrt(t_hat * t_hat - t[i] * t[i]) * streams.Draw(shape, false).to(torch::kFloat64);
    }
    const torch::Tensor d_cur = d(x, t_hat);
    torch::Tensor next = x + (t[i + 1] - t_hat) * d_cur;
    if (i + 1 < steps) next = x + (t[i + 1] - t_hat) * 0.5 * (d_cur + d(next, t[i + 1]));
    x = next;
  }
  return x;
}

}  // namespace heun

TEST(Heun, MatchesAlgorithmsOneAndTwoAndTheirVarianceOnGaussianData) {
  const GaussianDiffusion diffusion(Linear(1000));
  const auto& abar = diffusion.schedule64().alphas_cumprod;
  const double s = heun::kS;
  const Denoiser exact = [&](const torch::Tensor& x_t, const torch::Tensor& t) {
    const torch::Tensor ab = abar.index_select(0, t).view({-1, 1, 1, 1});
    return (torch::sqrt(1.0 - ab) / (ab * s * s + 1.0 - ab) * x_t.to(torch::kFloat64))
        .to(torch::kFloat32);
  };
  const std::vector<int64_t> shape = {1000, 1, 2, 2};
  for (const double churn : {0.0, 10.0}) {
    NoiseStreams streams(5), again(5);
    const torch::Tensor samples =
        diffusion.SampleHeun(exact, shape, 18, churn, 1.0, streams).to(torch::kFloat64);
    const torch::Tensor expected = heun::Reference(18, churn, again, shape);
    const double scale = expected.abs().max().item<double>();
    EXPECT_LT((samples - expected).abs().max().item<double>(), 1e-4 * scale) << "churn " << churn;
  }
  // The variance: Algorithm 1 is linear here, x_N = x_0 prod_i f_i, so its output variance is
  // t_0^2 prod_i f_i^2 (the reference above at x_0 = 1, squared). At 18 steps the scheme gives
  // 1.096 s^2 on this data; at 100 steps 1.002 s^2. 4000 values estimate a variance to a
  // relative standard deviation of sqrt(2/4000) = 2.2%; the bound is 5 of those.
  for (const int steps : {18, 100}) {
    NoiseStreams streams(9), unit(9);
    const torch::Tensor samples =
        diffusion.SampleHeun(exact, shape, steps, 0.0, 1.0, streams).to(torch::kFloat64);
    // One value through the reference: it ends at z t_0 prod_i f_i for its first noise z.
    const torch::Tensor path = heun::Reference(steps, 0.0, unit, {1});
    NoiseStreams first(9);
    const double z = first.Draw({1}, false).item<double>();
    const double factor = path.item<double>() / z;  // t_0 prod_i f_i
    const double predicted = factor * factor;
    const double measured = samples.var().item<double>();
    std::printf("heun %d steps: variance %.4f, predicted %.4f, s^2 %.4f\n", steps, measured,
                predicted, s * s);
    EXPECT_NEAR(measured, predicted, 5 * std::sqrt(2.0 / 4000) * predicted) << steps;
    EXPECT_NEAR(predicted, s * s, (steps == 18 ? 0.1 : 0.005) * s * s) << steps;
  }
  // EDM's defaults: 18 steps, 35 network evaluations.
  int calls = 0;
  const Denoiser counting = [&](const torch::Tensor& x_t, const torch::Tensor& t) {
    ++calls;
    return exact(x_t, t);
  };
  NoiseStreams streams(1);
  diffusion.SampleHeun(counting, {2, 1, 2, 2}, 18, 0.0, 1.0, streams);
  EXPECT_EQ(calls, 35);
  SampleConfig config;
  config.sampler = SamplerKind::kHeun;
  EXPECT_EQ(config.ResolvedSteps(1000), 18);
}

}  // namespace
}  // namespace ddpm
