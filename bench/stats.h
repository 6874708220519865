// Small helpers shared by the benchmark tools.
#pragma once

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include "base/text.h"

namespace ddpm::bench {

using Clock = std::chrono::steady_clock;

/// Milliseconds since `since`.
inline double Ms(Clock::time_point since) { return 1000 * SecondsSince(since); }

/// The q-quantile of values, interpolating linearly between order statistics.
inline double Quantile(std::vector<double> values, double q) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const double pos = q * (values.size() - 1);
  const auto lo = static_cast<std::size_t>(pos);
  const std::size_t hi = std::min(lo + 1, values.size() - 1);
  return values[lo] + (pos - lo) * (values[hi] - values[lo]);
}

}  // namespace ddpm::bench
