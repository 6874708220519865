// Metrics without a training run: the cumulative histograms that heartbeats carry, a rank's
// recorder and its own /metrics endpoint, and the coordinator's collector from heartbeats to
// series, and their removal when the run ends. Expected values are counted by hand.
#include "coordinator/metrics.h"

#include <gtest/gtest.h>
#include <prometheus/text_serializer.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <map>
#include <string>

#include "coordinator/core.h"
#include "proto/metrics.h"
#include "proto/rpc.h"
#include "tests/http_get.h"
#include "worker/rank_metrics.h"

namespace ddpm {
namespace {

namespace fs = std::filesystem;

TEST(Histogram, CountsEachObservationInEveryBucketAtOrAboveIt) {
  v1::Histogram histogram = NewHistogram({1, 2, 5});
  for (double value : {0.5, 1.0, 3.0, 7.0}) Observe(histogram, value);
  // <= 1: 0.5 and 1 (a bound includes itself); <= 2: the same; <= 5: and 3.
  EXPECT_EQ(std::vector<uint64_t>(histogram.cumulative_counts().begin(),
                                  histogram.cumulative_counts().end()),
            (std::vector<uint64_t>{2, 2, 3}));
  EXPECT_EQ(histogram.count(), 4u);
  EXPECT_DOUBLE_EQ(histogram.sum(), 11.5);

  prometheus::MetricFamily family =
      MetricFamilyOf(prometheus::MetricType::Histogram, "x_seconds", "help");
  AddHistogram(family, {{"run", "r"}}, histogram);
  const std::string text = prometheus::TextSerializer().Serialize({family});
  EXPECT_NE(text.find("x_seconds_bucket{run=\"r\",le=\"2\"} 2\n"), std::string::npos) << text;
  EXPECT_NE(text.find("x_seconds_bucket{run=\"r\",le=\"5\"} 3\n"), std::string::npos) << text;
  EXPECT_NE(text.find("x_seconds_bucket{run=\"r\",le=\"+Inf\"} 4\n"), std::string::npos) << text;
  EXPECT_NE(text.find("x_seconds_count{run=\"r\"} 4\n"), std::string::npos) << text;
  EXPECT_NE(text.find("x_seconds_sum{run=\"r\"} 11.5\n"), std::string::npos) << text;
}

TEST(RankMetrics, PortsAreTheBasePlusTheLocalRank) {
  EXPECT_EQ(OffsetListenAddress("127.0.0.1:9500", 0), "127.0.0.1:9500");
  EXPECT_EQ(OffsetListenAddress("0.0.0.0:9500", 3), "0.0.0.0:9503");
  EXPECT_EQ(OffsetListenAddress("[::1]:9000", 2), "[::1]:9002");
  EXPECT_EQ(OffsetListenAddress("127.0.0.1:0", 5), "127.0.0.1:0");  // any free port, each rank
  EXPECT_THROW(OffsetListenAddress("localhost", 1), std::invalid_argument);
  EXPECT_THROW(OffsetListenAddress("h:95x", 1), std::invalid_argument);
  EXPECT_THROW(OffsetListenAddress("h:65535", 1), std::invalid_argument);
}

WorkerMetrics StepOf(int64_t step, double step_seconds, double allreduce_seconds) {
  WorkerMetrics m;
  m.step = step;
  m.step_seconds = step_seconds;
  m.allreduce_seconds = allreduce_seconds;
  m.overlap_fraction = 0.75;
  return m;
}

TEST(RankMetrics, TheRecorderStartsAgainWithEachRunAndTheEndpointServesIt) {
  RankRecorder recorder(1, "cpu", [] { return int64_t{4096}; });
  RankMetricsEndpoint endpoint(recorder, "127.0.0.1:0");
  ASSERT_GT(endpoint.port(), 0);
  // Idle: only the device memory.
  std::string page = HttpGet(endpoint.port(), "/metrics");
  EXPECT_EQ(page.rfind("HTTP/1.1 200 OK", 0), 0u) << page;
  EXPECT_NE(page.find("ddpm_rank_device_memory_bytes{rank=\"1\",device=\"cpu\"} 4096"),
            std::string::npos)
      << page;
  EXPECT_EQ(page.find("ddpm_rank_step"), std::string::npos) << page;

  recorder.SetRun("a-1");
  recorder.RecordStep(StepOf(1, 0.02, 0.0007));  // step buckets from 0.025; all-reduce 0.001
  recorder.RecordStep(StepOf(2, 0.3, 0.004));    // 0.5; 0.005
  RankSnapshot snapshot = recorder.Snapshot();
  EXPECT_EQ(snapshot.run_id, "a-1");
  EXPECT_TRUE(snapshot.has_step);
  EXPECT_EQ(snapshot.metrics.step(), 2);
  EXPECT_EQ(snapshot.metrics.step_seconds_histogram().count(), 2u);
  EXPECT_DOUBLE_EQ(snapshot.metrics.step_seconds_histogram().sum(), 0.32);
  page = HttpGet(endpoint.port(), "/metrics");
  EXPECT_NE(page.find("ddpm_rank_step{run=\"a-1\",rank=\"1\"} 2"), std::string::npos) << page;
  EXPECT_NE(page.find("ddpm_rank_step_seconds_bucket{run=\"a-1\",rank=\"1\",le=\"0.01\"} 0"),
            std::string::npos);
  EXPECT_NE(page.find("ddpm_rank_step_seconds_bucket{run=\"a-1\",rank=\"1\",le=\"0.025\"} 1"),
            std::string::npos);
  EXPECT_NE(page.find("ddpm_rank_step_seconds_bucket{run=\"a-1\",rank=\"1\",le=\"0.5\"} 2"),
            std::string::npos);
  EXPECT_NE(page.find("ddpm_rank_allreduce_seconds_bucket{run=\"a-1\",rank=\"1\",le=\"0.001\"} 1"),
            std::string::npos);
  EXPECT_NE(page.find("ddpm_rank_allreduce_seconds_bucket{run=\"a-1\",rank=\"1\",le=\"0.0025\"} 1"),
            std::string::npos);
  EXPECT_NE(page.find("ddpm_rank_allreduce_seconds_bucket{run=\"a-1\",rank=\"1\",le=\"0.005\"} 2"),
            std::string::npos);

  recorder.SetRun("b-2");  // A new run: nothing of a-1, and no step yet.
  snapshot = recorder.Snapshot();
  EXPECT_FALSE(snapshot.has_step);
  EXPECT_EQ(snapshot.metrics.step_seconds_histogram().count(), 0u);
  page = HttpGet(endpoint.port(), "/metrics");
  EXPECT_EQ(page.find("a-1"), std::string::npos) << page;
  EXPECT_EQ(HttpGet(endpoint.port(), "/other").rfind("HTTP/1.1 404", 0), 0u);
}

TEST(RankMetrics, AnAddressInUseIsNamed) {
  RankRecorder recorder(0, "cpu", nullptr);
  RankMetricsEndpoint first(recorder, "127.0.0.1:0");
  const std::string taken = "127.0.0.1:" + std::to_string(first.port());
  try {
    RankMetricsEndpoint second(recorder, taken);
    FAIL() << "a second endpoint bound " << taken;
  } catch (const RpcSetupError& error) {
    EXPECT_NE(std::string(error.what()).find("rank 0: cannot serve /metrics on " + taken),
              std::string::npos)
        << error.what();
  }
}

// The coordinator's collector, as a map from "name{labels}" to value.
std::map<std::string, double> Scrape(const Coordinator& core) {
  std::map<std::string, double> values;
  for (const prometheus::MetricFamily& family : CoordinatorCollector(core).Collect()) {
    for (const prometheus::ClientMetric& metric : family.metric) {
      std::string key = family.name + "{";
      for (const auto& label : metric.label) key += label.name + "=" + label.value + ",";
      key += "}";
      if (family.type == prometheus::MetricType::Histogram) {
        values[key + "count"] = static_cast<double>(metric.histogram.sample_count);
        values[key + "sum"] = metric.histogram.sample_sum;
        for (const auto& bucket : metric.histogram.bucket) {
          values[key + "le=" + std::to_string(bucket.upper_bound)] =
              static_cast<double>(bucket.cumulative_count);
        }
      } else {
        values[key] = family.type == prometheus::MetricType::Counter ? metric.counter.value
                                                                     : metric.gauge.value;
      }
    }
  }
  return values;
}

TEST(CoordinatorMetrics, HeartbeatsBecomeSeriesThatEndWithTheRun) {
  const fs::path dir = fs::temp_directory_path() / ("ddpm-metrics-" + std::to_string(getpid()));
  fs::remove_all(dir);
  CoordinatorOptions options;
  options.data_dir = dir.string();
  FakeClock clock;
  Coordinator core(options, clock);
  v1::StartRunRequest start;
  start.set_name("m");
  start.set_config_yaml(
      "model: {ch: 16, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], image_size: "
      "16, norm_groups: 8}\ntrain: {steps: 100, batch_size: 8}\n");
  core.StartRun(start);
  v1::RegisterRequest group;
  group.set_group_id("g");
  group.set_world_size(2);
  group.add_devices("cpu");
  group.add_devices("cpu");
  core.Register(group);
  const int attempt = core.GetRun("m-1").placement().attempt();

  for (int rank = 0; rank < 2; ++rank) {
    RankRecorder recorder(rank, "cpu", [rank] { return int64_t{1000 + rank}; });
    recorder.SetRun("m-1");
    recorder.RecordStep(StepOf(5, 0.04, 0.002));
    if (rank == 0) recorder.RecordCheckpoint({5, "/ckpt", 0.03, 2.0});
    const RankSnapshot snapshot = recorder.Snapshot();
    v1::HeartbeatRequest beat;
    beat.set_group_id("g");
    beat.set_rank(rank);
    beat.set_run_id("m-1");
    beat.set_attempt(attempt);
    beat.set_device_memory_bytes(snapshot.device_memory_bytes);
    *beat.mutable_rank_metrics() = snapshot.metrics;
    if (rank == 0) {
      v1::TrainMetrics& train = *beat.mutable_train_metrics();
      train.set_step(5);
      train.set_loss(0.25);
      train.set_lr(2e-4);
      train.set_grad_norm(1.5);
      train.set_images_per_second(80);
      for (double loss : {0.5, 0.25, std::numeric_limits<double>::quiet_NaN(), 0.125}) {
        train.add_loss_by_quartile(loss);
      }
      train.set_rollbacks(2);
      train.set_checkpoint_failures(1);
    }
    core.Heartbeat(beat);
  }
  std::map<std::string, double> values = Scrape(core);
  EXPECT_EQ(values["ddpm_run_state{run=m-1,}"], v1::RUNNING);
  EXPECT_EQ(values["ddpm_runs{state=RUNNING,}"], 1);
  EXPECT_EQ(values["ddpm_train_loss{run=m-1,}"], 0.25);
  EXPECT_EQ(values["ddpm_train_rollbacks_total{run=m-1,}"], 2);
  EXPECT_EQ(values["ddpm_checkpoint_failures_total{run=m-1,}"], 1);
  EXPECT_EQ(values["ddpm_train_learning_rate{run=m-1,}"], 2e-4);
  EXPECT_EQ(values["ddpm_train_loss_by_timestep_quartile{run=m-1,quartile=q0,}"], 0.5);
  EXPECT_EQ(values["ddpm_train_loss_by_timestep_quartile{run=m-1,quartile=q3,}"], 0.125);
  // A quarter without samples has no value rather than NaN.
  EXPECT_EQ(values.count("ddpm_train_loss_by_timestep_quartile{run=m-1,quartile=q2,}"), 0u);
  for (const std::string rank : {"0", "1"}) {
    const std::string key = "ddpm_allreduce_seconds{run=m-1,rank=" + rank + ",}";
    EXPECT_EQ(values[key + "count"], 1);
    EXPECT_EQ(values[key + "le=" + std::to_string(0.001)], 0);
    EXPECT_EQ(values[key + "le=" + std::to_string(0.0025)], 1);
    EXPECT_EQ(values["ddpm_allreduce_overlap_ratio{run=m-1,rank=" + rank + ",}"], 0.75);
    EXPECT_EQ(values["ddpm_device_memory_bytes{group=g,rank=" + rank + ",device=cpu,}"],
              1000 + std::stoi(rank));
    EXPECT_EQ(values["ddpm_worker_up{group=g,rank=" + rank + ",}"], 1);
  }
  EXPECT_EQ(values["ddpm_checkpoint_stall_seconds{run=m-1,}count"], 1);
  EXPECT_EQ(values["ddpm_checkpoint_stall_seconds{run=m-1,}le=" + std::to_string(0.025)], 0);
  EXPECT_EQ(values["ddpm_checkpoint_stall_seconds{run=m-1,}le=" + std::to_string(0.05)], 1);
  EXPECT_EQ(values["ddpm_checkpoint_write_seconds{run=m-1,}sum"], 2.0);

  v1::ReportRunEndRequest end;
  end.set_group_id("g");
  end.set_run_id("m-1");
  end.set_attempt(attempt);
  end.set_outcome(v1::ReportRunEndRequest::COMPLETED);
  end.set_step(100);
  core.ReportRunEnd(end);
  values = Scrape(core);
  EXPECT_EQ(values["ddpm_run_state{run=m-1,}"], v1::COMPLETED);
  EXPECT_EQ(values["ddpm_runs{state=COMPLETED,}"], 1);
  // The state and the counters of the run's life stay; its training series go.
  for (const auto& [key, value] : values) {
    if (key.find("run=m-1") == std::string::npos) continue;
    EXPECT_TRUE(key.rfind("ddpm_run_state{", 0) == 0 || key.rfind("ddpm_run_restarts{", 0) == 0 ||
                key.rfind("ddpm_train_rollbacks_total{", 0) == 0 ||
                key.rfind("ddpm_checkpoint_failures_total{", 0) == 0)
        << key << " outlived the run";
  }
  EXPECT_EQ(values["ddpm_train_rollbacks_total{run=m-1,}"], 2);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace ddpm
