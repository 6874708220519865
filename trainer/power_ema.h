// The arithmetic of post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training
// Dynamics of Diffusion Models", section 3 and appendix C): power-function EMA profiles, their
// relative standard deviation, and the least-squares combination of stored profiles that
// approximates another. Torch-free; the running profiles are PowerEma (optimizer.h).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ddpm {

/// EDM2 Eq. 3: the relative standard deviation of the profile t^gamma on [0, 1],
/// sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))).
double PowerEmaSigmaRel(double gamma);
/// The exponent gamma of relative standard deviation sigma_rel: the largest real root of
/// gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0 (EDM2's
/// std_to_exp). Throws std::invalid_argument naming sigma_rel outside (0, MaxPhemaSigmaRel()]
/// (config.h).
double PowerEmaExponent(double sigma_rel);
/// EDM2 Eq. 4 in steps: the decay of update number step (1-based), (1 - 1/step)^(gamma + 1),
/// so that after n updates the average weighs update t by (t^(g+1) - (t-1)^(g+1)) / n^(g+1).
double PowerEmaBeta(double gamma, int64_t step);

/// The inner product of two power-function profiles normalised to unit mass, one ending at
/// step a_end with exponent a_gamma, the other at b_end with b_gamma, in continuous time:
/// (a+1)(b+1) (min/max)^(exponent of the longer) / ((a + b + 1) max) (EDM2's
/// power_function_correlation).
double PowerProfileInnerProduct(double a_end, double a_gamma, double b_end, double b_gamma);

/// One stored profile: its snapshot step and relative standard deviation.
struct PowerProfile {
  int64_t step = 0;
  double sigma_rel = 0;
};

/// How a target profile is made of stored ones.
struct PosthocFit {
  /// One weight per stored profile, in their order.
  std::vector<double> coefficients;
  /// ||target - sum coefficients_i profile_i|| / ||target|| over time (0: exact).
  double fit_error = 0;
};

/// EDM2's solve_posthoc_coefficients: the least-squares coefficients of the stored profiles
/// that approximate the profile of target_sigma_rel ending at target_step, from the Gram
/// matrix of the profiles' inner products (all closed form), and the fit's relative error.
/// Throws std::invalid_argument when there are no profiles or the Gram matrix is singular
/// (the same profile stored twice).
PosthocFit SolvePosthoc(const std::vector<PowerProfile>& stored, int64_t target_step,
                        double target_sigma_rel);

/// The interval of sigma_rel whose fit from stored at target_step has a relative error of at
/// most max_error (found on a fine logarithmic grid, then bisected to 1e-4 relative); empty
/// (low > high) when no sigma_rel qualifies.
struct SigmaRelRange {
  double low = 1, high = 0;
  bool empty() const { return low > high; }
};
SigmaRelRange ReconstructibleSigmaRels(const std::vector<PowerProfile>& stored, int64_t target_step,
                                       double max_error);

}  // namespace ddpm
