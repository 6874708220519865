#include "worker/worker.h"

#include <signal.h>
#include <torch/torch.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#include <cstdio>

#include "base/log.h"
#include "comm/gradient_buckets.h"
#include "comm/mpi_communicator.h"
#include "config/config.h"
#include "config/flags.h"
#include "run/run.h"
#include "trainer/device.h"
#include "trainer/unet.h"
#include "worker/gateway_client.h"
#include "worker/group.h"
#include "worker/rank_metrics.h"
#ifdef DDPM_HAS_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif
#ifdef DDPM_WITH_NCCL
#include "comm/nccl_communicator.h"
#endif

namespace ddpm {
namespace {

// Bytes in use on device: the CUDA caching allocator's on a GPU, resident memory on the CPU.
int64_t DeviceMemoryBytes(const std::string& device) {
#ifdef DDPM_HAS_CUDA
  if (device.rfind("cuda", 0) == 0) {
    const auto stats =
        c10::cuda::CUDACachingAllocator::getDeviceStats(torch::Device(device).index());
    return stats.allocated_bytes[0].current;  // [0]: the aggregate over pool kinds
  }
#endif
  return ResidentMemoryBytes();
}

// This rank's measurements, and its own /metrics endpoint when options ask for one.
struct RankTelemetry {
  RankTelemetry(const WorkerOptions& options, int rank, int local_rank, const std::string& device)
      : recorder(rank, device, [device] { return DeviceMemoryBytes(device); }) {
    if (options.metrics_listen.empty()) return;
    const std::string listen = OffsetListenAddress(options.metrics_listen, local_rank);
    endpoint = std::make_unique<RankMetricsEndpoint>(recorder, listen);
    LogInfo("ddpm_worker: rank %d: metrics at http://%s:%d/metrics\n", rank,
            listen.substr(0, listen.rfind(':')).c_str(), endpoint->port());
  }
  RankRecorder recorder;
  std::unique_ptr<RankMetricsEndpoint> endpoint;
};

// One run from the command line; the recorder follows it under the run directory's name.
TrainOptions ToTrainOptions(const WorkerOptions& options, RankTelemetry& telemetry) {
  TrainOptions train;
  train.run_dir = options.run_dir;
  train.resume = options.resume;
  train.resume_from = options.resume_from;
  train.progress = options.progress;
  std::string run = options.run_dir;
  while (run.size() > 1 && run.back() == '/') run.pop_back();
  telemetry.recorder.SetRun(run.substr(run.rfind('/') + 1));
  RankRecorder& recorder = telemetry.recorder;
  train.on_step = [&recorder](const WorkerMetrics& metrics) { recorder.RecordStep(metrics); };
  train.on_checkpoint = [&recorder](const CommittedCheckpoint& checkpoint) {
    recorder.RecordCheckpoint(checkpoint);
  };
  return train;
}

int ExitCode(const TrainResult& result) {
  return result.interrupted_by != 0 ? 128 + result.interrupted_by : 0;
}

// Prints this rank's error and ends the whole job, before any destructor can block on a
// collective that a failed peer will never join.
[[noreturn]] void FailRank(const MpiPlacement& placement, const std::exception& error) {
  LogError("ddpm_worker: rank %d of %d: error: %s\n", placement.rank, placement.world_size,
           UserMessage(error).c_str());
  MpiRuntime::Abort(1);
}

// The distributed context of a run on this rank: its device and gradient backend. The NCCL
// communicator is made once, by the first run on a GPU (every rank makes it together).
class RankContexts {
 public:
  RankContexts(const MpiPlacement& placement, MpiCommunicator& mpi)
      : placement_(placement), mpi_(mpi) {}

