// What an evaluation reports, for the run, the logs and the coordinator. Torch-free.
#pragma once

#include <cstdint>
#include <string>

namespace ddpm {

/// One evaluation of a run's EMA model at a step (every rank computes the same numbers): FID
/// and IS of its samples, the variational bound on held-out images, or both.
struct EvalReport {
  int64_t step = 0;
  /// FID and IS were measured (eval.every); num_samples is then > 0.
  bool has_fid() const { return num_samples > 0; }
  double fid = 0;
  /// Inception Score over 10 splits: mean and standard deviation, from is_logits' logits
  /// ("unbiased": the original TF code's; "biased").
  double inception_score = 0;
  double inception_score_std = 0;
  std::string is_logits;
  /// The protocol: samples, sampler ("ddpm" or "ddim") and its steps, and the SHA-256 of the
  /// Inception weights and of the reference statistics file.
  int64_t num_samples = 0;
  std::string sampler;
  int sampling_steps = 0;
  /// Sample i drew its noise from (seed, i).
  uint64_t seed = 0;
  std::string inception_sha256;
  std::string reference_sha256;
  /// Whether the Frechet distance needed eps * I on the covariances.
  bool regularized = false;
  /// A class-conditional model's evaluation: class-balanced samples (sample i of class i mod
  /// model.num_classes) with classifier-free guidance of scale guidance (eval.guidance).
  bool guided = false;
  double guidance = 1.0;
  /// Seconds the evaluation took (sampling, Inception and the bound), not counted as training
  /// time.
  double seconds = 0;

  /// The variational bound in bits/dim was measured (eval.nll_every), with its standard error
  /// over nll_images images of nll_data, from nll_timesteps of nll_timesteps_total timesteps
  /// per image (all: the full bound).
  bool has_nll = false;
  double nll_bits_per_dim = 0;
  double nll_std_error = 0;
  int64_t nll_images = 0;
  std::string nll_data;
  int nll_timesteps = 0;
  int nll_timesteps_total = 0;
};

}  // namespace ddpm
