// Small helpers shared by the benchmark tools.
#pragma once

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

namespace ddpm::bench {

using Clock = std::chrono::steady_clock;

inline double Ms(Clock::time_point since) {
  return std::chrono::duration<double, std::milli>(Clock::now() - since).count();
}

/// The q-quantile of values, interpolating linearly between order statistics.
inline double Quantile(std::vector<double> values, double q) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const double pos = q * (values.size() - 1);
  const std::size_t lo = static_cast<std::size_t>(pos);
  const std::size_t hi = std::min(lo + 1, values.size() - 1);
  return values[lo] + (pos - lo) * (values[hi] - values[lo]);
}

/// The value after flag on the command line, or fallback.
inline std::string ArgOr(int argc, char** argv, const std::string& flag,
                         const std::string& fallback) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (argv[i] == flag) return argv[i + 1];
  }
  return fallback;
}

}  // namespace ddpm::bench
