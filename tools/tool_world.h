// The ranks a tool runs on: MPI's world when a launcher (mpirun, srun) started the process and
// the build has MPI (the service build: DDPM_HAS_MPI), else a world of one. Shared by the
// mains of ddpm_nll and ddpm_sample.
#pragma once

#include <torch/torch.h>

#include <cstdio>
#include <functional>
#include <memory>
#include <string>

#ifdef DDPM_HAS_MPI
#include "base/log.h"
#include "comm/mpi_communicator.h"
#endif
#include "config/flags.h"
#include "tools/trained_model.h"
#include "trainer/communicator.h"
#include "trainer/device.h"

namespace ddpm {

/// This process's place among the tool's ranks.
class ToolWorld {
 public:
  /// Joins MPI's world when a launcher started the process (MPI_Init takes argc and argv).
  ToolWorld(int* argc, char*** argv) {
#ifdef DDPM_HAS_MPI
    if (LaunchedByMpi()) {
      mpi_ = std::make_unique<MpiRuntime>(argc, argv);
      comm_ = std::make_unique<MpiCommunicator>(mpi_->placement());
      local_rank_ = mpi_->placement().local_rank;
      local_size_ = mpi_->placement().local_size;
      SetLogRank(mpi_->placement().rank, mpi_->placement().world_size);
      return;
    }
#else
    (void)argc;
    (void)argv;
#endif
    comm_ = std::make_unique<SoloCommunicator>();
  }
  ToolWorld(const ToolWorld&) = delete;
  ToolWorld& operator=(const ToolWorld&) = delete;

  Communicator& comm() { return *comm_; }
  bool lead() const { return comm_->rank() == 0; }

  /// Threads per rank and, on CUDA, GPU local_rank for a world of several ranks.
  void Place(TrainedModel& trained) const {
    if (comm_->world_size() == 1) return;
    ConfigureThreads(trained.config.train, local_size_);
    if (trained.device.is_cuda()) {
      trained.device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(local_rank_));
      trained.model->to(trained.device);
    }
  }

  /// Runs body; on several ranks a failing rank prints its error and ends the whole job, so
  /// that the others do not wait for it in a collective.
  int Run(const std::string& tool, const std::function<int()>& body) {
    try {
      return body();
    } catch (const std::exception& error) {
#ifdef DDPM_HAS_MPI
      if (comm_->world_size() > 1) {
        LogError("%s: rank %d: error: %s", tool.c_str(), comm_->rank(), UserMessage(error).c_str());
        MpiRuntime::Abort(1);
      }
#endif
      throw;
    }
  }

 private:
  // Declared first, destroyed last: MPI_Finalize after the communicator's thread has ended.
#ifdef DDPM_HAS_MPI
  std::unique_ptr<MpiRuntime> mpi_;
#endif
  std::unique_ptr<Communicator> comm_;
  int local_rank_ = 0;
  int local_size_ = 1;
};

}  // namespace ddpm
