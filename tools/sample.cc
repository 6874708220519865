#include "tools/sample.h"

#include <torch/torch.h>

#include <cstdio>
#include <filesystem>
#include <map>

#include "run/sampling.h"
#include "tools/trained_model.h"
#include "trainer/checkpoint.h"
#include "trainer/device.h"
#include "trainer/diffusion.h"
#include "trainer/tensor_io.h"
#include "trainer/trainer.h"
#include "trainer/unet.h"

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
  flags.Add("steps",
            "sampler steps: DDIM's S, or fewer than T to respace the ancestral sampler (default: "
            "the config's sample.steps; 0: T for ddpm, 100 for ddim)",
            "");
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

TrainedModel LoadTrainedModel(const std::string& checkpoint, const std::string& weights_path,
                              const std::string& config_path,
                              const std::vector<std::pair<std::string, std::string>>& overrides,
                              const std::string& tool) {
  TrainedModel trained;
  std::map<std::string, torch::Tensor> weights;
  if (!checkpoint.empty()) {
    const CheckpointDir::Loaded loaded = LoadCheckpointAt(
        checkpoint,
        [](const std::string& message) { std::printf("ddpm: warning: %s\n", message.c_str()); });
    trained.config = ConfigFromCheckpoint(loaded.tensors, loaded.path);
    weights = WeightsFromState(loaded.tensors, "ema");
    trained.origin = loaded.path;
  } else {
    // An exported weights file carries its config beside it (ddpm_export writes both).
    trained.config =
        LoadConfigFile(config_path.empty() ? ConfigBesideWeights(weights_path) : config_path);
    weights = LoadTensors(weights_path);
    trained.origin = weights_path;
  }
  for (const auto& [key, value] : overrides) {
    SetConfigKey(trained.config, key, value, tool + " flags");
  }
  trained.config.Validate();
  ConfigureThreads(trained.config.train);
  trained.device = torch::Device(ResolveDevice(trained.config.train));
  trained.model = UNet(trained.config.model);
  CheckLearnSigma(trained.config.model, weights, trained.origin);
  LoadStateDict(*trained.model, weights, trained.origin);
  trained.model->to(trained.device);
  return trained;
}

std::vector<std::string> RunSampleJob(const SampleJob& job) {
  if (job.batch_size < 1) throw ConfigError("ddpm_sample: --batch must be >= 1");
  TrainedModel trained =
      LoadTrainedModel(job.checkpoint, job.weights, job.config_path, job.overrides, "ddpm_sample");
  const Config& config = trained.config;
  const torch::Device device = trained.device;
  UNet& model = trained.model;
  const GaussianDiffusion diffusion(config.diffusion, device);
  const int count = config.sample.num_images;
  const torch::Tensor images = SampleImages(
      diffusion, model, config, count, job.batch_size,
      "sampling " + std::to_string(count) + " images (" + Name(config.sample.sampler) + ")");
  const bool to_dir =
      (!job.out.empty() && job.out.back() == '/') || std::filesystem::is_directory(job.out);
  if (to_dir) return WriteSampleFiles(images, job.out);
  WriteSampleGrid(images, job.out);
  return {job.out};
}

std::string ConfigBesideWeights(const std::string& weights) {
  return std::filesystem::path(weights).replace_extension(".yaml").string();
}

}  // namespace ddpm
