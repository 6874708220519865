// Noise schedules and the Gaussian diffusion of Ho et al. 2020: the forward process, the
// training losses (L_simple, L_hybrid, L_vlb) and the samplers (DDPM, DDIM, Heun).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "config/config.h"

namespace ddpm {

/// Every per-timestep buffer of a beta schedule, each of shape [T]. Computed in float64.
struct NoiseSchedule {
  torch::Tensor betas;
  torch::Tensor alphas;
  torch::Tensor alphas_cumprod;
  torch::Tensor alphas_cumprod_prev;
  torch::Tensor sqrt_alphas_cumprod;
  torch::Tensor sqrt_one_minus_alphas_cumprod;
  torch::Tensor log_one_minus_alphas_cumprod;
  torch::Tensor sqrt_recip_alphas_cumprod;
  torch::Tensor sqrt_recipm1_alphas_cumprod;
  torch::Tensor posterior_variance;
  torch::Tensor posterior_log_variance_clipped;
  torch::Tensor posterior_mean_coef1;
  torch::Tensor posterior_mean_coef2;
  /// log of the authors' fixedlarge variance: beta_t, with beta-tilde_1 in place of beta_0.
  torch::Tensor fixedlarge_log_variance;
  /// Signal-to-noise ratio abar / (1 - abar).
  torch::Tensor snr;

  /// Builds the float64 buffers of the linear or cosine schedule in config.
  static NoiseSchedule Make(const DiffusionConfig& config);
  /// Builds the float64 buffers from float64 betas [T].
  static NoiseSchedule FromBetas(const torch::Tensor& betas);
  /// A copy of every buffer converted to options (dtype and device).
  NoiseSchedule To(const torch::TensorOptions& options) const;
};

/// A noise-prediction network: (x_t [B,C,H,W], t [B] int64) -> model output [B,C,H,W].
using Denoiser = std::function<torch::Tensor(const torch::Tensor& x_t, const torch::Tensor& t)>;

/// Called after every sampler step with (steps done, steps in all).
using SampleProgress = std::function<void(int done, int total)>;

/// The mean, variance and log-variance of q(x_{t-1} | x_t, x_0) or of p(x_{t-1} | x_t).
struct Posterior {
  torch::Tensor mean;
  torch::Tensor variance;
  torch::Tensor log_variance;
};

/// The training loss on one batch.
struct DiffusionLoss {
  /// Scalar: the weighted mean over the batch.
  torch::Tensor loss;
  /// [B]: each sample's unweighted loss, detached, for per-timestep logging.
  torch::Tensor per_sample;
  /// [B]: the timesteps drawn.
  torch::Tensor t;
};

/// KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, in nats.
torch::Tensor NormalKl(const torch::Tensor& mean1, const torch::Tensor& logvar1,
                       const torch::Tensor& mean2, const torch::Tensor& logvar2);
/// log P(the 8-bit bin of x) under N(mean, exp(2 log_scale)), per element, in nats: bins of
/// width 2/255 centred on the 256 levels of [-1, 1], the first and last open to -inf and +inf
/// (the authors' decoder, with the exact normal CDF in float64 rather than their tanh fit).
torch::Tensor DiscretizedGaussianLogLikelihood(const torch::Tensor& x, const torch::Tensor& mean,
                                               const torch::Tensor& log_scale);

/// The variational bound of Ho et al. (Eq. 5) of each image, in bits/dim.
struct VariationalBound {
  /// [K] int64: the timesteps evaluated, ascending (all T unless a strided estimate).
  torch::Tensor timesteps;
  /// [B, K] float64: L_t of each image at each evaluated t.
  torch::Tensor terms;
  /// [K] float64: how many timesteps each evaluated one stands for (1 for the full bound).
  torch::Tensor weights;
  /// [B] float64: L_T = KL(q(x_T | x_0) || N(0, I)).
  torch::Tensor prior;
  /// [B] float64: prior + sum_k weights[k] terms[:, k].
  torch::Tensor total;
};

/// Where a sampler's noise comes from: one CPU stream for the whole batch, or one per image, so
/// that an image's noise, and so the image, does not depend on the batch it is drawn in or on
/// how many ranks share the job.
class NoiseStreams {
 public:
  /// One stream, seeded by seed (what the samplers' seed arguments mean).
  explicit NoiseStreams(uint64_t seed);
  /// One stream per image, seeded by each of seeds (ImageSeed of the images' indices).
  explicit NoiseStreams(const std::vector<uint64_t>& seeds);
  /// Standard normal noise [shape] as float32 on the CPU (pinned when asked); per image, row i
  /// from stream i (shape[0] must be the number of streams).
  torch::Tensor Draw(torch::IntArrayRef shape, bool pinned);

 private:
  std::vector<torch::Generator> generators_;
  bool per_image_ = false;
};

/// The seed of image index's noise stream in a job seeded by seed.
uint64_t ImageSeed(uint64_t seed, int64_t index);

/// The forward process, the objective and the samplers. Holds the float64 schedule and a
/// float32 copy on the compute device.
class GaussianDiffusion {
 public:
  GaussianDiffusion(const DiffusionConfig& config, torch::Device device = torch::kCPU);

