// What the metrics cost: a rank recording one step (on the train loop's thread, every step),
// the coordinator taking one heartbeat with a rank's histograms (every interval, every rank),
// and one /metrics scrape of many active runs' per-rank series. Each is timed side by side with
// the budget it spends from: a train step, the heartbeat interval, the scrape interval.
// usage: ddpm_bench_metrics [--ranks N] [--runs R] [--step-ms MS]
#include "coordinator/metrics.h"

#include <prometheus/text_serializer.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "bench/stats.h"
#include "config/flags.h"
#include "coordinator/core.h"
#include "worker/rank_metrics.h"

namespace ddpm::bench {
namespace {

WorkerMetrics StepOf(int64_t step) {
  WorkerMetrics m;
  m.step = step;
  m.step_seconds = 0.001 * (step % 997);
  m.allreduce_seconds = 0.0001 * (step % 991);
  m.overlap_fraction = 0.9;
  return m;
}

int Run(const Flags& flags) {
  const int ranks = static_cast<int>(flags.GetInt("ranks"));
  const int runs = static_cast<int>(flags.GetInt("runs"));
  const double step_ms = flags.GetDouble("step-ms");
  constexpr double kHeartbeatSeconds = 5, kScrapeSeconds = 5;

  // 1. A rank records its step.
  RankRecorder recorder(0, "cpu", [] { return int64_t{1}; });
  recorder.SetRun("bench-1");
  constexpr int kSteps = 1000000;
  auto start = Clock::now();
  for (int i = 0; i < kSteps; ++i) recorder.RecordStep(StepOf(i));
  const double record_us = 1000 * Ms(start) / kSteps;
  std::printf("record one step (RankRecorder::RecordStep): %.3f us = %.5f%% of a %.0f ms step\n",
              record_us, 100 * record_us / (1000 * step_ms), step_ms);

  // 2. The coordinator takes heartbeats carrying a rank's histograms.
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("ddpm-bench-metrics-" + std::to_string(getpid()));
  std::filesystem::remove_all(dir);
  CoordinatorOptions options;
  options.data_dir = dir.string();
  FakeClock clock;
  Coordinator core(options, clock);
  const RankSnapshot snapshot = recorder.Snapshot();
  std::vector<std::string> run_ids;
  for (int r = 0; r < runs; ++r) {
    v1::StartRunRequest run;
    run.set_name("bench");
    run.set_config_yaml(
        "model: {ch: 16, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], "
        "image_size: 16, norm_groups: 8}\ntrain: {steps: 100, batch_size: " +
        std::to_string(ranks * 2) + "}\n");
    run_ids.push_back(core.StartRun(run).id());
    v1::RegisterRequest group;
    group.set_group_id("group-" + std::to_string(r));
    group.set_world_size(ranks);
    core.Register(group);
  }
  std::vector<v1::HeartbeatRequest> beats;
  for (int r = 0; r < runs; ++r) {
    const v1::Run run = core.GetRun(run_ids[r]);
    for (int rank = 0; rank < ranks; ++rank) {
      v1::HeartbeatRequest& beat = beats.emplace_back();
      beat.set_group_id(run.placement().group_id());
      beat.set_rank(rank);
      beat.set_run_id(run.id());
      beat.set_attempt(run.placement().attempt());
      beat.set_device_memory_bytes(1 << 30);
      *beat.mutable_rank_metrics() = snapshot.metrics;
      if (rank == 0) {
        beat.mutable_train_metrics()->set_step(10);
        for (int q = 0; q < 4; ++q) beat.mutable_train_metrics()->add_loss_by_quartile(0.1 * q);
      }
    }
  }
  for (const v1::HeartbeatRequest& beat : beats) core.Heartbeat(beat);  // all RUNNING now
  std::vector<double> rounds_ms;
  for (int round = 0; round < 5; ++round) {
    start = Clock::now();
    for (const v1::HeartbeatRequest& beat : beats) core.Heartbeat(beat);
    rounds_ms.push_back(Ms(start));
  }
  const double heartbeat_us = 1000 * Quantile(rounds_ms, 0.5) / beats.size();
  std::printf(
      "one heartbeat with histograms (%zu bytes): %.2f us; %d runs x %d ranks every %.0f s "
      "= %.4f%% of one coordinator core\n",
      beats[1].ByteSizeLong(), heartbeat_us, runs, ranks, kHeartbeatSeconds,
      100 * heartbeat_us * beats.size() / (1e6 * kHeartbeatSeconds));

  // 3. One scrape of every active run's per-rank series.
  CoordinatorCollector collector(core);
  std::vector<double> scrape_ms;
  size_t bytes = 0;
  for (int round = 0; round < 10; ++round) {
    start = Clock::now();
    bytes = prometheus::TextSerializer().Serialize(collector.Collect()).size();
    scrape_ms.push_back(Ms(start));
  }
  std::printf(
      "one /metrics scrape of %d runs x %d ranks: %.2f ms (p50 of 10), %.1f KiB = %.3f%% "
      "of one coordinator core at one scrape every %.0f s\n",
      runs, ranks, Quantile(scrape_ms, 0.5), bytes / 1024.0,
      100 * Quantile(scrape_ms, 0.5) / (1000 * kScrapeSeconds), kScrapeSeconds);
  std::filesystem::remove_all(dir);
  return 0;
}

}  // namespace
}  // namespace ddpm::bench

int main(int argc, char** argv) {
  ddpm::Flags flags("ddpm_bench_metrics",
                    "Times recording a step, taking a heartbeat and serving a /metrics scrape.");
  flags.Add("ranks", "ranks per run", "64");
  flags.Add("runs", "active runs in the scrape", "8");
  // The step it is compared with: the demo UNet's p50 step on this machine (2 ranks, batch 8).
  flags.Add("step-ms", "the train step the recording is compared with, in ms", "18");
  return ddpm::RunMain(flags, argc, argv, [&] { return ddpm::bench::Run(flags); });
}
