// The coordinator's Prometheus series: the runs' and workers' (collected from the core at each
// scrape, so that a finished run's series disappear with it) and the gRPC requests served.
#pragma once

#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <memory>
#include <string>
#include <vector>

#include "coordinator/core.h"

namespace ddpm {

/// Series labelled `run` for the active runs (`run, rank` for per-rank ones) and `group, rank`
/// for the live workers' ranks.
class CoordinatorCollector : public prometheus::Collectable {
 public:
  explicit CoordinatorCollector(const Coordinator& core) : core_(core) {}
  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  const Coordinator& core_;
};

/// ddpm_grpc_requests_total{method, code} and ddpm_grpc_request_duration_seconds{method}.
/// Thread-safe.
class RpcMetrics {
 public:
  RpcMetrics();
  /// Counts one finished call of method ("Control/StartRun"); seconds are recorded for unary
  /// calls only (pass a negative value for a stream).
  void Record(const std::string& method, const std::string& code, double seconds);
  /// The registry to expose.
  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Histogram>& durations_;
};

}  // namespace ddpm
