#include "trainer/diffusion.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "base/random.h"

namespace ddpm {
namespace {

constexpr double kPi = 3.14159265358979323846;
constexpr double kLn2 = 0.69314718055994530942;

// Whether a model output carries learned variances: twice the image channels.
bool Learned(const torch::Tensor& model_out, const torch::Tensor& x) {
  return model_out.size(1) == 2 * x.size(1);
}
// The prediction half of a model output (all of it without learned variances).
torch::Tensor Prediction(const torch::Tensor& model_out, const torch::Tensor& x) {
  return Learned(model_out, x) ? model_out.slice(1, 0, x.size(1)) : model_out;
}

torch::Tensor BetasFor(const DiffusionConfig& config) {
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  const int steps = config.timesteps;
  if (config.schedule == ScheduleKind::kLinear) {
    return torch::linspace(config.beta_start, config.beta_end, steps, f64);
  }
  // Nichol & Dhariwal 2021, Eq. 17: abar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s))
  // pi/2), with each beta clipped at 0.999.
  const double s = config.cosine_s;
  auto f = [&](double t) {
    const double angle = (t / steps + s) / (1.0 + s) * kPi / 2.0;
    return std::cos(angle) * std::cos(angle);
  };
  std::vector<double> betas(steps);
  for (int i = 0; i < steps; ++i) {
    betas[i] = std::min(1.0 - f(i + 1) / f(i), 0.999);
  }
  return torch::tensor(betas, f64);
}

}  // namespace

torch::Tensor NormalKl(const torch::Tensor& mean1, const torch::Tensor& logvar1,
                       const torch::Tensor& mean2, const torch::Tensor& logvar2) {
  return 0.5 * (-1.0 + logvar2 - logvar1 + torch::exp(logvar1 - logvar2) +
                (mean1 - mean2).square() * torch::exp(-logvar2));
}

torch::Tensor DiscretizedGaussianLogLikelihood(const torch::Tensor& x, const torch::Tensor& mean,
                                               const torch::Tensor& log_scale) {
  constexpr double kSqrtHalf = 0.70710678118654752440;
  constexpr double kHalfBin = 1.0 / 255.0;
  constexpr double kFloor = 1e-12;  // the authors' floor under every probability
  const torch::Tensor x64 = x.to(torch::kFloat64);
  const torch::Tensor inv_scale = torch::exp(-log_scale.to(torch::kFloat64));
  const torch::Tensor centred = x64 - mean.to(torch::kFloat64);
  const torch::Tensor upper = (centred + kHalfBin) * inv_scale;
  const torch::Tensor lower = (centred - kHalfBin) * inv_scale;
  // Phi(z) = erfc(-z / sqrt 2) / 2 and 1 - Phi(z) = erfc(z / sqrt 2) / 2, each accurate in its
  // own tail; a bin's mass is the difference on the side where it does not cancel.
  const torch::Tensor cdf_upper = 0.5 * torch::erfc(-upper * kSqrtHalf);
  const torch::Tensor sf_lower = 0.5 * torch::erfc(lower * kSqrtHalf);
  const torch::Tensor mass =
      torch::where(lower > 0, sf_lower - 0.5 * torch::erfc(upper * kSqrtHalf),
                   cdf_upper - 0.5 * torch::erfc(-lower * kSqrtHalf));
  return torch::where(x64 < -0.999, torch::log(cdf_upper.clamp_min(kFloor)),
                      torch::where(x64 > 0.999, torch::log(sf_lower.clamp_min(kFloor)),
                                   torch::log(mass.clamp_min(kFloor))));
}

NoiseSchedule NoiseSchedule::Make(const DiffusionConfig& config) {
  return FromBetas(BetasFor(config));
}

NoiseSchedule NoiseSchedule::FromBetas(const torch::Tensor& betas) {
  NoiseSchedule s;
  s.betas = betas.to(torch::kFloat64);
  s.alphas = 1.0 - s.betas;
  s.alphas_cumprod = torch::cumprod(s.alphas, 0);
  s.alphas_cumprod_prev =
      torch::cat({torch::ones({1}, s.betas.options()), s.alphas_cumprod.slice(0, 0, -1)});
  s.sqrt_alphas_cumprod = torch::sqrt(s.alphas_cumprod);
  s.sqrt_one_minus_alphas_cumprod = torch::sqrt(1.0 - s.alphas_cumprod);
  s.log_one_minus_alphas_cumprod = torch::log(1.0 - s.alphas_cumprod);
  s.sqrt_recip_alphas_cumprod = torch::sqrt(1.0 / s.alphas_cumprod);
  s.sqrt_recipm1_alphas_cumprod = torch::sqrt(1.0 / s.alphas_cumprod - 1.0);
  // Eq. 7 of Ho et al.: beta-tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t.
  s.posterior_variance = s.betas * (1.0 - s.alphas_cumprod_prev) / (1.0 - s.alphas_cumprod);
  // The variance is 0 at t = 0; its log is clipped to the value at t = 1.
  s.posterior_log_variance_clipped = torch::log(
      torch::cat({s.posterior_variance.slice(0, 1, 2), s.posterior_variance.slice(0, 1)}));
  s.posterior_mean_coef1 = s.betas * torch::sqrt(s.alphas_cumprod_prev) / (1.0 - s.alphas_cumprod);
  s.posterior_mean_coef2 =
      (1.0 - s.alphas_cumprod_prev) * torch::sqrt(s.alphas) / (1.0 - s.alphas_cumprod);
  s.fixedlarge_log_variance =
      torch::log(torch::cat({s.posterior_variance.slice(0, 1, 2), s.betas.slice(0, 1)}));
  s.snr = s.alphas_cumprod / (1.0 - s.alphas_cumprod);
  return s;
}

NoiseSchedule NoiseSchedule::To(const torch::TensorOptions& options) const {
  NoiseSchedule s;
  auto conv = [&](const torch::Tensor& x) { return x.to(options); };
  s.betas = conv(betas);
  s.alphas = conv(alphas);
  s.alphas_cumprod = conv(alphas_cumprod);
  s.alphas_cumprod_prev = conv(alphas_cumprod_prev);
  s.sqrt_alphas_cumprod = conv(sqrt_alphas_cumprod);
  s.sqrt_one_minus_alphas_cumprod = conv(sqrt_one_minus_alphas_cumprod);
  s.log_one_minus_alphas_cumprod = conv(log_one_minus_alphas_cumprod);
  s.sqrt_recip_alphas_cumprod = conv(sqrt_recip_alphas_cumprod);
  s.sqrt_recipm1_alphas_cumprod = conv(sqrt_recipm1_alphas_cumprod);
  s.posterior_variance = conv(posterior_variance);
  s.posterior_log_variance_clipped = conv(posterior_log_variance_clipped);
  s.posterior_mean_coef1 = conv(posterior_mean_coef1);
  s.posterior_mean_coef2 = conv(posterior_mean_coef2);
  s.fixedlarge_log_variance = conv(fixedlarge_log_variance);
  s.snr = conv(snr);
  return s;
}

torch::Generator MakeCpuGenerator(uint64_t seed) { return at::detail::createCPUGenerator(seed); }

NoiseStreams::NoiseStreams(uint64_t seed) : generators_{MakeCpuGenerator(seed)} {}

NoiseStreams::NoiseStreams(const std::vector<uint64_t>& seeds) : per_image_(true) {
  generators_.reserve(seeds.size());
  for (uint64_t seed : seeds) generators_.push_back(MakeCpuGenerator(seed));
}

torch::Tensor NoiseStreams::Draw(torch::IntArrayRef shape, bool pinned) {
  const auto options = torch::TensorOptions().dtype(torch::kFloat32).pinned_memory(pinned);
  if (!per_image_) return torch::randn(shape, generators_[0], options);
  TORCH_CHECK(!shape.empty() && shape[0] == static_cast<int64_t>(generators_.size()), "noise of ",
              shape, " from ", generators_.size(), " per-image streams");
  torch::Tensor noise = torch::empty(shape, options);
  for (std::size_t i = 0; i < generators_.size(); ++i) {
    noise[static_cast<int64_t>(i)].normal_(0.0, 1.0, generators_[i]);
  }
  return noise;
}

uint64_t ImageSeed(uint64_t seed, int64_t index) {
  return SplitMix64::Mix(seed * 0x9e3779b97f4a7c15ULL + static_cast<uint64_t>(index) +
                         0x51ed270bULL);
}

torch::Generator MakeGenerator(torch::Device device, uint64_t seed) {
  if (device.is_cpu()) return MakeCpuGenerator(seed);
  torch::Generator generator = at::globalContext().defaultGenerator(device).clone();
  generator.set_current_seed(seed);
  return generator;
}

GaussianDiffusion::GaussianDiffusion(const DiffusionConfig& config, torch::Device device)
    : GaussianDiffusion(config, device, BetasFor(config), {}) {}

GaussianDiffusion::GaussianDiffusion(const DiffusionConfig& config, torch::Device device,
                                     const torch::Tensor& betas, std::vector<int64_t> timestep_map)
    : config_(config),
      device_(device),
      timestep_map_(std::move(timestep_map)),
      timestep_map_tensor_(timestep_map_.empty()
                               ? torch::Tensor()
                               : torch::tensor(timestep_map_, torch::kLong).to(device)),
      schedule64_(NoiseSchedule::FromBetas(betas)),
      schedule_(schedule64_.To(torch::TensorOptions().dtype(torch::kFloat32).device(device))),
      schedule64_device_(
          schedule64_.To(torch::TensorOptions().dtype(torch::kFloat64).device(device))) {}

torch::Tensor GaussianDiffusion::Extract(const torch::Tensor& buffer, const torch::Tensor& t) {
  return buffer.index_select(0, t.to(buffer.device())).view({-1, 1, 1, 1});
}

torch::Tensor GaussianDiffusion::q_sample(const torch::Tensor& x0, const torch::Tensor& t,
                                          const torch::Tensor& noise) const {
  // float64 data (the golden tests) get the float64 schedule.
  const NoiseSchedule& s = x0.scalar_type() == torch::kFloat64 ? schedule64_device_ : schedule_;
  return Extract(s.sqrt_alphas_cumprod, t) * x0 +
         Extract(s.sqrt_one_minus_alphas_cumprod, t) * noise;
}

Posterior GaussianDiffusion::q_posterior(const torch::Tensor& x0, const torch::Tensor& x_t,
                                         const torch::Tensor& t) const {
  Posterior p;
  p.mean = Extract(schedule_.posterior_mean_coef1, t) * x0 +
           Extract(schedule_.posterior_mean_coef2, t) * x_t;
  p.variance = Extract(schedule_.posterior_variance, t);
  p.log_variance = Extract(schedule_.posterior_log_variance_clipped, t);
  return p;
}

torch::Tensor GaussianDiffusion::predict_start_from_noise(const torch::Tensor& x_t,
                                                          const torch::Tensor& t,
                                                          const torch::Tensor& eps) const {
  return Extract(schedule_.sqrt_recip_alphas_cumprod, t) * x_t -
         Extract(schedule_.sqrt_recipm1_alphas_cumprod, t) * eps;
}

torch::Tensor GaussianDiffusion::predict_noise_from_start(const torch::Tensor& x_t,
                                                          const torch::Tensor& t,
                                                          const torch::Tensor& x0) const {
  return (Extract(schedule_.sqrt_recip_alphas_cumprod, t) * x_t - x0) /
         Extract(schedule_.sqrt_recipm1_alphas_cumprod, t);
}

torch::Tensor GaussianDiffusion::predict_start_from_v(const torch::Tensor& x_t,
                                                      const torch::Tensor& t,
                                                      const torch::Tensor& v) const {
  return Extract(schedule_.sqrt_alphas_cumprod, t) * x_t -
         Extract(schedule_.sqrt_one_minus_alphas_cumprod, t) * v;
}

torch::Tensor GaussianDiffusion::velocity(const torch::Tensor& x0, const torch::Tensor& t,
                                          const torch::Tensor& noise) const {
  return Extract(schedule_.sqrt_alphas_cumprod, t) * noise -
         Extract(schedule_.sqrt_one_minus_alphas_cumprod, t) * x0;
}

torch::Tensor GaussianDiffusion::predict_start(const torch::Tensor& x_t, const torch::Tensor& t,
                                               const torch::Tensor& model_out) const {
  switch (config_.objective) {
    case Objective::kEps:
      return predict_start_from_noise(x_t, t, model_out);
    case Objective::kX0:
      return model_out;
    case Objective::kV:
      return predict_start_from_v(x_t, t, model_out);
  }
  TORCH_CHECK(false, "unknown objective");
}

torch::Tensor GaussianDiffusion::LossWeight(const torch::Tensor& t) const {
  const torch::Tensor snr = schedule_.snr.index_select(0, t.to(device_));
  switch (config_.weighting) {
    case LossWeighting::kNone:
      return torch::ones_like(snr);
    case LossWeighting::kP2:
      // Choi et al. 2022: lambda'_t = lambda_t / (k + SNR(t))^gamma, relative to L_simple.
      return torch::pow(config_.p2_k + snr, -config_.p2_gamma);
    case LossWeighting::kMinSnr: {
      // Hang et al. 2023: min(SNR, gamma), divided by the objective's implicit SNR weight.
      const torch::Tensor clamped = torch::clamp_max(snr, config_.min_snr_gamma);
      switch (config_.objective) {
        case Objective::kEps:
          return clamped / snr;
        case Objective::kX0:
          return clamped;
        case Objective::kV:
          return clamped / (snr + 1.0);
      }
    }
  }
  TORCH_CHECK(false, "unknown loss weighting");
}

DiffusionLoss GaussianDiffusion::TrainingLoss(const Denoiser& model, const torch::Tensor& x0,
                                              const torch::Tensor& t, const torch::Tensor& noise,
                                              const torch::Tensor& sample_weight) const {
  const torch::Tensor x_t = q_sample(x0, t, noise);
  const torch::Tensor model_out = model(x_t, t);
  const double timesteps = config_.timesteps;
  torch::Tensor per_sample;
  if (config_.loss == LossKind::kVlb) {
    // T L_t: with t uniform, an unbiased estimate of the bound (bits/dim), through the mean
    // and the variance alike. Without learned variances, p has beta-tilde_t (fixedsmall).
    per_sample = (timesteps * VbTerms(model_out, x0, x_t, t, VarianceKind::kFixedSmall))
                     .to(x0.scalar_type());
  } else {
    torch::Tensor target;
    switch (config_.objective) {
      case Objective::kEps:
        target = noise;
        break;
      case Objective::kX0:
        target = x0;
        break;
      case Objective::kV:
        target = velocity(x0, t, noise);
        break;
    }
    const torch::Tensor prediction = Prediction(model_out, x0);
    const torch::Tensor diff = prediction - target;
    const torch::Tensor elementwise = config_.loss == LossKind::kL1 ? diff.abs() : diff.square();
    per_sample = elementwise.flatten(1).mean(1);
    if (config_.loss == LossKind::kHybrid) {
      // L_hybrid (Nichol & Dhariwal, section 3.1): L_simple + lambda L_vlb, the bound's term
      // seeing the mean frozen so that it trains only the variance; lambda T L_t estimates
      // lambda L_vlb.
      const torch::Tensor frozen =
          torch::cat({prediction.detach(), model_out.slice(1, x0.size(1))}, 1);
      per_sample = per_sample + (config_.vlb_weight * timesteps *
                                 VbTerms(frozen, x0, x_t, t, VarianceKind::kFixedSmall))
                                    .to(x0.scalar_type());
    }
  }
  torch::Tensor weighted =
      config_.weighting == LossWeighting::kNone ? per_sample : per_sample * LossWeight(t);
  if (sample_weight.defined()) weighted = weighted * sample_weight.to(weighted.scalar_type());
  DiffusionLoss out;
  out.loss = weighted.mean();
  out.per_sample = per_sample.detach();
  out.t = t;
  return out;
}

Posterior GaussianDiffusion::p_mean_variance(const Denoiser& model, const torch::Tensor& x_t,
                                             const torch::Tensor& t, VarianceKind variance,
                                             bool clip_x0) const {
  return PosteriorFromOutput(x_t, t, model(x_t, t), variance, clip_x0);
}

Posterior GaussianDiffusion::PosteriorFromOutput(const torch::Tensor& x_t, const torch::Tensor& t,
                                                 const torch::Tensor& model_out,
                                                 VarianceKind variance, bool clip_x0) const {
  torch::Tensor x0 = predict_start(x_t, t, Prediction(model_out, x_t));
  if (clip_x0) x0 = x0.clamp(-1.0, 1.0);
  Posterior p = q_posterior(x0, x_t, t);
  if (Learned(model_out, x_t)) {
    // Eq. 15 of Nichol & Dhariwal: log sigma^2 = v log beta_t + (1 - v) log beta-tilde_t, v
    // mapped from the network's [-1, 1] to [0, 1] as in their code.
    const torch::Tensor fraction = (model_out.slice(1, x_t.size(1)) + 1.0) / 2.0;
    p.log_variance = fraction * torch::log(Extract(schedule_.betas, t)) +
                     (1.0 - fraction) * Extract(schedule_.posterior_log_variance_clipped, t);
    p.variance = torch::exp(p.log_variance);
  } else if (variance == VarianceKind::kFixedLarge) {
    // The authors' fixedlarge: variance beta_t, with the log at t = 0 set from beta-tilde_1.
    p.variance = Extract(schedule_.betas, t);
    p.log_variance = Extract(schedule_.fixedlarge_log_variance, t);
  }
  return p;
}

torch::Tensor GaussianDiffusion::FixedLogVariance64(const torch::Tensor& t,
                                                    VarianceKind variance) const {
  return Extract(variance == VarianceKind::kFixedLarge
                     ? schedule64_device_.fixedlarge_log_variance
                     : schedule64_device_.posterior_log_variance_clipped,
                 t);
}

torch::Tensor GaussianDiffusion::VbTerms(const torch::Tensor& model_out, const torch::Tensor& x0,
                                         const torch::Tensor& x_t, const torch::Tensor& t,
                                         VarianceKind variance) const {
  const NoiseSchedule& s = schedule64_device_;
  const torch::Tensor out64 = model_out.to(torch::kFloat64);
  const torch::Tensor x0_64 = x0.to(torch::kFloat64);
  const torch::Tensor x_t64 = x_t.to(torch::kFloat64);
  const torch::Tensor prediction = Prediction(out64, x_t64);
  torch::Tensor x0_pred;
  switch (config_.objective) {
    case Objective::kEps:
      x0_pred = Extract(s.sqrt_recip_alphas_cumprod, t) * x_t64 -
                Extract(s.sqrt_recipm1_alphas_cumprod, t) * prediction;
      break;
    case Objective::kX0:
      x0_pred = prediction;
      break;
    case Objective::kV:
      x0_pred = Extract(s.sqrt_alphas_cumprod, t) * x_t64 -
                Extract(s.sqrt_one_minus_alphas_cumprod, t) * prediction;
      break;
  }
  const torch::Tensor coef1 = Extract(s.posterior_mean_coef1, t);
  const torch::Tensor coef2 = Extract(s.posterior_mean_coef2, t);
  const torch::Tensor log_beta_tilde = Extract(s.posterior_log_variance_clipped, t);
  const torch::Tensor mean_p = coef1 * x0_pred + coef2 * x_t64;
  torch::Tensor logvar_p;
  if (Learned(out64, x_t64)) {
    const torch::Tensor fraction = (out64.slice(1, x_t.size(1)) + 1.0) / 2.0;
    logvar_p = fraction * torch::log(Extract(s.betas, t)) + (1.0 - fraction) * log_beta_tilde;
  } else {
    logvar_p = FixedLogVariance64(t, variance).expand_as(mean_p);
  }
  const torch::Tensor mean_q = coef1 * x0_64 + coef2 * x_t64;
  const torch::Tensor kl = NormalKl(mean_q, log_beta_tilde, mean_p, logvar_p).flatten(1).mean(1);
  const torch::Tensor decoder_nll =
      -DiscretizedGaussianLogLikelihood(x0_64, mean_p, 0.5 * logvar_p).flatten(1).mean(1);
  return torch::where(t.to(kl.device()) == 0, decoder_nll, kl) / kLn2;
}

torch::Tensor GaussianDiffusion::PriorBits(const torch::Tensor& x0) const {
  const int64_t last = config_.timesteps - 1;
  const double abar = schedule64_.alphas_cumprod[last].item<double>();
  const torch::Tensor x0_64 = x0.to(torch::kFloat64);
  const torch::Tensor kl =
      NormalKl(std::sqrt(abar) * x0_64, torch::full_like(x0_64, std::log(1.0 - abar)),
               torch::zeros_like(x0_64), torch::zeros_like(x0_64));
  return kl.flatten(1).mean(1) / kLn2;
}

std::pair<std::vector<int64_t>, std::vector<double>> GaussianDiffusion::BoundTimesteps(
    int num_timesteps, torch::Generator& generator) const {
  const int steps = config_.timesteps;
  TORCH_CHECK(num_timesteps == 0 || (num_timesteps >= 2 && num_timesteps <= steps),
              "the bound's timesteps must be 0 (all), or in [2, T = ", steps, "], got ",
              num_timesteps);
  std::vector<int64_t> timesteps;
  std::vector<double> weights;
  if (num_timesteps == 0 || num_timesteps == steps) {
    for (int i = 0; i < steps; ++i) {
      timesteps.push_back(i);
      weights.push_back(1.0);
    }
    return {timesteps, weights};
  }
  timesteps.push_back(0);
  weights.push_back(1.0);
  const int strata = num_timesteps - 1;
  for (int k = 0; k < strata; ++k) {
    const int64_t begin = 1 + static_cast<int64_t>(k) * (steps - 1) / strata;
    const int64_t end = 1 + static_cast<int64_t>(k + 1) * (steps - 1) / strata;
    timesteps.push_back(torch::randint(begin, end, {1}, generator, torch::kLong).item<int64_t>());
    weights.push_back(static_cast<double>(end - begin));
  }
  return {timesteps, weights};
}

VariationalBound GaussianDiffusion::Bound(const Denoiser& model, const torch::Tensor& x0,
                                          int num_timesteps, VarianceKind variance,
                                          torch::Generator& generator,
                                          const SampleProgress& progress) const {
  const auto [timesteps, weights] = BoundTimesteps(num_timesteps, generator);
  return Bound(model, x0, timesteps, weights, variance, generator, progress);
}

VariationalBound GaussianDiffusion::Bound(const Denoiser& model, const torch::Tensor& x0,
                                          const std::vector<int64_t>& timesteps,
                                          const std::vector<double>& weights, VarianceKind variance,
                                          torch::Generator& generator,
                                          const SampleProgress& progress) const {
  TORCH_CHECK(!timesteps.empty() && timesteps.size() == weights.size(),
              "the bound needs as many weights as timesteps");
  torch::NoGradGuard no_grad;
  const int64_t batch = x0.size(0);
  const auto long_options = torch::TensorOptions().dtype(torch::kLong).device(x0.device());
  std::vector<torch::Tensor> columns;
  for (std::size_t k = 0; k < timesteps.size(); ++k) {
    TORCH_CHECK(timesteps[k] >= 0 && timesteps[k] < config_.timesteps, "timestep ", timesteps[k],
                " is outside [0, T = ", config_.timesteps, ")");
    const torch::Tensor t = torch::full({batch}, timesteps[k], long_options);
    const torch::Tensor noise = Noise(x0.sizes(), generator).to(x0.device());
    const torch::Tensor x_t = q_sample(x0, t, noise);
    columns.push_back(VbTerms(model(x_t, t), x0, x_t, t, variance).cpu());
    if (progress) progress(static_cast<int>(k + 1), static_cast<int>(timesteps.size()));
  }
  VariationalBound bound;
  bound.timesteps = torch::tensor(timesteps, torch::kLong);
  bound.weights = torch::tensor(weights, torch::kFloat64);
  bound.terms = torch::stack(columns, 1);
  bound.prior = PriorBits(x0).cpu();
  bound.total = bound.prior + (bound.terms * bound.weights).sum(1);
  return bound;
}

torch::Tensor GaussianDiffusion::Noise(torch::IntArrayRef shape, NoiseStreams& streams) const {
  const bool pinned = device_.is_cuda();
  return streams.Draw(shape, pinned).to(device_, /*non_blocking=*/pinned);
}

torch::Tensor GaussianDiffusion::Noise(torch::IntArrayRef shape,
                                       torch::Generator& generator) const {
  // Drawn on the CPU so that a seed gives the same samples on every device; for a GPU into
  // pinned memory, so that the host draws the next step's noise while the GPU computes.
  const bool pinned = device_.is_cuda();
  return torch::randn(shape, generator,
                      torch::TensorOptions().dtype(torch::kFloat32).pinned_memory(pinned))
      .to(device_, /*non_blocking=*/pinned);
}

torch::Tensor GaussianDiffusion::SampleDdpm(const Denoiser& model, torch::IntArrayRef shape,
                                            VarianceKind variance, bool clip_x0, uint64_t seed,
                                            const SampleProgress& progress) const {
  NoiseStreams streams(seed);
  return SampleDdpm(model, shape, variance, clip_x0, streams, progress);
}

torch::Tensor GaussianDiffusion::SampleDdpm(const Denoiser& model, torch::IntArrayRef shape,
                                            VarianceKind variance, bool clip_x0,
                                            NoiseStreams& generator,
                                            const SampleProgress& progress) const {
  // Inference mode: no autograd bookkeeping at all, cheaper than NoGradGuard.
  c10::InferenceMode inference;
  const Denoiser mapped = Mapped(model);
  torch::Tensor x = Noise(shape, generator);
  const int steps = config_.timesteps;
  for (int i = steps - 1; i >= 0; --i) {
    const torch::Tensor t =
        torch::full({shape[0]}, i, torch::TensorOptions().dtype(torch::kLong).device(device_));
    const Posterior p = p_mean_variance(mapped, x, t, variance, clip_x0);
    const torch::Tensor z = Noise(shape, generator);
    // Algorithm 2, line 4: no noise is added at the last step (t = 0).
    x = i > 0 ? p.mean + torch::exp(0.5 * p.log_variance) * z : p.mean;
    if (progress) progress(steps - i, steps);
  }
  return x;
}

torch::Tensor GaussianDiffusion::SampleDdim(const Denoiser& model, torch::IntArrayRef shape,
                                            int steps, double eta, bool clip_x0, uint64_t seed,
                                            const SampleProgress& progress) const {
  NoiseStreams streams(seed);
  return SampleDdim(model, shape, steps, eta, clip_x0, streams, progress);
}

torch::Tensor GaussianDiffusion::SampleDdim(const Denoiser& model, torch::IntArrayRef shape,
                                            int steps, double eta, bool clip_x0,
                                            NoiseStreams& generator,
                                            const SampleProgress& progress) const {
  TORCH_CHECK(steps >= 1 && steps <= config_.timesteps, "DDIM steps must be in [1, T], got ",
              steps);
  // Inference mode: no autograd bookkeeping at all, cheaper than NoGradGuard.
  c10::InferenceMode inference;
  torch::Tensor x = Noise(shape, generator);
  // Timesteps tau_i evenly spaced over [0, T), as in Song et al.'s "uniform" skip.
  std::vector<int64_t> taus(steps);
  for (int i = 0; i < steps; ++i) {
    taus[i] = static_cast<int64_t>(std::floor(static_cast<double>(i) * config_.timesteps / steps));
  }
  const auto& abar64 = schedule64_.alphas_cumprod;
  const auto long_options = torch::TensorOptions().dtype(torch::kLong).device(device_);
  for (int i = steps - 1; i >= 0; --i) {
    const int64_t tau = taus[i];
    const double abar = abar64[tau].item<double>();
    const double abar_prev = i > 0 ? abar64[taus[i - 1]].item<double>() : 1.0;
    const torch::Tensor t = torch::full({shape[0]}, tau, long_options);
    // DDIM ignores learned variances: only the prediction half of the output is used.
    torch::Tensor x0 = predict_start(x, t, Prediction(model(x, t), x));
    if (clip_x0) x0 = x0.clamp(-1.0, 1.0);
    const torch::Tensor eps = predict_noise_from_start(x, t, x0);
    // Eq. 16 of Song et al.: sigma = eta sqrt((1 - abar_prev)/(1 - abar)) sqrt(1 - abar/abar_prev).
    const double sigma =
        eta * std::sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev));
    const double dir = std::sqrt(std::max(1.0 - abar_prev - sigma * sigma, 0.0));
    const torch::Tensor z = Noise(shape, generator);
    x = std::sqrt(abar_prev) * x0 + dir * eps;
    if (sigma > 0) x = x + sigma * z;
    if (progress) progress(steps - i, steps);
  }
  return x;
}

