#include "config/batch_plan.h"

namespace ddpm {
namespace {

[[noreturn]] void Refuse(const std::string& key, const std::string& what) {
  throw ConfigError("config: " + key + ": " + what);
}

void CheckWorldSize(const Config& config, int world_size) {
  if (world_size < 1) {
    Refuse("world size", "must be at least 1, got " + std::to_string(world_size));
  }
  if (config.dist.world_size != 0 && config.dist.world_size != world_size) {
    Refuse("dist.world_size", "asks for " + std::to_string(config.dist.world_size) +
                                  " ranks, but this run has " + std::to_string(world_size));
  }
}

[[noreturn]] void RefuseSplit(const Config& config, int world_size) {
  const int split = world_size * config.train.grad_accum;
  Refuse("train.batch_size",
         std::to_string(config.train.batch_size) + " does not divide into world size " +
             std::to_string(world_size) + " x train.grad_accum " +
             std::to_string(config.train.grad_accum) + " = " + std::to_string(split) +
             " equal micro-batches; choose a batch_size that is a multiple of " +
             std::to_string(split));
}

}  // namespace

std::string BatchPlan::Describe() const {
  return std::to_string(ranks) + (ranks == 1 ? " rank x " : " ranks x ") +
         std::to_string(micro_batches) +
         (micro_batches == 1 ? " micro-batch x " : " micro-batches x ") +
         std::to_string(micro_batch) + " images = global batch " + std::to_string(global_batch);
}

bool BatchPlan::operator==(const BatchPlan& other) const {
  return global_batch == other.global_batch && ranks == other.ranks &&
         micro_batch == other.micro_batch && micro_batches == other.micro_batches;
}

BatchPlan PlanBatch(const Config& config, int world_size) {
  CheckWorldSize(config, world_size);
  const int global = config.train.batch_size;
  const int asked = config.train.grad_accum;
  if (global < 1 || asked < 1 || global % world_size != 0) RefuseSplit(config, world_size);
  const int rank_batch = global / world_size;
  const int limit = config.dist.max_micro_batch;
  int micro_batches = asked;
  if (limit > 0) {
    // The fewest equal micro-batches, no fewer than asked, within the limit; one image each
    // always qualifies.
    while (micro_batches <= rank_batch &&
           (rank_batch % micro_batches != 0 || rank_batch / micro_batches > limit)) {
      ++micro_batches;
    }
  }
  if (micro_batches > rank_batch || rank_batch % micro_batches != 0) {
    RefuseSplit(config, world_size);
  }
  return BatchPlan{global, world_size, rank_batch / micro_batches, micro_batches};
}

void CheckBatchPlan(const Config& config, const BatchPlan& plan, int world_size) {
  CheckWorldSize(config, world_size);
  if (plan.ranks != world_size || plan.global_batch != config.train.batch_size ||
      plan.micro_batch < 1 || plan.micro_batches < 1 ||
      plan.ranks * plan.rank_batch() != plan.global_batch) {
    Refuse("train.batch_size", "the placement's split (" + plan.Describe() +
                                   ") is not one of train.batch_size " +
                                   std::to_string(config.train.batch_size) + " over " +
                                   std::to_string(world_size) + " ranks");
  }
}

}  // namespace ddpm
