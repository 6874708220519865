// ddpm_phema: post-hoc EMA (Karras et al. 2024). Reconstructs the EMA of any relative standard
// deviation at any step from a run's stored power-function profiles, as weights files that
// ddpm_sample, ddpm_fid and torch.load read, and optionally measures FID and IS of each.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "config/flags.h"
#include "trainer/power_ema.h"

namespace ddpm {

/// What ddpm_phema reconstructs and where it writes.
struct PhemaJob {
  /// A run directory (its phema/ folder) or a folder of snapshots.
  std::string run;
  /// The relative standard deviations to reconstruct.
  std::vector<double> sigma_rels;
  /// The step whose EMA to reconstruct: 0 is the newest snapshot's.
  int64_t step = 0;
  /// One sigma_rel: the weights file; several: a directory of sigma_rel_S.pt files (and the
  /// sweep's phema_sweep.csv and .png).
  std::string out;
  /// A sigma_rel whose least-squares fit has a larger relative error is refused.
  double max_fit_error = 0.05;
  /// Measure FID and IS of each reconstruction with these "eval.key" overrides (empty: no
  /// evaluation), on device.
  std::vector<std::pair<std::string, std::string>> eval_overrides;
  std::string device;
};

/// One reconstructed EMA.
struct PhemaResult {
  double sigma_rel = 0;
  int64_t step = 0;
  /// The weights file and the config beside it.
  std::string weights, config;
  PosthocFit fit;
  /// With an evaluation: FID, IS and its spread.
  bool evaluated = false;
  double fid = 0, inception_score = 0, inception_score_std = 0;
};

/// Declares ddpm_phema's flags.
void AddPhemaFlags(Flags& flags);
/// The job the parsed flags ask for; throws FlagError for a bad combination.
PhemaJob PhemaJobFromFlags(const Flags& flags);
/// Reconstructs every sigma_rel of job, reading each snapshot once, and writes the weights
/// (and with an evaluation the sweep); prints each fit error. Throws naming the value and the
/// range when a sigma_rel cannot be reconstructed, the run when it holds no snapshots, the
/// snapshot file when one does not read or keeps other profiles.
std::vector<PhemaResult> RunPhema(const PhemaJob& job);

}  // namespace ddpm
