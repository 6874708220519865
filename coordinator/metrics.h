// The coordinator's Prometheus series, collected from the core at each scrape, so that a
// finished run's training series disappear with it.
#pragma once

#include <prometheus/collectable.h>

#include <vector>

#include "coordinator/core.h"

namespace ddpm {

/// Series with a `run` label for runs and `group`, `rank` labels for workers.
class CoordinatorCollector : public prometheus::Collectable {
 public:
  explicit CoordinatorCollector(const Coordinator& core) : core_(core) {}
  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  const Coordinator& core_;
};

}  // namespace ddpm