namespace {

// sigma_j = sqrt(1/abar_j - 1) of every timestep, increasing in j: EDM's view of the process.
std::vector<double> NoiseLevels(const torch::Tensor& alphas_cumprod64) {
  const torch::Tensor abar = alphas_cumprod64.contiguous();
  const double* a = abar.data_ptr<double>();
  std::vector<double> levels(abar.numel());
  for (std::size_t j = 0; j < levels.size(); ++j) levels[j] = std::sqrt(1.0 / a[j] - 1.0);
  return levels;
}

// The index of the level nearest sigma (the lower one on a tie).
int64_t NearestLevel(const std::vector<double>& levels, double sigma) {
  int64_t j = std::lower_bound(levels.begin(), levels.end(), sigma) - levels.begin();
  const int64_t count = static_cast<int64_t>(levels.size());
  if (j == count || (j > 0 && sigma - levels[j - 1] <= levels[j] - sigma)) --j;
  return j;
}

}  // namespace

std::pair<std::vector<double>, std::vector<int64_t>> GaussianDiffusion::HeunSigmas(
    int steps) const {
  TORCH_CHECK(steps >= 1 && steps <= config_.timesteps,
              "heun steps must be in [1, T = ", config_.timesteps, "], got ", steps);
  const std::vector<double> trained = NoiseLevels(schedule64_.alphas_cumprod);
  // EDM's defaults, within the levels this process was trained on.
  const double sigma_min = std::max(0.002, trained.front());
  const double sigma_max = std::min(80.0, trained.back());
  constexpr double kRho = 7.0;
  std::vector<double> sigmas;
  std::vector<int64_t> index;
  for (int i = 0; i < steps; ++i) {
    const double fraction = steps == 1 ? 0.0 : static_cast<double>(i) / (steps - 1);
    const double sigma =
        std::pow(std::pow(sigma_max, 1.0 / kRho) +
                     fraction * (std::pow(sigma_min, 1.0 / kRho) - std::pow(sigma_max, 1.0 / kRho)),
                 kRho);
    index.push_back(NearestLevel(trained, sigma));
    sigmas.push_back(trained[index.back()]);
  }
  sigmas.push_back(0.0);
  return {sigmas, index};
}

