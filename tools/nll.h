// ddpm_nll's work: the variational bound (NLL) of a trained model on a dataset in bits/dim,
// across a communicator's ranks, with the term of every timestep as CSV and a PNG plot.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "config/flags.h"
#include "tools/trained_model.h"
#include "trainer/communicator.h"

namespace ddpm {

/// What ddpm_nll measures and where it writes.
struct NllJob {
  /// cifar10:PATH (the test split, the paper's NLL), cifar10-train:PATH, folder:PATH or
  /// shapes:N (built-in shapes drawn with a seed that training never uses).
  std::string data;
  /// Images, from the first (0: all).
  int64_t num_images = 0;
  /// 0: all T terms per image; K: t = 0 and an unbiased stratified estimate from K - 1 more.
  int num_timesteps = 0;
  /// Seeds the strata and the noise.
  uint64_t seed = 0;
  /// Images per forward pass (the result depends on it, not on the ranks).
  int batch_size = 64;
  /// A folder for nll_terms.csv and nll_terms.png.
  std::string out = "nll";
  /// Config overrides for the model (sample.variance from --variance).
  std::vector<std::pair<std::string, std::string>> overrides;
};

/// Declares ddpm_nll's flags, the trained model's among them.
void AddNllFlags(Flags& flags);
/// Reads them; throws FlagError naming the flag.
NllJob NllJobFromFlags(const Flags& flags);
/// Measures the bound of trained on the job's data as this rank of comm's world; rank 0 prints
/// it and writes the CSV and the plot. Returns the exit code (0).
int RunNllJob(const NllJob& job, TrainedModel& trained, Communicator& comm);

}  // namespace ddpm