  DistributedContext For(const Config& config) {
    std::string device = ResolveDevice(config.train);
    if (device == "cuda") device += ":" + std::to_string(placement_.local_rank);
    Communicator* gradient_comm = &mpi_;
#ifdef DDPM_WITH_NCCL
    if (device != "cpu") {
      if (!nccl_) nccl_ = MakeNcclCommunicator(placement_, mpi_);
      gradient_comm = nccl_.get();
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
    dist.comm = &mpi_;
    dist.device = device;
    dist.local_ranks = placement_.local_size;
    dist.make_data_parallel = GradientBucketsFor(*gradient_comm, mpi_, config.dist.bucket_mb);
    if (placement_.rank == 0) {
      LogInfo("ddpm: %d ranks (%d on this node); gradients over %s, control over mpi\n",
              placement_.world_size, placement_.local_size, gradient_comm->backend().c_str());
    }
    return dist;
  }

 private:
  const MpiPlacement placement_;
  MpiCommunicator& mpi_;
  std::unique_ptr<Communicator> nccl_;
};

// The group's report mailbox as the heartbeats use it.
class MailboxLink : public RankLink {
 public:
  explicit MailboxLink(const MpiPlacement& placement) : mailbox_(placement) {}
  bool Post(const std::string& report) override { return mailbox_.Post(report); }
  std::vector<std::pair<int, std::string>> Collect() override { return mailbox_.Collect(); }

 private:
  MpiMailbox mailbox_;
};

// The device a group registers for this rank.
std::string DeviceOfRank(int local_rank) {
  return torch::cuda::is_available() ? "cuda:" + std::to_string(local_rank) : "cpu";
}

// The device of this rank for a run from the command line.
std::string DeviceOfRun(const Config& config, int local_rank) {
  const std::string device = ResolveDevice(config.train);
  return device == "cuda" ? device + ":" + std::to_string(local_rank) : device;
}

// Ends this process when mpirun dies (SIGKILL cannot be forwarded), so that no orphaned rank
// trains on, heartbeating for a group that is gone.
void DieWithLauncher() {
#ifdef __linux__
  const pid_t launcher = getppid();
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != launcher) std::_Exit(1);  // It died before prctl took effect.
#endif
}

// One rank of an mpirun job: the config's run, or the coordinator's runs. Any error on any rank
// ends the whole job with that rank's message.
int RunRank(const WorkerOptions& options, const Config* config) {
  MpiRuntime mpi(nullptr, nullptr);
  const MpiPlacement placement = mpi.placement();
  SetLogRank(placement.rank, placement.world_size);
  try {
    MpiCommunicator mpi_comm(placement);
    RankContexts contexts(placement, mpi_comm);
    try {
      RankTelemetry telemetry(options, placement.rank, placement.local_rank,
                              config == nullptr ? DeviceOfRank(placement.local_rank)
                                                : DeviceOfRun(*config, placement.local_rank));
      if (config == nullptr) {
        // One heartbeat per group where MPI lets the heartbeat thread call it beside the
        // communication thread; else one per rank, as before.
        std::unique_ptr<MailboxLink> link;
        if (placement.thread_multiple && placement.world_size > 1) {
          link = std::make_unique<MailboxLink>(placement);
        }
        return ServeGroup(
            options, mpi_comm, [&](const Config& run_config) { return contexts.For(run_config); },
            telemetry.recorder, link.get());
      }
      return ExitCode(
          RunTraining(*config, ToTrainOptions(options, telemetry), contexts.For(*config)));
    } catch (const std::exception& e) {
      FailRank(placement, e);  // Here, while the communicators are still alive.
    }
  } catch (const std::exception& e) {
    FailRank(placement, e);
  }
}

}  // namespace

int RunWorker(const WorkerOptions& options) {
  if (!options.coordinator.empty()) {
    if (LaunchedByMpi()) {
      DieWithLauncher();
      return RunRank(options, nullptr);
    }
    SoloCommunicator solo;
    RankTelemetry telemetry(options, 0, 0, DeviceOfRank(0));
    return ServeGroup(
        options, solo,
        [](const Config& config) {
          DistributedContext dist;
          dist.device = ResolveDevice(config.train);
          return dist;
        },
        telemetry.recorder);
  }
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
  if (LaunchedByMpi()) return RunRank(options, &config);
  RankTelemetry telemetry(options, 0, 0, DeviceOfRun(config, 0));
  return ExitCode(RunTraining(config, ToTrainOptions(options, telemetry)));
}

}  // namespace ddpm
