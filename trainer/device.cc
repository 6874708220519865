#include "trainer/device.h"

#include <sched.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdlib>
#include <thread>

namespace ddpm {

int ConfigureThreads(const TrainConfig& config, int local_ranks) {
  int threads = config.threads;
  if (threads == 0) {
    const char* omp = std::getenv("OMP_NUM_THREADS");
    threads = omp != nullptr ? std::atoi(omp) : 0;
  }
  if (threads <= 0) {
    if (local_ranks <= 0) {
      local_ranks = 1;
      for (const char* name :
           {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"}) {
        if (const char* value = std::getenv(name)) {
          local_ranks = std::max(1, std::atoi(value));
          break;
        }
      }
    }
    const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    // A launcher that binds each rank to its own cores (mpirun does by default) has already
    // divided them: use what this process may run on.
    cpu_set_t allowed;
    CPU_ZERO(&allowed);
    const int bound =
        sched_getaffinity(0, sizeof(allowed), &allowed) == 0 ? CPU_COUNT(&allowed) : cores;
    threads = bound < cores ? bound : std::max(1, cores / local_ranks);
  }
  torch::set_num_threads(threads);
  return threads;
}

std::string ResolveDevice(const TrainConfig& config) {
  if (config.device == "cuda" && !torch::cuda::is_available()) {
    throw ConfigError("config: train.device: cuda was asked for, but LibTorch sees no CUDA device");
  }
  if (config.device == "auto") return torch::cuda::is_available() ? "cuda" : "cpu";
  return config.device;
}

}  // namespace ddpm
