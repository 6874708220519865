// A run's placement on a group and its BatchPlan: the one conversion between the wire's
// Placement and config/'s split of the batch, for the coordinator that places, the worker that
// trains and ddpmctl that shows it.
#pragma once

#include <string>

#include "config/batch_plan.h"
#include "ddpm/v1/run.pb.h"

namespace ddpm {

/// Writes plan's ranks, micro-batch and micro-batches into placement.
void SetPlacementPlan(const BatchPlan& plan, v1::Placement& placement);
/// The BatchPlan a placement carries (its global batch the product of the split; a worker
/// checks it against the config's train.batch_size).
BatchPlan PlacementPlan(const v1::Placement& placement);
/// "2 ranks x 2 micro-batches x 8 images = global batch 32", with why micro_batches differs
/// from the config's train.grad_accum when it does.
std::string DescribePlacementPlan(const v1::Placement& placement);

}  // namespace ddpm
