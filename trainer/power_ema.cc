#include "trainer/power_ema.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>

#include "config/config.h"

namespace ddpm {

namespace {

std::string Text(double value) {
  std::ostringstream out;
  out.precision(6);
  out << value;
  return out.str();
}

}  // namespace

double PowerEmaSigmaRel(double gamma) {
  return std::sqrt((gamma + 1) / ((gamma + 2) * (gamma + 2) * (gamma + 3)));
}

double PowerEmaExponent(double sigma_rel) {
  const double max_sigma_rel = MaxPhemaSigmaRel();
  if (!(sigma_rel > 0 && sigma_rel <= max_sigma_rel)) {
    throw std::invalid_argument("sigma_rel " + Text(sigma_rel) + " is outside (0, " +
                                Text(max_sigma_rel) +
                                "], the relative standard deviations a power-function EMA has");
  }
  const double t = 1.0 / (sigma_rel * sigma_rel);
  // Newton from the right of the largest root, where the cubic is increasing and convex (its
  // inflection is at -7/3, below every root this takes), so the iterates fall monotonically.
  double gamma = std::max(1.0, std::sqrt(t));
  for (int i = 0; i < 200; ++i) {
    const double f = ((gamma + 7) * gamma + (16 - t)) * gamma + (12 - t);
    const double slope = (3 * gamma + 14) * gamma + (16 - t);
    const double next = gamma - f / slope;
    if (!(next < gamma) || slope <= 0) break;
    gamma = next;
  }
  // Never below the peak's exponent, (sqrt(5) - 3) / 2: the largest root lies above it.
  return std::max(gamma, (std::sqrt(5.0) - 3.0) / 2.0);
}

double PowerEmaBeta(double gamma, int64_t step) {
  return std::pow(1.0 - 1.0 / static_cast<double>(step), gamma + 1);
}

double PowerProfileInnerProduct(double a_end, double a_gamma, double b_end, double b_gamma) {
  // Integral over [0, min] of (a+1) t^a / a_end^(a+1) * (b+1) t^b / b_end^(b+1).
  const double ratio = a_end / b_end;
  const double exponent = a_end < b_end ? b_gamma : -a_gamma;
  return (a_gamma + 1) * (b_gamma + 1) * std::pow(ratio, exponent) /
         ((a_gamma + b_gamma + 1) * std::max(a_end, b_end));
}

PosthocFit SolvePosthoc(const std::vector<PowerProfile>& stored, int64_t target_step,
                        double target_sigma_rel) {
  const std::size_t n = stored.size();
  if (n == 0) throw std::invalid_argument("post-hoc EMA: no stored profiles to combine");
  std::vector<double> gammas(n);
  for (std::size_t i = 0; i < n; ++i) gammas[i] = PowerEmaExponent(stored[i].sigma_rel);
  const double target_gamma = PowerEmaExponent(target_sigma_rel);
  const double target_end = static_cast<double>(target_step);
  // Normal equations A x = b, A the Gram matrix of the stored profiles, b their inner products
  // with the target; Gaussian elimination with partial pivoting on [A | b].
  std::vector<std::vector<double>> gram(n, std::vector<double>(n));
  std::vector<double> rhs(n);
  for (std::size_t i = 0; i < n; ++i) {
    for (std::size_t j = 0; j < n; ++j) {
      gram[i][j] = PowerProfileInnerProduct(static_cast<double>(stored[i].step), gammas[i],
                                            static_cast<double>(stored[j].step), gammas[j]);
    }
    rhs[i] = PowerProfileInnerProduct(static_cast<double>(stored[i].step), gammas[i], target_end,
                                      target_gamma);
  }
  std::vector<std::vector<double>> a = gram;
  std::vector<double> x = rhs;
  for (std::size_t col = 0; col < n; ++col) {
    std::size_t pivot = col;
    for (std::size_t row = col + 1; row < n; ++row) {
      if (std::abs(a[row][col]) > std::abs(a[pivot][col])) pivot = row;
    }
    if (!(std::abs(a[pivot][col]) > 1e-300)) {
      throw std::invalid_argument(
          "post-hoc EMA: the stored profiles are linearly dependent (the same step and "
          "sigma_rel twice?)");
    }
    std::swap(a[col], a[pivot]);
    std::swap(x[col], x[pivot]);
    for (std::size_t row = col + 1; row < n; ++row) {
      const double factor = a[row][col] / a[col][col];
      for (std::size_t k = col; k < n; ++k) a[row][k] -= factor * a[col][k];
      x[row] -= factor * x[col];
    }
  }
  for (std::size_t col = n; col-- > 0;) {
    for (std::size_t k = col + 1; k < n; ++k) x[col] -= a[col][k] * x[k];
    x[col] /= a[col][col];
  }
  // ||p - sum x_i p_i||^2 = <p, p> - 2 x.b + x' A x.
  const double target_norm2 =
      PowerProfileInnerProduct(target_end, target_gamma, target_end, target_gamma);
  double residual = target_norm2;
  for (std::size_t i = 0; i < n; ++i) {
    residual -= 2 * x[i] * rhs[i];
    for (std::size_t j = 0; j < n; ++j) residual += x[i] * gram[i][j] * x[j];
  }
  return {x, std::sqrt(std::max(0.0, residual) / target_norm2)};
}

SigmaRelRange ReconstructibleSigmaRels(const std::vector<PowerProfile>& stored, int64_t target_step,
                                       double max_error) {
  auto fits = [&](double sigma_rel) {
    try {
      return SolvePosthoc(stored, target_step, sigma_rel).fit_error <= max_error;
    } catch (const std::invalid_argument&) {
      return false;
    }
  };
  constexpr int kGrid = 400;
  const double lowest = 1e-3;
  auto at = [&](int i) {
    return lowest * std::pow(MaxPhemaSigmaRel() / lowest, static_cast<double>(i) / kGrid);
  };
  int first = -1, last = -1;
  for (int i = 0; i <= kGrid; ++i) {
    if (fits(at(i))) {
      if (first < 0) first = i;
      last = i;
    }
  }
  SigmaRelRange range;
  if (first < 0) return range;
  // Bisect each edge between a grid point that fits and its neighbour that does not.
  auto edge = [&](double inside, double outside) {
    while (std::abs(outside - inside) > 1e-4 * inside) {
      const double middle = std::sqrt(inside * outside);
      (fits(middle) ? inside : outside) = middle;
    }
    return inside;
  };
  range.low = first == 0 ? at(0) : edge(at(first), at(first - 1));
  range.high = last == kGrid ? at(kGrid) : edge(at(last), at(last + 1));
  return range;
}

}  // namespace ddpm
