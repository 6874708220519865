// Importance-sampled timesteps (Nichol & Dhariwal 2021, section 3.3): the history's rules, the
// distribution the trainer draws from, the reweighted loss's unbiasedness, and a resume that
// keeps the history. Expected values are computed here in float64 from the paper's rule
// p_t ~ sqrt(E[L_t^2]), mixed with 0.001 of the uniform distribution.
#include "trainer/timestep_sampler.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "config/config.h"
#include "trainer/checkpoint_keys.h"
#include "trainer/data.h"
#include "trainer/tensor_io.h"
#include "trainer/trainer.h"

namespace ddpm {
namespace {

Config SamplerConfig(int timesteps, int batch) {
  return LoadConfigString(R"(
model: {ch: 16, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [], image_size: 8,
        norm_groups: 8, dropout: 0.0}
diffusion: {timesteps: )" +
                          std::to_string(timesteps) +
                          R"(}
train: {batch_size: )" + std::to_string(batch) +
                          R"(, lr: 0.001, warmup_steps: 0, seed: 3,
        timestep_sampler: loss_second_moment}
data: {shapes_size: 8}
)");
}

// The planted history: loss k at t is (t + 1) (1 + k / 10), with every tenth t's losses zero.
double Planted(int t, int k) { return t % 10 == 9 ? 0.0 : (t + 1) * (1.0 + k / 10.0); }

// p_t from the planted history, by the paper's rule.
std::vector<double> ExpectedProbabilities(int timesteps) {
  std::vector<double> rms(timesteps);
  double total = 0;
  for (int t = 0; t < timesteps; ++t) {
    double sum = 0;
    for (int k = 0; k < TimestepSampler::kHistory; ++k) sum += Planted(t, k) * Planted(t, k);
    rms[t] = std::sqrt(sum / TimestepSampler::kHistory);
    total += rms[t];
  }
  std::vector<double> p(timesteps);
  for (int t = 0; t < timesteps; ++t) p[t] = 0.999 * rms[t] / total + 0.001 / timesteps;
  return p;
}

// A trainer whose sampler holds the planted history, loaded through its checkpoint state.
void PlantHistory(Trainer& trainer) {
  const int timesteps = trainer.diffusion().timesteps();
  std::map<std::string, torch::Tensor> state = trainer.State();
  torch::Tensor history = torch::empty({timesteps, TimestepSampler::kHistory}, torch::kFloat64);
  for (int t = 0; t < timesteps; ++t) {
    for (int k = 0; k < TimestepSampler::kHistory; ++k) history[t][k] = Planted(t, k);
  }
  state[checkpoint_keys::kTimestepLossHistory] = history;
  state[checkpoint_keys::kTimestepLossCounts] =
      torch::full({timesteps}, TimestepSampler::kHistory, torch::kLong);
  trainer.LoadState(state, "planted");
}

TEST(TimestepSampler, UniformUntilEveryHistoryIsFullThenTheRootMeanSquareRule) {
  TimestepSampler sampler(TimestepSamplerKind::kLossSecondMoment, 3);
  // t = 0 and 1 get 10 losses, t = 2 gets 9: still uniform.
  for (int k = 0; k < 10; ++k) sampler.Update({0, 1}, {1.0 + k, 2.0});
  for (int k = 0; k < 9; ++k) sampler.Update({2}, {4.0});
  EXPECT_FALSE(sampler.loss_aware());
  for (double p : sampler.Probabilities()) EXPECT_DOUBLE_EQ(p, 1.0 / 3);
  sampler.Update({2}, {4.0});
  ASSERT_TRUE(sampler.loss_aware());
  // t = 0 holds 1..10: RMS sqrt(385 / 10); t = 1: 2; t = 2: 4.
  std::vector<double> rms = {std::sqrt(38.5), 2.0, 4.0};
  const double total = rms[0] + rms[1] + rms[2];
  std::vector<double> p = sampler.Probabilities();
  for (int t = 0; t < 3; ++t) EXPECT_NEAR(p[t], 0.999 * rms[t] / total + 0.001 / 3, 1e-15);
  // A full history shifts its oldest loss out: t = 0 now holds 2..10 and 100.
  sampler.Update({0}, {100.0});
  rms[0] = std::sqrt((385.0 - 1.0 + 10000.0) / 10);
  const double total2 = rms[0] + rms[1] + rms[2];
  p = sampler.Probabilities();
  EXPECT_NEAR(p[0], 0.999 * rms[0] / total2 + 0.001 / 3, 1e-15);
  EXPECT_EQ(sampler.history()[0], 2.0);
  EXPECT_EQ(sampler.history()[9], 100.0);
  // The inverse CDF: u below p_0 gives 0, just above gives 1, the top gives T - 1.
  const TimestepSampler::Draw draw = sampler.Distribution();
  EXPECT_EQ(draw.Timestep(0.0), 0);
  EXPECT_EQ(draw.Timestep(p[0] * 0.999), 0);
  EXPECT_EQ(draw.Timestep(p[0] * 1.001), 1);
  EXPECT_EQ(draw.Timestep(std::nextafter(1.0, 0.0)), 2);
  EXPECT_NEAR(draw.weight[1], 1.0 / (3 * p[1]), 1e-12);
  // The uniform sampler keeps nothing and ignores losses.
  TimestepSampler uniform(TimestepSamplerKind::kUniform, 3);
  uniform.Update({0}, {1.0});
  EXPECT_FALSE(uniform.loss_aware());
  EXPECT_TRUE(uniform.history().empty());
  // Bad input names itself.
  EXPECT_THROW(sampler.Update({3}, {1.0}), std::invalid_argument);
  EXPECT_THROW(sampler.Restore({1.0}, {0, 0, 0}, "x"), std::invalid_argument);
  EXPECT_THROW(sampler.Restore(std::vector<double>(30), {0, 11, 0}, "x"), std::invalid_argument);
}

TEST(TimestepSampler, TheTrainerDrawsThePlantedDistribution) {
  // 20 timesteps, 20000 draws from the per-sample streams of one step: Pearson's chi-square
  // against the expected p_t, 19 degrees of freedom, below SciPy's chi2.ppf(0.999, 19) =
  // 43.82 (at this fixed seed; a wrong rule, weight or inverse CDF lands in the thousands).
  const int timesteps = 20, draws = 20000;
  Trainer trainer(SamplerConfig(timesteps, 16), torch::kCPU);
  PlantHistory(trainer);
  ASSERT_TRUE(trainer.timestep_sampler().loss_aware());
  const StepDraw draw = trainer.DrawTimestepsAndNoise(7, 0, draws, {1, 1, 1});
  const std::vector<double> p = ExpectedProbabilities(timesteps);
  std::vector<double> observed(timesteps, 0);
  for (int64_t t : draw.host_t) observed[t] += 1;
  double chi_square = 0;
  for (int t = 0; t < timesteps; ++t) {
    const double expected = draws * p[t];
    chi_square += (observed[t] - expected) * (observed[t] - expected) / expected;
  }
  std::printf("chi-square %.2f over %d timesteps, %d draws\n", chi_square, timesteps, draws);
  EXPECT_LT(chi_square, 43.82);
  // The zero-loss timesteps still get the uniform share's draws, about 20000 * 0.001 / 20 = 1.
  EXPECT_LT(observed[9], 10);
  // Every drawn sample carries 1 / (T p_t).
  const torch::Tensor weight = draw.weight.to(torch::kFloat64);
  for (int i = 0; i < 200; ++i) {
    const int64_t t = draw.host_t[i];
    EXPECT_NEAR(weight[i].item<double>(), 1.0 / (timesteps * p[t]), 1e-6 / (timesteps * p[t]));
  }
}

TEST(TimestepSampler, TheReweightedLossIsAnUnbiasedEstimateOfTheUniformOne) {
  // A per-timestep loss f(t) close to what the sampler favours (as training's losses are, zero
  // where the history is): the
  // mean of w(t) f(t) over draws from p estimates the uniform mean of f. The tolerance is four
  // standard errors, from the estimator's exact variance sum_t p_t (w_t f_t)^2 - mean^2.
  const int timesteps = 20, draws = 20000;
  Trainer trainer(SamplerConfig(timesteps, 16), torch::kCPU);
  PlantHistory(trainer);
  const std::vector<double> p = ExpectedProbabilities(timesteps);
  std::vector<double> f(timesteps);
  double uniform_mean = 0;
  for (int t = 0; t < timesteps; ++t) {
    f[t] = t % 10 == 9 ? 0.0 : (t + 1) * (1.3 + std::cos(t));
    uniform_mean += f[t] / timesteps;
  }
  double second = 0;
  for (int t = 0; t < timesteps; ++t) {
    const double wf = f[t] / (timesteps * p[t]);
    second += p[t] * wf * wf;
  }
  const double standard_error = std::sqrt((second - uniform_mean * uniform_mean) / draws);
  const StepDraw draw = trainer.DrawTimestepsAndNoise(11, 0, draws, {1, 1, 1});
  const torch::Tensor weight = draw.weight.to(torch::kFloat64);
  const double* w = weight.data_ptr<double>();
  double estimate = 0;
  for (int i = 0; i < draws; ++i) estimate += w[i] * f[draw.host_t[i]] / draws;
  std::printf("reweighted mean %.4f, uniform mean %.4f, standard error %.4f\n", estimate,
              uniform_mean, standard_error);
  EXPECT_NEAR(estimate, uniform_mean, 4 * standard_error);
  // Without the weights the mean is biased towards the favoured timesteps, by many errors.
  double unweighted = 0;
  for (int i = 0; i < draws; ++i) unweighted += f[draw.host_t[i]] / draws;
  EXPECT_GT(std::abs(unweighted - uniform_mean), 20 * standard_error);
}

TEST(TimestepSampler, TheTrainingLossTakesTheImportanceWeights) {
  const Config config = SamplerConfig(20, 8);
  Trainer trainer(config, torch::kCPU);
  const GaussianDiffusion& diffusion = trainer.diffusion();
  const Denoiser denoiser = EvalDenoiser(trainer.model());
  torch::NoGradGuard no_grad;
  const torch::Tensor x0 = torch::rand({4, 3, 8, 8}) * 2 - 1;
  const torch::Tensor t = torch::tensor({0, 5, 10, 19}, torch::kLong);
  const torch::Tensor noise = torch::randn({4, 3, 8, 8});
  const torch::Tensor w = torch::tensor({0.5f, 2.0f, 1.0f, 4.0f});
  const DiffusionLoss plain = diffusion.TrainingLoss(denoiser, x0, t, noise);
  const DiffusionLoss weighted = diffusion.TrainingLoss(denoiser, x0, t, noise, w);
  EXPECT_TRUE(torch::equal(plain.per_sample, weighted.per_sample));
  EXPECT_NEAR(weighted.loss.item<double>(), (plain.per_sample * w).mean().item<double>(), 1e-6);
}

TEST(TimestepSampler, UniformUntilWarmAndTheHistoryResumesBitwise) {
  // T = 4 and 32 samples a step: every timestep has its 10 losses within a few steps.
  const Config config = SamplerConfig(4, 32);
  Config uniform_config = config;
  uniform_config.train.timestep_sampler = TimestepSamplerKind::kUniform;
  ShapesDataset data(64, 8, 0);
  EpochSampler order(data.size(), 0);
  std::vector<torch::Tensor> batches;
  for (int i = 0; i < 8; ++i) {
    std::vector<uint8_t> flips;
    const std::vector<uint8_t> bytes = ReadBatch(data, order.Next(32, &flips), flips);
    batches.push_back(
        torch::from_blob(const_cast<uint8_t*>(bytes.data()), {32, 3, 8, 8}, torch::kUInt8)
                .to(torch::kFloat32) /
            127.5 -
        1.0);
  }
  // The first step draws exactly what a uniform run draws.
  {
    Trainer aware(config, torch::kCPU), uniform(uniform_config, torch::kCPU);
    EXPECT_EQ(aware.DrawTimestepsAndNoise(0, 0, 32, {3, 8, 8}).host_t,
              uniform.DrawTimestepsAndNoise(0, 0, 32, {3, 8, 8}).host_t);
  }
  Trainer straight(config, torch::kCPU);
  for (int i = 0; i < 8; ++i) straight.Step(batches[i]);
  ASSERT_TRUE(straight.timestep_sampler().loss_aware());

  Trainer first(config, torch::kCPU);
  for (int i = 0; i < 4; ++i) first.Step(batches[i]);
  ASSERT_TRUE(first.timestep_sampler().loss_aware()) << "warm before the checkpoint";
  // Loss-aware draws differ from uniform ones at the same step.
  {
    Trainer uniform(uniform_config, torch::kCPU);
    EXPECT_NE(first.DrawTimestepsAndNoise(4, 0, 32, {3, 8, 8}).host_t,
              uniform.DrawTimestepsAndNoise(4, 0, 32, {3, 8, 8}).host_t);
  }
  const std::map<std::string, torch::Tensor> state = first.State();
  ASSERT_EQ(state.count(checkpoint_keys::kTimestepLossHistory), 1u);
  Trainer resumed(config, torch::kCPU);
  resumed.LoadState(state, "state after 4 steps");
  for (int i = 4; i < 8; ++i) resumed.Step(batches[i]);
  EXPECT_TRUE(torch::equal(resumed.parameters().data(), straight.parameters().data()))
      << "a resume with the history continues bitwise";
  EXPECT_EQ(resumed.timestep_sampler().history(), straight.timestep_sampler().history());

  // Without the history (a checkpoint of a uniform run) the draws differ: the check above is
  // not vacuous.
  std::map<std::string, torch::Tensor> bare = state;
  bare.erase(checkpoint_keys::kTimestepLossHistory);
  bare.erase(checkpoint_keys::kTimestepLossCounts);
  Trainer fresh(config, torch::kCPU);
  fresh.LoadState(bare, "state without the history");
  EXPECT_FALSE(fresh.timestep_sampler().loss_aware());
  for (int i = 4; i < 8; ++i) fresh.Step(batches[i]);
  EXPECT_FALSE(torch::equal(fresh.parameters().data(), straight.parameters().data()));

  // A history of another T is refused naming the checkpoint.
  std::map<std::string, torch::Tensor> wrong = state;
  wrong[checkpoint_keys::kTimestepLossHistory] =
      torch::zeros({5, TimestepSampler::kHistory}, torch::kFloat64);
  Trainer refused(config, torch::kCPU);
  try {
    refused.LoadState(wrong, "ckpt/step_4");
    ADD_FAILURE() << "a history of 5 timesteps loaded into T = 4";
  } catch (const CheckpointError& error) {
    EXPECT_NE(std::string(error.what()).find("ckpt/step_4"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("T = 4"), std::string::npos) << error.what();
  }
}

}  // namespace
}  // namespace ddpm
