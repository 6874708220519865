// ddpm_sample: EMA weights to a PNG grid of samples. Torch-free header.
#pragma once

#include <string>

namespace ddpm {

/// What the ddpm_sample command line asks for.
struct SampleOptions {
  /// The config the weights were trained with (model and diffusion sections).
  std::string config_path;
  /// A weights file written by ddpm_worker (ema_weights.pt) or torch.save of a state dict.
  std::string weights_path;
  /// Output PNG.
  std::string out_path = "samples.png";
  /// Overrides of the config's sample section; empty or negative keeps the config's value.
  std::string sampler;
  int steps = -1;
  /// DDIM eta as YAML text, validated by the config loader.
  std::string eta_text;
  int num_images = -1;
  long long seed = -1;
};

/// Draws the samples and writes the grid; returns the process exit code.
int RunSample(const SampleOptions& options);

}  // namespace ddpm
