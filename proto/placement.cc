#include "proto/placement.h"

namespace ddpm {

void SetPlacementPlan(const BatchPlan& plan, v1::Placement& placement) {
  placement.set_world_size(plan.ranks);
  placement.set_micro_batch(plan.micro_batch);
  placement.set_micro_batches(plan.micro_batches);
}

BatchPlan PlacementPlan(const v1::Placement& placement) {
  BatchPlan plan;
  plan.ranks = placement.world_size();
  plan.micro_batch = placement.micro_batch();
  plan.micro_batches = placement.micro_batches();
  plan.global_batch = plan.ranks * plan.micro_batches * plan.micro_batch;
  return plan;
}

std::string DescribePlacementPlan(const v1::Placement& placement) {
  std::string text = PlacementPlan(placement).Describe();
  const int requested = placement.requested_micro_batches();
  if (requested > 0 && requested != placement.micro_batches()) {
    text += " (the config's train.grad_accum " + std::to_string(requested) +
            ", raised to keep each micro-batch within dist.max_micro_batch)";
  }
  return text;
}

}  // namespace ddpm
