// ddpm_sample: a checkpoint's (or a weights file's) EMA model to PNG samples.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "config/flags.h"

namespace ddpm {

/// What ddpm_sample draws from and where it writes.
struct SampleJob {
  /// A checkpoint directory, a checkpoints folder or a run directory (its newest valid
  /// checkpoint); its EMA weights and config are used.
  std::string checkpoint;
  /// Or a weights file (ddpm_export's, ema_weights.pt, or a torch.save'd state dict) ...
  std::string weights;
  /// ... with the config it was trained with; empty: the .yaml beside the weights file.
  std::string config_path;
  /// "section.key" -> YAML value overrides of the config (sample.* mostly).
  std::vector<std::pair<std::string, std::string>> overrides;
  /// Images per forward pass.
  int batch_size = 64;
  /// A PNG grid, or a directory (existing, or ending in '/') for one PNG per image.
  std::string out = "samples.png";
};

/// Declares ddpm_sample's flags.
void AddSampleFlags(Flags& flags);
/// The job the parsed flags ask for; throws FlagError for a bad combination.
SampleJob SampleJobFromFlags(const Flags& flags);
/// Draws the samples of job and writes them; returns the files written.
std::vector<std::string> RunSampleJob(const SampleJob& job);

/// The config file that goes with an exported weights file: model.pt -> model.yaml.
std::string ConfigBesideWeights(const std::string& weights);

}  // namespace ddpm
