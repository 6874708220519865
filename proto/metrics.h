// Prometheus helpers shared by the coordinator's /metrics and each worker rank's: cumulative
// histograms that travel in heartbeats (v1::Histogram), and metric families built at scrape
// time. Torch-free.
#pragma once

#include <prometheus/metric_family.h>

#include <string>
#include <vector>

#include "ddpm/v1/run.pb.h"

namespace ddpm {

/// Bucket upper bounds, in seconds, of each histogram the ranks keep.
extern const std::vector<double> kStepSecondsBounds;
extern const std::vector<double> kAllReduceSecondsBounds;
extern const std::vector<double> kCheckpointStallSecondsBounds;
extern const std::vector<double> kCheckpointWriteSecondsBounds;

/// An empty cumulative histogram with these ascending upper bounds.
v1::Histogram NewHistogram(const std::vector<double>& upper_bounds);
/// Counts one observation in every bucket whose bound is >= value.
void Observe(v1::Histogram& histogram, double value);

using MetricLabels = std::vector<prometheus::ClientMetric::Label>;

/// A family of one type, to which Add* append series.
prometheus::MetricFamily MetricFamilyOf(prometheus::MetricType type, const std::string& name,
                                        const std::string& help);
/// Appends a gauge (or counter, by the family's type) series.
void AddValue(prometheus::MetricFamily& family, MetricLabels labels, double value);
/// Appends a histogram series, with the +Inf bucket.
void AddHistogram(prometheus::MetricFamily& family, MetricLabels labels,
                  const v1::Histogram& histogram);

}  // namespace ddpm
