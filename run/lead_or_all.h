// Rank 0 does a piece of work (take a fence, write a plan) and every rank learns how it went.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "base/fence.h"
#include "run/run.h"
#include "trainer/communicator.h"

namespace ddpm {

/// Rank 0 runs body; every rank then learns whether it threw and throws too (rank 0 with its own
/// error, the others with "rank 0 could not WHAT"; a FencedError stays one), so that no rank
/// waits on a collective the others left.
template <typename Body>
void OnLeadOrAll(Communicator& comm, const std::string& what, Body&& body) {
  int64_t failed = 0;  // 1: fenced, 2: any other error
  std::string message;
  if (comm.rank() == 0) {
    try {
      body();
    } catch (const FencedError& error) {
      failed = 1;
      message = error.what();
    } catch (const std::exception& error) {
      failed = 2;
      message = error.what();
    }
  }
  if (comm.world_size() > 1) {
    torch::Tensor word = torch::tensor({failed}, torch::kLong);
    comm.Broadcast(word, 0, "broadcast of whether rank 0 could " + what);
    failed = word.item<int64_t>();
  }
  if (message.empty()) message = "rank 0 could not " + what;
  if (failed == 1) throw FencedError(message);
  if (failed == 2) throw RunError(message);
}

}  // namespace ddpm
