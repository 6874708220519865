// A trained model's EMA network and config, from a checkpoint or a weights file, as
// ddpm_sample and ddpm_nll load it.
#pragma once

#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

#include "config/config.h"
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

}  // namespace ddpm
