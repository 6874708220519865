// Which timestep each training sample sees: uniform (Ho et al.), or importance-sampled from the
// loss history (Nichol & Dhariwal 2021, section 3.3). Torch-free: host arithmetic in float64,
// identical on every rank that feeds it the same losses.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "config/config.h"

namespace ddpm {

/// improved-diffusion's LossSecondMomentResampler: p_t proportional to sqrt(E[L_t^2]) over the
/// last kHistory losses seen at t, mixed with kUniformProb of the uniform distribution, and
/// uniform until every t has a full history. A sample drawn with probability p_t has its loss
/// weighted by 1 / (T p_t), so the weighted loss is an unbiased estimate of the uniform-t one.
class TimestepSampler {
 public:
  /// Losses kept per timestep (improved-diffusion's history_per_term).
  static constexpr int kHistory = 10;
  /// Share of the uniform distribution mixed into the loss-aware one (uniform_prob).
  static constexpr double kUniformProb = 0.001;

  TimestepSampler(TimestepSamplerKind kind, int timesteps);

  TimestepSamplerKind kind() const { return kind_; }
  int timesteps() const { return timesteps_; }
  /// Whether draws depend on the losses: loss_second_moment with every history full.
  bool loss_aware() const;
  /// Whether Update is needed at all (loss_second_moment).
  bool uses_losses() const { return kind_ == TimestepSamplerKind::kLossSecondMoment; }
  /// p_t for every t, summing to 1.
  std::vector<double> Probabilities() const;

  /// The distribution of one step, fixed while its samples are drawn.
  struct Draw {
    /// Cumulative p_0 + ... + p_t.
    std::vector<double> cumulative;
    /// 1 / (T p_t).
    std::vector<double> weight;
    /// The t whose cumulative probability first exceeds u in [0, 1) (the inverse CDF).
    int64_t Timestep(double u) const;
  };
  /// Probabilities() as a Draw.
  Draw Distribution() const;

  /// Appends each (t, loss) in order, the oldest loss of a full history shifted out.
  void Update(const std::vector<int64_t>& t, const std::vector<double>& losses);

  /// The history [T x kHistory] row-major (unfilled entries 0) and its counts [T].
  const std::vector<double>& history() const { return history_; }
  const std::vector<int64_t>& counts() const { return counts_; }
  /// Restores history() and counts(); throws std::invalid_argument naming origin on a size or a
  /// count outside [0, kHistory].
  void Restore(std::vector<double> history, std::vector<int64_t> counts, const std::string& origin);

 private:
  TimestepSamplerKind kind_;
  int timesteps_;
  std::vector<double> history_;
  std::vector<int64_t> counts_;
};

}  // namespace ddpm