torch::Tensor GaussianDiffusion::SampleHeun(const Denoiser& model, torch::IntArrayRef shape,
                                            int steps, double churn, double s_noise,
                                            NoiseStreams& streams,
                                            const SampleProgress& progress) const {
  c10::InferenceMode inference;
  const Denoiser mapped = Mapped(model);
  const auto [sigmas, index] = HeunSigmas(steps);
  const std::vector<double> levels = NoiseLevels(schedule64_.alphas_cumprod);
  const torch::Tensor abar = schedule64_.alphas_cumprod.contiguous();
  const double* a = abar.data_ptr<double>();
  const auto long_options = torch::TensorOptions().dtype(torch::kLong).device(device_);
  // D(x; sigma_j): the model's x_0 at x_t = sqrt(abar_j) x, for x = x_0 + sigma_j eps.
  const auto denoise = [&](const torch::Tensor& x, int64_t j) {
    const torch::Tensor t = torch::full({shape[0]}, j, long_options);
    const torch::Tensor x_t = std::sqrt(a[j]) * x;
    return predict_start(x_t, t, Prediction(mapped(x_t, t), x_t));
  };
  torch::Tensor x = Noise(shape, streams) * sigmas[0];
  const double gamma = std::min(churn / steps, std::sqrt(2.0) - 1.0);
  for (int i = 0; i < steps; ++i) {
    const double t_cur = sigmas[i], t_next = sigmas[i + 1];
    // Algorithm 2: raise the noise level to t_hat (a trained level) by adding noise.
    int64_t j_hat = index[i];
    double t_hat = t_cur;
    if (gamma > 0) {
      j_hat = NearestLevel(levels, t_cur + gamma * t_cur);
      t_hat = levels[j_hat];
      x = x +
          std::sqrt(std::max(t_hat * t_hat - t_cur * t_cur, 0.0)) * s_noise * Noise(shape, streams);
    }
    // Euler from t_hat to t_next, then Heun's correction unless t_next is 0.
    const torch::Tensor d_cur = (x - denoise(x, j_hat)) / t_hat;
    torch::Tensor x_next = x + (t_next - t_hat) * d_cur;
    if (i + 1 < steps) {
      const torch::Tensor d_next = (x_next - denoise(x_next, index[i + 1])) / t_next;
      x_next = x + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_next);
    }
    x = x_next;
    if (progress) progress(i + 1, steps);
  }
  return x;
}

