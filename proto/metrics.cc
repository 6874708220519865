#include "proto/metrics.h"

#include <algorithm>
#include <limits>

namespace ddpm {

const std::vector<double> kStepSecondsBounds = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                1,     2.5,  5,     10,   30,  60};
const std::vector<double> kAllReduceSecondsBounds = {
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5};
const std::vector<double> kCheckpointStallSecondsBounds = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                           0.5,   1,    2.5,   5,    10,  30};
const std::vector<double> kCheckpointWriteSecondsBounds = {0.05, 0.1, 0.25, 0.5, 1,   2.5,
                                                           5,    10,  30,   60,  120, 300};

v1::Histogram NewHistogram(const std::vector<double>& upper_bounds) {
  v1::Histogram histogram;
  for (double bound : upper_bounds) {
    histogram.add_upper_bounds(bound);
    histogram.add_cumulative_counts(0);
  }
  return histogram;
}

void Observe(v1::Histogram& histogram, double value) {
  for (int i = 0; i < histogram.upper_bounds_size(); ++i) {
    if (value <= histogram.upper_bounds(i)) {
      histogram.set_cumulative_counts(i, histogram.cumulative_counts(i) + 1);
    }
  }
  histogram.set_count(histogram.count() + 1);
  histogram.set_sum(histogram.sum() + value);
}

prometheus::MetricFamily MetricFamilyOf(prometheus::MetricType type, const std::string& name,
                                        const std::string& help) {
  prometheus::MetricFamily family;
  family.name = name;
  family.help = help;
  family.type = type;
  return family;
}

void AddValue(prometheus::MetricFamily& family, MetricLabels labels, double value) {
  prometheus::ClientMetric& metric = family.metric.emplace_back();
  metric.label = std::move(labels);
  if (family.type == prometheus::MetricType::Counter) {
    metric.counter.value = value;
  } else {
    metric.gauge.value = value;
  }
}

void AddHistogram(prometheus::MetricFamily& family, MetricLabels labels,
                  const v1::Histogram& histogram) {
  prometheus::ClientMetric& metric = family.metric.emplace_back();
  metric.label = std::move(labels);
  metric.histogram.sample_count = histogram.count();
  metric.histogram.sample_sum = histogram.sum();
  const int buckets = std::min(histogram.upper_bounds_size(), histogram.cumulative_counts_size());
  for (int i = 0; i < buckets; ++i) {
    metric.histogram.bucket.push_back({histogram.cumulative_counts(i), histogram.upper_bounds(i)});
  }
  metric.histogram.bucket.push_back({histogram.count(), std::numeric_limits<double>::infinity()});
}

}  // namespace ddpm
