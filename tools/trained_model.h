// A trained model's EMA network and config, from a checkpoint or a weights file, as
// ddpm_sample and ddpm_nll load it.
#pragma once

#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

#include "config/config.h"
#include "config/flags.h"
#include "trainer/unet.h"

namespace ddpm {

/// The EMA network of a checkpoint (with its config) or of a weights file (with the config
/// beside it), on the config's device.
struct TrainedModel {
  Config config;
  UNet model{nullptr};
  torch::Device device = torch::kCPU;
  /// The file or checkpoint the weights came from, for messages.
  std::string origin;
};

/// Loads checkpoint, or weights with config_path (empty: the .yaml beside the weights), applies
/// the "section.key" overrides (checked like a config file, errors naming tool), validates,
/// and configures threads; throws naming the file or key.
TrainedModel LoadTrainedModel(const std::string& checkpoint, const std::string& weights,
                              const std::string& config_path,
                              const std::vector<std::pair<std::string, std::string>>& overrides,
                              const std::string& tool);

/// Declares the flags that name a trained model and its device: --checkpoint, --weights,
/// --config and --device (every tool that loads one takes them alike).
void AddTrainedModelFlags(Flags& flags);
/// Throws FlagError naming tool unless exactly one of --checkpoint and --weights is given.
void CheckTrainedModelFlags(const Flags& flags, const std::string& tool);
/// The model those flags name, with --device as train.device after overrides.
TrainedModel LoadTrainedModel(const Flags& flags,
                              std::vector<std::pair<std::string, std::string>> overrides,
                              const std::string& tool);

}  // namespace ddpm