GaussianDiffusion GaussianDiffusion::Respaced(const std::vector<int64_t>& timesteps) const {
  TORCH_CHECK(!timesteps.empty(), "respacing needs at least one timestep");
  const auto& abar = schedule64_.alphas_cumprod;
  std::vector<double> betas;
  std::vector<int64_t> map;
  for (std::size_t k = 0; k < timesteps.size(); ++k) {
    const int64_t t = timesteps[k];
    TORCH_CHECK(t >= 0 && t < config_.timesteps && (k == 0 || t > timesteps[k - 1]),
                "respaced timesteps must increase strictly within [0, T = ", config_.timesteps,
                ")");
    if (k == 0 ? t == 0 : t == timesteps[k - 1] + 1) {
      betas.push_back(schedule64_.betas[t].item<double>());
    } else {
      const double abar_prev = k == 0 ? 1.0 : abar[timesteps[k - 1]].item<double>();
      betas.push_back(1.0 - abar[t].item<double>() / abar_prev);
    }
    // A respaced process maps onto the original's timesteps, even when respaced again.
    map.push_back(timestep_map_.empty() ? t : timestep_map_[t]);
  }
  DiffusionConfig config = config_;
  config.timesteps = static_cast<int>(timesteps.size());
  return GaussianDiffusion(config, device_, torch::tensor(betas, torch::kFloat64), std::move(map));
}

