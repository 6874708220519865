#include "trainer/timestep_sampler.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace ddpm {

TimestepSampler::TimestepSampler(TimestepSamplerKind kind, int timesteps)
    : kind_(kind), timesteps_(timesteps) {
  if (timesteps < 1) {
    throw std::invalid_argument("TimestepSampler: timesteps must be >= 1, got " +
                                std::to_string(timesteps));
  }
  if (uses_losses()) {
    history_.assign(static_cast<std::size_t>(timesteps) * kHistory, 0.0);
    counts_.assign(timesteps, 0);
  }
}

bool TimestepSampler::loss_aware() const {
  return uses_losses() && std::all_of(counts_.begin(), counts_.end(),
                                      [](int64_t count) { return count == kHistory; });
}

std::vector<double> TimestepSampler::Probabilities() const {
  const double uniform = 1.0 / timesteps_;
  std::vector<double> p(timesteps_, uniform);
  if (!loss_aware()) return p;
  double total = 0;
  for (int t = 0; t < timesteps_; ++t) {
    double second_moment = 0;
    for (int k = 0; k < kHistory; ++k) {
      const double loss = history_[static_cast<std::size_t>(t) * kHistory + k];
      second_moment += loss * loss;
    }
    p[t] = std::sqrt(second_moment / kHistory);
    total += p[t];
  }
  // Every loss zero (or a history of NaNs, which a non-finite loss stops before): uniform.
  if (!(total > 0) || !std::isfinite(total)) return std::vector<double>(timesteps_, uniform);
  for (double& value : p) value = value / total * (1.0 - kUniformProb) + kUniformProb * uniform;
  return p;
}

TimestepSampler::Draw TimestepSampler::Distribution() const {
  const std::vector<double> p = Probabilities();
  Draw draw;
  draw.cumulative.resize(p.size());
  draw.weight.resize(p.size());
  double sum = 0;
  for (std::size_t t = 0; t < p.size(); ++t) {
    sum += p[t];
    draw.cumulative[t] = sum;
    draw.weight[t] = 1.0 / (static_cast<double>(p.size()) * p[t]);
  }
  return draw;
}

int64_t TimestepSampler::Draw::Timestep(double u) const {
  // u scaled by the total, so that rounding in the sum cannot leave a gap at the top.
  const double target = u * cumulative.back();
  const auto it = std::upper_bound(cumulative.begin(), cumulative.end(), target);
  const int64_t t = it - cumulative.begin();
  return std::min<int64_t>(t, static_cast<int64_t>(cumulative.size()) - 1);
}

void TimestepSampler::Update(const std::vector<int64_t>& t, const std::vector<double>& losses) {
  if (!uses_losses()) return;
  if (t.size() != losses.size()) {
    throw std::invalid_argument("TimestepSampler::Update: " + std::to_string(t.size()) +
                                " timesteps but " + std::to_string(losses.size()) + " losses");
  }
  for (std::size_t i = 0; i < t.size(); ++i) {
    if (t[i] < 0 || t[i] >= timesteps_) {
      throw std::invalid_argument("TimestepSampler::Update: timestep " + std::to_string(t[i]) +
                                  " outside [0, " + std::to_string(timesteps_) + ")");
    }
    double* row = history_.data() + static_cast<std::size_t>(t[i]) * kHistory;
    int64_t& count = counts_[t[i]];
    if (count == kHistory) {
      std::copy(row + 1, row + kHistory, row);
      row[kHistory - 1] = losses[i];
    } else {
      row[count++] = losses[i];
    }
  }
}

void TimestepSampler::Restore(std::vector<double> history, std::vector<int64_t> counts,
                              const std::string& origin) {
  const std::size_t rows = static_cast<std::size_t>(timesteps_);
  if (history.size() != rows * kHistory || counts.size() != rows) {
    throw std::invalid_argument(origin + ": the timestep sampler's loss history holds " +
                                std::to_string(history.size()) + " losses and " +
                                std::to_string(counts.size()) + " counts; this run needs " +
                                std::to_string(rows * kHistory) + " and " + std::to_string(rows) +
                                " (T = " + std::to_string(timesteps_) + ")");
  }
  for (std::size_t t = 0; t < rows; ++t) {
    if (counts[t] < 0 || counts[t] > kHistory) {
      throw std::invalid_argument(
          origin + ": the timestep sampler's loss count at t = " + std::to_string(t) + " is " +
          std::to_string(counts[t]) + ", outside [0, " + std::to_string(kHistory) + "]");
    }
  }
  history_ = std::move(history);
  counts_ = std::move(counts);
}

}  // namespace ddpm
