// Where a process computes: torch's thread count and the device of train.device.
#pragma once

#include <string>

#include "config/config.h"

namespace ddpm {

/// Sets torch's intra-op threads from train.threads; when it is 0, from OMP_NUM_THREADS if set,
/// else the cores this process is bound to when a launcher bound it, else cores / local_ranks
/// (0: from the launcher's environment). Returns the thread count in use.
int ConfigureThreads(const TrainConfig& config, int local_ranks = 0);

/// "cuda" or "cpu" for train.device ("auto" picks cuda when it is available); throws
/// ConfigError when cuda is asked for and LibTorch sees no CUDA device.
std::string ResolveDevice(const TrainConfig& config);

}  // namespace ddpm
