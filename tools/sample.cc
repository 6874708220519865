#include "tools/sample.h"

#include <cstdio>

#include "trainer/config.h"
#include "trainer/train_loop.h"

namespace ddpm {

int RunSample(const SampleOptions& options) {
  Config config = LoadConfigFile(options.config_path);
  const std::string origin = "ddpm_sample flags";
  if (!options.sampler.empty()) SetConfigKey(config, "sample.sampler", options.sampler, origin);
  if (options.steps >= 0) SetConfigKey(config, "sample.steps", std::to_string(options.steps), origin);
  if (!options.eta_text.empty()) SetConfigKey(config, "sample.eta", options.eta_text, origin);
  if (options.num_images >= 0) {
    SetConfigKey(config, "sample.num_images", std::to_string(options.num_images), origin);
  }
  if (options.seed >= 0) SetConfigKey(config, "sample.seed", std::to_string(options.seed), origin);
  config.Validate();
  const double seconds = SampleFromWeights(config, options.weights_path, options.out_path);
  std::printf("ddpm_sample: wrote %s (%.1fs)\n", options.out_path.c_str(), seconds);
  return 0;
}

}  // namespace ddpm
