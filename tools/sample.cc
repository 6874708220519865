#include "tools/sample.h"

namespace ddpm {

void AddSampleFlags(Flags& flags) {
  flags.Add("checkpoint",
            "a checkpoint directory (RUN_DIR/checkpoints/step_*), a checkpoints folder or a run "
            "directory (its newest valid checkpoint); its EMA weights and config are used",
            "");
  flags.Add("weights", "or a weights file: ddpm_export's, or RUN_DIR/ema_weights.pt", "");
  flags.Add("config",
            "the YAML config the weights were trained with (default: the .yaml beside them)", "");
  flags.Add("out", "a PNG grid, or a directory (ending in /) for one PNG per image", "samples.png");
  flags.Add("num", "number of images (default: the config's sample.num_images)", "");
  flags.Add("sampler", "ddpm or ddim (default: the config's sample.sampler)", "");
  flags.Add("steps", "DDIM steps (default: the config's sample.steps)", "");
  flags.Add("eta", "DDIM eta (default: the config's sample.eta)", "");
  flags.Add("variance", "DDPM variance, fixedlarge or fixedsmall (default: the config's)", "");
  flags.Add("seed", "sampler seed; batch b uses seed + b (default: the config's sample.seed)", "");
  flags.Add("batch", "images per forward pass", "64");
  flags.Add("device", "cpu, cuda or auto (default: the config's train.device)", "");
}

SampleJob SampleJobFromFlags(const Flags& flags) {
  SampleJob job;
  job.checkpoint = flags.Get("checkpoint");
  job.weights = flags.Get("weights");
  job.config_path = flags.Get("config");
  if (job.checkpoint.empty() == job.weights.empty()) {
    throw FlagError("ddpm_sample: give either --checkpoint or --weights");
  }
  job.out = flags.Get("out");
  job.batch_size = static_cast<int>(flags.GetInt("batch"));
  // Each override goes through the config loader, so it is checked like a config file.
  const std::pair<const char*, const char*> keys[] = {
      {"num", "sample.num_images"}, {"sampler", "sample.sampler"},   {"steps", "sample.steps"},
      {"eta", "sample.eta"},        {"variance", "sample.variance"}, {"seed", "sample.seed"},
      {"device", "train.device"}};
  for (const auto& [flag, key] : keys) {
    if (flags.Given(flag)) job.overrides.emplace_back(key, flags.Get(flag));
  }
  return job;
}

}  // namespace ddpm
