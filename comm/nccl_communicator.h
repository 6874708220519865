// The Communicator for CUDA tensors, over NCCL. Built only when LibTorch has CUDA
// (DDPM_WITH_NCCL). The ncclUniqueId comes from rank 0 over MPI; collectives run on a stream of
// their own, ordered after the compute stream's work by an event.
#pragma once

#include <memory>
#include <string>

#include "comm/mpi_communicator.h"
#include "trainer/communicator.h"

namespace ddpm {

/// Makes the NCCL communicator of this rank on cuda:placement.local_rank; bootstrap (an MPI
/// communicator of the same job) carries the unique id. Throws CommError naming the failed call.
std::unique_ptr<Communicator> MakeNcclCommunicator(const MpiPlacement& placement,
                                                   Communicator& bootstrap);

}  // namespace ddpm
