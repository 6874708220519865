// What an evaluation reports, for the run, the logs and the coordinator. Torch-free.
#pragma once

#include <cstdint>
#include <string>

namespace ddpm {

/// One evaluation of a run's EMA samples (every rank computes the same numbers).
struct EvalReport {
  int64_t step = 0;
  double fid = 0;
  /// Inception Score over 10 splits: mean and standard deviation.
  double inception_score = 0;
  double inception_score_std = 0;
  /// The protocol: samples, sampler ("ddpm" or "ddim") and its steps, and the SHA-256 of the
  /// Inception weights and of the reference statistics file.
  int64_t num_samples = 0;
  std::string sampler;
  int sampling_steps = 0;
  std::string inception_sha256;
  std::string reference_sha256;
  /// Whether the Frechet distance needed eps * I on the covariances.
  bool regularized = false;
  /// Seconds the evaluation took (sampling and Inception), not counted as training time.
  double seconds = 0;
};

}  // namespace ddpm
