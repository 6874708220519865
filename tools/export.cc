#include "tools/export.h"

#include <torch/torch.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <stdexcept>

#include "base/errors.h"
#include "base/file_io.h"
#include "base/log.h"
#include "config/config.h"
#include "tools/sample.h"
#include "trainer/checkpoint.h"
#include "trainer/tensor_io.h"
#include "trainer/trainer.h"
#include "trainer/unet.h"

namespace ddpm {

std::vector<std::string> RunExport(const ExportJob& job) {
  if (job.which != "ema" && job.which != "model") {
    throw ConfigError("ddpm_export: --weights must be ema or model, got '" + job.which + "'");
  }
  const CheckpointDir::Loaded loaded = LoadCheckpointAt(
      job.checkpoint,
      [](const std::string& message) { LogWarning("ddpm: warning: %s\n", message.c_str()); });
  const Config config = ConfigFromCheckpoint(loaded.tensors, loaded.path);
  const std::map<std::string, torch::Tensor> weights = WeightsFromState(loaded.tensors, job.which);
  // Check that the names and shapes are exactly the UNet's before writing anything.
  UNet model(config.model);
  LoadStateDict(*model, weights, loaded.path);
  SaveTensors(weights, job.out);
  const std::string config_path = ConfigBesideWeights(job.out);
  WriteFileAtomically(config_path, config.ToYaml());
  LogInfo("ddpm: exported the %s weights of %s (%zu tensors) to %s, config to %s\n",
          job.which.c_str(), loaded.path.c_str(), weights.size(), job.out.c_str(),
          config_path.c_str());
  return {job.out, config_path};
}

}  // namespace ddpm
