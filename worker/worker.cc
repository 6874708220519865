#include "worker/worker.h"

#include <torch/torch.h>

#include <cstdio>

#include "trainer/config.h"
#include "trainer/flags.h"
#include "trainer/train_loop.h"
#include "trainer/unet.h"
#include "worker/gradient_buckets.h"
#include "worker/mpi_communicator.h"
#ifdef DDPM_WITH_NCCL
#include "worker/nccl_communicator.h"
#endif

namespace ddpm {
namespace {

TrainOptions ToTrainOptions(const WorkerOptions& options) {
  TrainOptions train;
  train.run_dir = options.run_dir;
  train.resume = options.resume;
  train.resume_from = options.resume_from;
  return train;
}

int ExitCode(const TrainResult& result) {
  return result.interrupted_by != 0 ? 128 + result.interrupted_by : 0;
}

// Prints this rank's error and ends the whole job, before any destructor can block on a
// collective that a failed peer will never join.
[[noreturn]] void FailRank(const MpiPlacement& placement, const std::exception& error) {
  std::fprintf(stderr, "ddpm_worker: rank %d of %d: error: %s\n", placement.rank,
               placement.world_size, UserMessage(error).c_str());
  MpiRuntime::Abort(1);
}

// One rank of an mpirun job. Any error on any rank ends the whole job with that rank's message.
int RunRank(const Config& config, const WorkerOptions& options) {
  MpiRuntime mpi(nullptr, nullptr);
  const MpiPlacement placement = mpi.placement();
  try {
    std::string device = ResolveDevice(config.train);
    if (device == "cuda") device += ":" + std::to_string(placement.local_rank);

    MpiCommunicator mpi_comm(placement);
    Communicator* gradient_comm = &mpi_comm;
#ifdef DDPM_WITH_NCCL
    std::unique_ptr<Communicator> nccl;
    if (device != "cpu") {
      nccl = MakeNcclCommunicator(placement, mpi_comm);
      gradient_comm = nccl.get();
    }
#else
    if (device != "cpu") {
      throw ConfigError("train.device is " + config.train.device +
                        " but this build has no NCCL backend (DDPM_WITH_NCCL is off); set "
                        "train.device: cpu or rebuild against a LibTorch with CUDA");
    }
#endif
    gradient_comm->set_timeout(config.dist.timeout());
    DistributedContext dist;
    dist.comm = &mpi_comm;
    dist.device = device;
    dist.local_ranks = placement.local_size;
    dist.make_gradient_sync = [&](Trainer& trainer) -> std::unique_ptr<GradientSync> {
      return std::make_unique<GradientBuckets>(*trainer.model(), trainer.parameters(),
                                               *gradient_comm, config.dist.bucket_mb);
    };
    if (placement.rank == 0) {
      std::printf("ddpm: %d ranks (%d on this node); gradients over %s, control over mpi\n",
                  placement.world_size, placement.local_size, gradient_comm->backend().c_str());
    }
    try {
      return ExitCode(RunTraining(config, ToTrainOptions(options), dist));
    } catch (const std::exception& e) {
      FailRank(placement, e);  // Here, while the communicators are still alive.
    }
  } catch (const std::exception& e) {
    FailRank(placement, e);
  }
}

}  // namespace

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
  if (LaunchedByMpi()) return RunRank(config, options);
  return ExitCode(RunTraining(config, ToTrainOptions(options)));
}

}  // namespace ddpm
