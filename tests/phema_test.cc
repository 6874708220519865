// Post-hoc EMA (Karras et al. 2024): the power-function profiles' exponents and inner products
// against NumPy and quadrature, the running update against its closed form in float64, the
// trainer's profiles against the weights it took, and ddpm_phema's reconstruction from
// snapshots: exact for a tracked profile, and for another sigma_rel within a bound the test
// derives from the discrete weights, with every bad request refused by name.
#include "tools/phema.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "config/config.h"
#include "trainer/checkpoint.h"
#include "trainer/checkpoint_keys.h"
#include "trainer/data.h"
#include "trainer/optimizer.h"
#include "trainer/power_ema.h"
#include "trainer/tensor_io.h"
#include "trainer/trainer.h"
#include "trainer/unet.h"

namespace ddpm {
namespace {

namespace fs = std::filesystem;
namespace keys = checkpoint_keys;

// numpy.roots([1, 7, 16 - s^-2, 12 - s^-2]).real.max(), EDM2's std_to_exp, in /usr/bin/python3.
constexpr double kGamma005 = 16.972198602303447;
constexpr double kGamma010 = 6.937203937601809;
constexpr double kGamma020 = 1.8262137798958404;

std::string TempDir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("ddpm_phema_test_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

// Update t of n (1-based) in the power-function average after n updates: the telescoped
// product of Eq. 4's betas, (t^(g+1) - (t-1)^(g+1)) / n^(g+1).
double DiscreteWeight(double gamma, int64_t t, int64_t n) {
  if (t > n) return 0;
  return (std::pow(double(t), gamma + 1) - std::pow(double(t - 1), gamma + 1)) /
         std::pow(double(n), gamma + 1);
}

TEST(PowerEma, ExponentsAreNumpysRootsAndInvertTheStd) {
  EXPECT_NEAR(PowerEmaExponent(0.05), kGamma005, 1e-9);
  EXPECT_NEAR(PowerEmaExponent(0.10), kGamma010, 1e-9);
  EXPECT_NEAR(PowerEmaExponent(0.20), kGamma020, 1e-9);
  for (double s : {0.01, 0.05, 0.1, 0.2, 0.29}) {
    EXPECT_NEAR(PowerEmaSigmaRel(PowerEmaExponent(s)), s, 1e-12) << s;
  }
  // The largest sigma_rel: where the derivative of log((g+1)/((g+2)^2 (g+3))) vanishes.
  const double g = (std::sqrt(5.0) - 3) / 2;
  EXPECT_NEAR(MaxPhemaSigmaRel(), std::sqrt((g + 1) / ((g + 2) * (g + 2) * (g + 3))), 1e-15);
  EXPECT_NEAR(MaxPhemaSigmaRel(), 0.30028, 1e-5);
  EXPECT_THROW(PowerEmaExponent(0.0), std::invalid_argument);
  EXPECT_THROW(PowerEmaExponent(0.31), std::invalid_argument);
  EXPECT_THROW(PowerEmaExponent(std::nan("")), std::invalid_argument);
}

TEST(PowerEma, InnerProductsAreTheIntegralsOfTheNormalisedProfiles) {
  // Midpoint quadrature of (a+1) t^a / A^(a+1) * (b+1) t^b / B^(b+1) over [0, min(A, B)].
  auto quadrature = [](double a_end, double a, double b_end, double b) {
    const int n = 200000;
    const double end = std::min(a_end, b_end);
    double sum = 0;
    for (int i = 0; i < n; ++i) {
      const double t = (i + 0.5) * end / n;
      sum += (a + 1) * std::pow(t, a) / std::pow(a_end, a + 1) * (b + 1) * std::pow(t, b) /
             std::pow(b_end, b + 1);
    }
    return sum * end / n;
  };
  for (auto [a_end, b_end] : {std::pair{300.0, 1000.0}, {1000.0, 300.0}, {700.0, 700.0}}) {
    const double expected = quadrature(a_end, kGamma010, b_end, kGamma005);
    EXPECT_NEAR(PowerProfileInnerProduct(a_end, kGamma010, b_end, kGamma005), expected,
                1e-6 * expected)
        << a_end << " " << b_end;
  }
}

TEST(PowerEma, TheUpdateIsItsClosedFormOnAScalarSequenceInFloat64) {
  torch::Tensor source = torch::zeros({1}, torch::kFloat64);
  PowerEma ema(source, {0.05, 0.10});
  std::vector<double> xs;
  for (int64_t t = 1; t <= 500; ++t) {
    const double x = std::sin(0.3 * double(t)) + 0.01 * double(t);
    xs.push_back(x);
    source.fill_(x);
    ema.Prepare(t);
    ema.Update();
    if (t != 1 && t != 7 && t != 500) continue;
    for (std::size_t k = 0; k < 2; ++k) {
      const double gamma = k == 0 ? kGamma005 : kGamma010;
      double expected = 0;
      for (int64_t u = 1; u <= t; ++u) expected += DiscreteWeight(gamma, u, t) * xs[u - 1];
      EXPECT_NEAR(ema.profiles()[k].item<double>(), expected, 1e-12 * (1 + std::abs(expected)))
          << "profile " << k << " after " << t << " updates";
    }
  }
}

Config TinyModelConfig() {
  return LoadConfigString(R"(
model: {ch: 8, ch_mult: [1], num_res_blocks: 1, attn_resolutions: [], image_size: 8,
        norm_groups: 4, dropout: 0.0}
train: {batch_size: 4, lr: 0.001, warmup_steps: 2, seed: 5, threads: 1, device: cpu,
        phema_snapshot_every: 3, phema_sigma_rels: [0.05, 0.10]}
data: {shapes_size: 32}
)");
}

TEST(PowerEma, TheTrainersProfilesAverageTheWeightsItTook) {
  const Config config = TinyModelConfig();
  Trainer trainer(config, torch::kCPU);
  ASSERT_NE(trainer.power_ema(), nullptr);
  std::vector<torch::Tensor> weights;
  const int64_t n = 6;
  for (int64_t step = 0; step < n; ++step) {
    const torch::Tensor batch = torch::rand({4, 3, 8, 8}) * 2 - 1;
    trainer.Step(batch);
    weights.push_back(trainer.parameters().data().to(torch::kFloat64).clone());
  }
  for (std::size_t k = 0; k < 2; ++k) {
    const double gamma = k == 0 ? kGamma005 : kGamma010;
    torch::Tensor expected = torch::zeros_like(weights[0]);
    for (int64_t t = 1; t <= n; ++t) expected += DiscreteWeight(gamma, t, n) * weights[t - 1];
    const torch::Tensor profile = trainer.power_ema()->profiles()[k].to(torch::kFloat64);
    EXPECT_LT((profile - expected).abs().max().item<double>(), 1e-5) << "profile " << k;
  }
  // A checkpoint carries them; one without them, or with others, is refused naming both.
  std::map<std::string, torch::Tensor> state = trainer.State();
  EXPECT_TRUE(state.count(keys::PhemaPrefix(1) + trainer.parameters().slots()[0].name));
  Trainer resumed(config, torch::kCPU);
  resumed.LoadState(state, "ckpt");
  EXPECT_TRUE(torch::equal(resumed.power_ema()->profiles()[1], trainer.power_ema()->profiles()[1]));
  std::map<std::string, torch::Tensor> other = state;
  other[keys::kPhemaSigmaRels] = torch::tensor({0.05, 0.2}, torch::kFloat64);
  try {
    resumed.LoadState(other, "ckpt-other");
    ADD_FAILURE() << "other profiles were accepted";
  } catch (const CheckpointError& error) {
    EXPECT_NE(std::string(error.what()).find("[0.05, 0.2]"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("[0.05, 0.1]"), std::string::npos) << error.what();
  }
  other.erase(keys::kPhemaSigmaRels);
  try {
    resumed.LoadState(other, "ckpt-none");
    ADD_FAILURE() << "a checkpoint without profiles was accepted";
  } catch (const CheckpointError& error) {
    EXPECT_NE(std::string(error.what()).find("ckpt-none holds no post-hoc EMA profiles"),
              std::string::npos)
        << error.what();
  }
}

// A run directory whose phema/ holds snapshots every `every` steps of profiles 0.05 and 0.10 over
// a noisy drifting trajectory of a tiny UNet's weights, and the EMA of sigma_rel `direct`
// computed over every step.
struct SyntheticRun {
  std::string dir;
  Config config;
  std::vector<FlatParameters::Slot> slots;
  torch::Tensor trajectory;                // [n, P] float64
  std::map<double, torch::Tensor> direct;  // sigma_rel -> its EMA after n steps [P]
  std::vector<int64_t> snapshot_steps;
  torch::Tensor tracked_005;  // the 0.05 profile after n steps
};

SyntheticRun MakeSyntheticRun(const std::string& name, int64_t n, int64_t every,
                              const std::vector<double>& direct) {
  SyntheticRun run;
  run.dir = TempDir(name);
  run.config = TinyModelConfig();
  UNet model(run.config.model);
  FlatParameters flat(*model, /*with_grad=*/false);
  run.slots = flat.slots();
  const int64_t size = flat.data().numel();
  torch::manual_seed(11);
  // Per weight: a start, a drift, a slow oscillation and fresh noise at every step.
  const torch::Tensor start = torch::randn({size}, torch::kFloat64);
  const torch::Tensor drift = torch::randn({size}, torch::kFloat64);
  const torch::Tensor phase = torch::rand({size}, torch::kFloat64) * 6.28;
  const torch::Tensor t = torch::arange(1, n + 1, torch::kFloat64).view({n, 1});
  run.trajectory = start + drift * (t / n) + 0.3 * torch::sin(t / 37.0 + phase) +
                   0.1 * torch::randn({n, size}, torch::kFloat64);
  torch::Tensor source = torch::zeros({size}, torch::kFloat64);
  PowerEma tracked(source, {0.05, 0.10});
  PowerEma reference(source, direct);
  for (int64_t step = 1; step <= n; ++step) {
    source.copy_(run.trajectory[step - 1]);
    tracked.Prepare(step);
    tracked.Update();
    reference.Prepare(step);
    reference.Update();
    if (step % every != 0) continue;
    std::map<std::string, torch::Tensor> snapshot;
    for (std::size_t k = 0; k < 2; ++k) {
      for (auto& [param, view] : flat.Views(tracked.profiles()[k])) {
        snapshot[keys::PhemaPrefix(k) + param] = view.clone();
      }
    }
    snapshot[keys::kPhemaSigmaRels] = torch::tensor({0.05, 0.10}, torch::kFloat64);
    snapshot[keys::kStep] = Int64Tensor(step);
    snapshot[keys::kConfig] = TextTensor(run.config.ToYaml());
    SaveCheckpoint(run.dir + "/phema", step, snapshot, 0);
    run.snapshot_steps.push_back(step);
  }
  for (std::size_t j = 0; j < direct.size(); ++j)
    run.direct[direct[j]] = reference.profiles()[j].clone();
  run.tracked_005 = tracked.profiles()[0].clone();
  return run;
}

torch::Tensor FlatWeights(const std::string& path, const std::vector<FlatParameters::Slot>& slots) {
  const std::map<std::string, torch::Tensor> weights = LoadTensors(path);
  std::vector<torch::Tensor> parts;
  for (const auto& slot : slots) parts.push_back(weights.at(slot.name).reshape({-1}));
  return torch::cat(parts).to(torch::kFloat64);
}

TEST(PosthocEma, ATrackedSigmaRelIsReconstructedAsItsOwnProfile) {
  const SyntheticRun run = MakeSyntheticRun("tracked", 600, 100, {0.05});
  PhemaJob job;
  job.run = run.dir;
  job.sigma_rels = {0.05};
  job.out = run.dir + "/sigma_005.pt";
  const std::vector<PhemaResult> results = RunPhema(job);
  ASSERT_EQ(results.size(), 1u);
  EXPECT_EQ(results[0].step, 600);
  EXPECT_LT(results[0].fit.fit_error, 1e-6);
  const torch::Tensor got = FlatWeights(job.out, run.slots);
  const torch::Tensor expected = run.tracked_005;
  // float32 output: within its rounding of the values.
  EXPECT_LT((got - expected).abs().max().item<double>(),
            1e-6 * expected.abs().max().item<double>());
  // The config goes beside the weights, for ddpm_sample --weights.
  EXPECT_TRUE(fs::exists(run.dir + "/sigma_005.yaml"));
}

TEST(PosthocEma, AnUntrackedSigmaRelMatchesTheEmaOverEveryStepWithinTheDerivedBound) {
  const int64_t n = 2000;
  const double target = 0.075;
  const SyntheticRun run = MakeSyntheticRun("between", n, 100, {target});
  PhemaJob job;
  job.run = run.dir;
  job.sigma_rels = {target};
  job.out = run.dir + "/sigma_0075.pt";
  const std::vector<PhemaResult> results = RunPhema(job);
  ASSERT_EQ(results.size(), 1u);
  const torch::Tensor got = FlatWeights(job.out, run.slots);
  const torch::Tensor direct = run.direct.at(target);
  // The reconstruction weighs step t by w_r(t) = sum_i c_i w_i(t) (each snapshot's discrete
  // weights, closed form); the direct EMA by w_d(t). Their difference on any weight is at most
  // ||w_r - w_d||_1 max_t |x_t|, plus float32's rounding of the written weights.
  std::vector<PowerProfile> stored;
  for (int64_t s : run.snapshot_steps) {
    for (double sigma : {0.05, 0.10}) stored.push_back({s, sigma});
  }
  const PosthocFit fit = SolvePosthoc(stored, n, target);
  double l1 = 0;
  for (int64_t t = 1; t <= n; ++t) {
    double w_r = 0;
    for (std::size_t i = 0; i < stored.size(); ++i) {
      w_r += fit.coefficients[i] *
             DiscreteWeight(PowerEmaExponent(stored[i].sigma_rel), t, stored[i].step);
    }
    l1 += std::abs(w_r - DiscreteWeight(PowerEmaExponent(target), t, n));
  }
  const double max_x = run.trajectory.abs().max().item<double>();
  const double bound = l1 * max_x + 1e-6 * max_x;
  const double error = (got - direct).abs().max().item<double>();
  std::printf("reconstruction error %.3e, derived bound %.3e (||w_r - w_d||_1 %.3e), fit %.3e\n",
              error, bound, l1, results[0].fit.fit_error);
  EXPECT_LE(error, bound);
  // And the bound is tight enough to mean something: far below how much the tracked 0.05
  // profile differs from the target EMA.
  const double separation = (run.tracked_005 - direct).abs().max().item<double>();
  EXPECT_LT(bound, 0.25 * separation) << "separation " << separation;
}

TEST(PosthocEma, BadRequestsAreRefusedNamingTheValueAndTheRange) {
  const SyntheticRun run = MakeSyntheticRun("bad", 400, 100, {0.05});
  auto message = [&](PhemaJob job) -> std::string {
    job.run = job.run.empty() ? run.dir : job.run;
    job.out = run.dir + "/out.pt";
    try {
      RunPhema(job);
    } catch (const std::exception& error) {
      return error.what();
    }
    return "(accepted)";
  };
  PhemaJob job;
  job.sigma_rels = {0.5};
  std::string m = message(job);
  EXPECT_NE(m.find("--sigma-rel 0.5 is outside (0, 0.3002"), std::string::npos) << m;
  job.sigma_rels = {0.004};
  m = message(job);
  EXPECT_NE(m.find("--sigma-rel 0.004 cannot be reconstructed at step 400 from the 4 snapshot"),
            std::string::npos)
      << m;
  EXPECT_NE(m.find("within it: ["), std::string::npos) << m;
  job.sigma_rels = {0.075};
  job.step = 450;
  m = message(job);
  EXPECT_NE(m.find("--step 450 is outside the snapshots' steps 100..400"), std::string::npos) << m;
  job.step = 0;
  job.run = TempDir("empty");
  m = message(job);
  EXPECT_NE(m.find("holds no post-hoc EMA snapshots"), std::string::npos) << m;
  EXPECT_FALSE(fs::exists(run.dir + "/out.pt"));
  // The range it names is where the fit holds: its ends fit within the threshold, just beyond
  // them does not.
  std::vector<PowerProfile> stored;
  for (int64_t s : run.snapshot_steps) {
    for (double sigma : {0.05, 0.10}) stored.push_back({s, sigma});
  }
  const SigmaRelRange range = ReconstructibleSigmaRels(stored, 400, 0.05);
  ASSERT_FALSE(range.empty());
  EXPECT_LE(SolvePosthoc(stored, 400, range.low).fit_error, 0.05);
  EXPECT_GT(SolvePosthoc(stored, 400, range.low * 0.99).fit_error, 0.05);
  EXPECT_LE(SolvePosthoc(stored, 400, range.high).fit_error, 0.05);
  EXPECT_GT(SolvePosthoc(stored, 400, range.high * 1.01).fit_error, 0.05);
  EXPECT_LT(range.low, 0.05);
  EXPECT_GT(range.high, 0.10);
}

}  // namespace
}  // namespace ddpm