  const DiffusionConfig& config() const { return config_; }
  int timesteps() const { return config_.timesteps; }
  /// The float64 buffers on the CPU.
  const NoiseSchedule& schedule64() const { return schedule64_; }

  /// Eq. 4 of Ho et al.: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
  torch::Tensor q_sample(const torch::Tensor& x0, const torch::Tensor& t,
                         const torch::Tensor& noise) const;
  /// Eqs. 6-7 of Ho et al.: the posterior q(x_{t-1} | x_t, x_0).
  Posterior q_posterior(const torch::Tensor& x0, const torch::Tensor& x_t,
                        const torch::Tensor& t) const;
  /// x_0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps.
  torch::Tensor predict_start_from_noise(const torch::Tensor& x_t, const torch::Tensor& t,
                                         const torch::Tensor& eps) const;
  /// eps = (sqrt(1/abar_t) x_t - x_0) / sqrt(1/abar_t - 1).
  torch::Tensor predict_noise_from_start(const torch::Tensor& x_t, const torch::Tensor& t,
                                         const torch::Tensor& x0) const;
  /// x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (Salimans & Ho 2022).
  torch::Tensor predict_start_from_v(const torch::Tensor& x_t, const torch::Tensor& t,
                                     const torch::Tensor& v) const;
  /// v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0.
  torch::Tensor velocity(const torch::Tensor& x0, const torch::Tensor& t,
                         const torch::Tensor& noise) const;
  /// x_0 predicted from a model output under the configured objective.
  torch::Tensor predict_start(const torch::Tensor& x_t, const torch::Tensor& t,
                              const torch::Tensor& model_out) const;

  /// The configured loss for given x_0, timesteps and noise (Eq. 14 for objective eps, l2).
  /// sample_weight [B], when defined, multiplies each sample's loss in the mean (an importance
  /// sampler's 1 / (T p_t)); per_sample stays without it.
  DiffusionLoss TrainingLoss(const Denoiser& model, const torch::Tensor& x0, const torch::Tensor& t,
                             const torch::Tensor& noise,
                             const torch::Tensor& sample_weight = {}) const;
  /// The per-timestep weight of the configured weighting, float32 [B].
  torch::Tensor LossWeight(const torch::Tensor& t) const;

