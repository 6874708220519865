// How a global batch is split over ranks and micro-batches: computed once, by PlanBatch, and
// read by everything that needs the split (the coordinator's placement, the data shard, the
// train step, the logs).
#pragma once

#include <string>

#include "config/config.h"

namespace ddpm {

/// The split of train.batch_size over a world of ranks: every rank trains micro_batches
/// micro-batches of micro_batch images per optimizer step, and
/// global_batch = ranks x micro_batches x micro_batch.
struct BatchPlan {
  /// Images per optimizer step over all ranks (train.batch_size).
  int global_batch = 1;
  /// Ranks the batch is split over.
  int ranks = 1;
  /// Images per rank per micro-batch.
  int micro_batch = 1;
  /// Micro-batches each rank accumulates per optimizer step.
  int micro_batches = 1;

  /// Images per rank per optimizer step.
  int rank_batch() const { return micro_batch * micro_batches; }
  /// "2 ranks x 2 micro-batches x 8 images = global batch 32".
  std::string Describe() const;
  bool operator==(const BatchPlan& other) const;
};

/// The plan for world_size ranks: train.grad_accum micro-batches, or, when dist.max_micro_batch
/// is set, the fewest micro-batches (at least train.grad_accum) that divide each rank's share
/// and keep every micro-batch within it. Throws ConfigError naming the key when world_size
/// cannot serve the config: dist.world_size asks for another size, or the batch does not split.
BatchPlan PlanBatch(const Config& config, int world_size);

/// Throws ConfigError unless plan is a valid split of config's batch over world_size ranks (a
/// plan made elsewhere, as the coordinator's placement).
void CheckBatchPlan(const Config& config, const BatchPlan& plan, int world_size);

}  // namespace ddpm
