// What an evaluation reports, for the run, the logs and the coordinator. Torch-free.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "config/config.h"

namespace ddpm {

/// The checkpoint a run keeps for its best score after an evaluation (eval.select), or an
/// evaluation job's best of its sweep.
struct BestStatus {
  int64_t step = 0;
  /// Its directory (RUN_DIR/checkpoints/step_XXXXXXXXX).
  std::string path;
  /// "fid", "kid" or "nll", and its value (lower is better).
  std::string metric;
  double score = 0;
  /// Evaluations since it that did not improve on it, and eval.patience (0: never stops).
  int evaluations_since = 0;
  int patience = 0;
};

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
  /// KID and PRD were measured (eval.metrics kid, prd; below).
  bool has_kid = false;
  bool has_prd = false;
  double guidance = 1.0;
  /// KID: the unbiased MMD^2's mean and standard deviation over kid_subsets subsets of
  /// kid_subset_size samples and as many reference features.
  double kid = 0;
  double kid_std = 0;
  int64_t kid_subset_size = 0;
  int kid_subsets = 0;
  /// Precision and recall (k = 3), density and coverage (k = 5) of the num_samples samples
  /// against prd_reference_count reference features.
  double precision = 0;
  double recall = 0;
  double density = 0;
  double coverage = 0;
  int64_t prd_reference_count = 0;
  /// An evaluation job's memorization report: the share of samples flagged as copies in pixel
  /// and in feature space; -1 when not measured.
  double memorized_pixel = -1;
  double memorized_feature = -1;
  /// The run's best checkpoint after this evaluation (eval.select), when it keeps one.
  std::optional<BestStatus> best;
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

/// The score select takes from report (FID, KID or the bound in bits/dim; lower is better), or
/// nullopt when report did not measure it or select is none.
std::optional<double> SelectedScore(EvalSelect select, const EvalReport& report);

/// The lines a tool or log prints for report's KID and PRD (empty when it has neither):
/// "KID 0.001234 +- 0.000456 (100 subsets of 1000)\n" and
/// "precision 0.6120, recall 0.5010 (k = 3); density 0.9870, coverage 0.8120 (k = 5); 10000
/// samples against 10000 reference features\n".
std::string DescribeKidAndPrd(const EvalReport& report);

}  // namespace ddpm