  /// p(x_{t-1} | x_t) of the model: the fixed variance of Ho et al., or the learned one when
  /// the model's output has twice the image channels (model.learn_sigma).
  Posterior p_mean_variance(const Denoiser& model, const torch::Tensor& x_t, const torch::Tensor& t,
                            VarianceKind variance, bool clip_x0) const;
  /// p(x_{t-1} | x_t) from a model output already computed (see p_mean_variance).
  Posterior PosteriorFromOutput(const torch::Tensor& x_t, const torch::Tensor& t,
                                const torch::Tensor& model_out, VarianceKind variance,
                                bool clip_x0) const;
  /// Each image's L_t in bits/dim, float64 [B]: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))
  /// for t > 0 and -log p(x_0 | x_1) for t = 0 (Eq. 5 of Ho et al.), from a model output.
  torch::Tensor VbTerms(const torch::Tensor& model_out, const torch::Tensor& x0,
                        const torch::Tensor& x_t, const torch::Tensor& t,
                        VarianceKind variance) const;
  /// Each image's prior term KL(q(x_T | x_0) || N(0, I)) in bits/dim, float64 [B].
  torch::Tensor PriorBits(const torch::Tensor& x0) const;
  /// The bound of each image of x0 in bits/dim: every one of the T terms when num_timesteps is
  /// 0 or T; otherwise t = 0 exactly and an unbiased stratified estimate of the rest from
  /// num_timesteps - 1 more (one t drawn in each of that many equal strata of 1..T-1, weighted
  /// by its stratum's size). Noise and strata are drawn from generator.
  VariationalBound Bound(const Denoiser& model, const torch::Tensor& x0, int num_timesteps,
                         VarianceKind variance, torch::Generator& generator,
                         const SampleProgress& progress = nullptr) const;
  /// The timesteps and weights that Bound with num_timesteps evaluates (strata drawn from
  /// generator), so that a job over many batches can use one draw for all of them.
  std::pair<std::vector<int64_t>, std::vector<double>> BoundTimesteps(
      int num_timesteps, torch::Generator& generator) const;
  /// The bound at given timesteps with given weights (from BoundTimesteps); noise from generator.
  VariationalBound Bound(const Denoiser& model, const torch::Tensor& x0,
                         const std::vector<int64_t>& timesteps, const std::vector<double>& weights,
                         VarianceKind variance, torch::Generator& generator,
                         const SampleProgress& progress = nullptr) const;
  /// Algorithm 2 of Ho et al.: ancestral sampling over all T steps. Deterministic given seed.
  torch::Tensor SampleDdpm(const Denoiser& model, torch::IntArrayRef shape, VarianceKind variance,
                           bool clip_x0, uint64_t seed,
                           const SampleProgress& progress = nullptr) const;
  /// The same with noise from streams.
  torch::Tensor SampleDdpm(const Denoiser& model, torch::IntArrayRef shape, VarianceKind variance,
                           bool clip_x0, NoiseStreams& streams,
                           const SampleProgress& progress = nullptr) const;
  /// DDIM (Song et al. 2021, Eq. 12) over steps evenly spaced timesteps. eta = 1 has the
  /// ancestral posterior variance, eta = 0 is deterministic given x_T. Deterministic given seed.
  torch::Tensor SampleDdim(const Denoiser& model, torch::IntArrayRef shape, int steps, double eta,
                           bool clip_x0, uint64_t seed,
                           const SampleProgress& progress = nullptr) const;
  /// The same with noise from streams.
  torch::Tensor SampleDdim(const Denoiser& model, torch::IntArrayRef shape, int steps, double eta,
                           bool clip_x0, NoiseStreams& streams,
                           const SampleProgress& progress = nullptr) const;
  /// EDM's sampler (Karras et al. 2022) on this process seen as x = x_t / sqrt(abar), noise
  /// level sigma = sqrt(1/abar - 1): steps noise levels from sigma_max = min(80, sigma(T-1)) to
  /// sigma_min = max(0.002, sigma(0)) spaced with rho = 7 (their Eq. 5), each rounded to the
  /// nearest trained timestep's sigma (the model is evaluated only at trained timesteps, as
  /// EDM does for DDPM models), then 0. Heun's second-order step except into 0: 2 steps - 1
  /// network evaluations. The denoiser is D(x; sigma) = the x_0 the model predicts at x_t =
  /// x / sqrt(1 + sigma^2). churn 0 is Algorithm 1 (deterministic given the first noise);
  /// churn > 0 is Algorithm 2 (gamma = min(churn / steps, sqrt(2) - 1) at every step, noise
  /// scaled by s_noise).
  torch::Tensor SampleHeun(const Denoiser& model, torch::IntArrayRef shape, int steps, double churn,
                           double s_noise, NoiseStreams& streams,
                           const SampleProgress& progress = nullptr) const;
  /// SampleHeun's noise levels: steps + 1 sigmas (the last 0) and the timestep of each but the
  /// last.
  std::pair<std::vector<double>, std::vector<int64_t>> HeunSigmas(int steps) const;
  /// The ancestral process on the subsequence timesteps (strictly increasing in [0, T)) of
  /// this one (Nichol & Dhariwal, section 4): betas re-derived from the subsequence's
  /// alphas_cumprod (beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}}; beta_{s_k} itself where the
  /// subsequence is consecutive), its samplers evaluating the model at the original s_k.
  GaussianDiffusion Respaced(const std::vector<int64_t>& timesteps) const;
  /// K timesteps evenly strided over [0, T), the first 0 and the last T - 1, as improved-
  /// diffusion's space_timesteps.
  std::vector<int64_t> EvenlyStrided(int count) const;
  /// Samples with the sampler that config names; ddpm with fewer steps than T (or a list of
  /// sample.timesteps) samples the respaced process.
  torch::Tensor Sample(const Denoiser& model, torch::IntArrayRef shape, const SampleConfig& config,
                       const SampleProgress& progress = nullptr) const;
  /// The same with noise from streams rather than from config.seed.
  torch::Tensor Sample(const Denoiser& model, torch::IntArrayRef shape, const SampleConfig& config,
                       NoiseStreams& streams, const SampleProgress& progress = nullptr) const;

  /// Gathers buffer[t] for each sample of t and shapes it [B, 1, 1, 1] to broadcast over images.
  static torch::Tensor Extract(const torch::Tensor& buffer, const torch::Tensor& t);

 private:
  torch::Tensor Noise(torch::IntArrayRef shape, torch::Generator& generator) const;
  torch::Tensor Noise(torch::IntArrayRef shape, NoiseStreams& streams) const;
  /// The fixed log-variance of p(x_{t-1} | x_t) of kind variance, float64 [B, 1, 1, 1].
  torch::Tensor FixedLogVariance64(const torch::Tensor& t, VarianceKind variance) const;

  GaussianDiffusion(const DiffusionConfig& config, torch::Device device, const torch::Tensor& betas,
                    std::vector<int64_t> timestep_map);
  /// model with its timesteps mapped to the original process's (identity when not respaced).
  Denoiser Mapped(const Denoiser& model) const;

  DiffusionConfig config_;
  torch::Device device_;
  /// The original timestep of each of this process's (empty: not respaced).
  std::vector<int64_t> timestep_map_;
  torch::Tensor timestep_map_tensor_;
  NoiseSchedule schedule64_;
  NoiseSchedule schedule_;
  /// The float64 buffers on the compute device, for the bound.
  NoiseSchedule schedule64_device_;
};

/// A CPU generator seeded with seed.
torch::Generator MakeCpuGenerator(uint64_t seed);
/// A generator for device, seeded with seed.
torch::Generator MakeGenerator(torch::Device device, uint64_t seed);

}  // namespace ddpm
