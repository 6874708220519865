#include "worker/worker.h"

#include <cstdio>

#include "trainer/config.h"
#include "trainer/train_loop.h"
#include "trainer/unet.h"

namespace ddpm {

int RunWorker(const WorkerOptions& options) {
  const Config config = LoadConfigFile(options.config_path);
  if (options.print_config) {
    std::printf("%s", config.ToYaml().c_str());
    return 0;
  }
  if (options.print_params) {
    UNet model(config.model);
    std::printf("%lld\n", static_cast<long long>(CountParameters(*model)));
    return 0;
  }
  TrainOptions train;
  train.run_dir = options.run_dir;
  train.resume = options.resume;
  train.resume_from = options.resume_from;
  const TrainResult result = RunTraining(config, train);
  return result.interrupted_by != 0 ? 128 + result.interrupted_by : 0;
}

}  // namespace ddpm