std::vector<int64_t> GaussianDiffusion::EvenlyStrided(int count) const {
  TORCH_CHECK(count >= 1 && count <= config_.timesteps,
              "respaced steps must be in [1, T = ", config_.timesteps, "], got ", count);
  std::vector<int64_t> out;
  if (count == 1) return {config_.timesteps - 1};
  const double stride = static_cast<double>(config_.timesteps - 1) / (count - 1);
  for (int i = 0; i < count; ++i) out.push_back(std::llround(i * stride));
  return out;
}

Denoiser GaussianDiffusion::Mapped(const Denoiser& model) const {
  if (timestep_map_.empty()) return model;
  return [this, model](const torch::Tensor& x_t, const torch::Tensor& t) {
    return model(x_t, timestep_map_tensor_.index_select(0, t.to(timestep_map_tensor_.device())));
  };
}

torch::Tensor GaussianDiffusion::Sample(const Denoiser& model, torch::IntArrayRef shape,
                                        const SampleConfig& config,
                                        const SampleProgress& progress) const {
  NoiseStreams streams(config.seed);
  return Sample(model, shape, config, streams, progress);
}

torch::Tensor GaussianDiffusion::Sample(const Denoiser& model, torch::IntArrayRef shape,
                                        const SampleConfig& config, NoiseStreams& streams,
                                        const SampleProgress& progress) const {
  const int steps = config.ResolvedSteps(config_.timesteps);
  if (config.sampler == SamplerKind::kDdim) {
    return SampleDdim(model, shape, steps, config.eta, config.clip_x0, streams, progress);
  }
  if (config.sampler == SamplerKind::kHeun) {
    return SampleHeun(model, shape, steps, config.churn, config.s_noise, streams, progress);
  }
  if (!config.timesteps.empty() || steps < config_.timesteps) {
    const std::vector<int64_t> subsequence =
        config.timesteps.empty()
            ? EvenlyStrided(steps)
            : std::vector<int64_t>(config.timesteps.begin(), config.timesteps.end());
    return Respaced(subsequence)
        .SampleDdpm(model, shape, config.variance, config.clip_x0, streams, progress);
  }
  return SampleDdpm(model, shape, config.variance, config.clip_x0, streams, progress);
}

}  // namespace ddpm
