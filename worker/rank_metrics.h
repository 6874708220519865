// One rank's own measurements: cumulative histograms of its steps, all-reduces and (rank 0)
// checkpoints, and its device memory. The heartbeats carry them to the coordinator, and a rank
// may also serve them on its own /metrics endpoint. Torch-free.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "ddpm/v1/run.pb.h"
#include "run/run.h"

namespace prometheus {
class Collectable;
}  // namespace prometheus

namespace ddpm {

/// What a RankRecorder holds at one moment.
struct RankSnapshot {
  /// The run being trained, or empty when idle.
  std::string run_id;
  /// Whether a step of the run has been recorded yet.
  bool has_step = false;
  /// The last step's values and this attempt's histograms.
  v1::RankMetrics metrics;
  /// Bytes in use on the rank's device.
  int64_t device_memory_bytes = 0;
};

/// This rank's measurements of the run it trains. Thread-safe: the train loop records, the
/// heartbeat thread and /metrics scrapes read.
class RankRecorder {
 public:
  /// memory_probe returns the bytes in use on device; it is called at each read.
  RankRecorder(int rank, std::string device, std::function<int64_t()> memory_probe);
  /// Starts a run (or, with an empty id, goes idle): the histograms start again from zero.
  void SetRun(const std::string& run_id);
  /// One finished step of the run.
  void RecordStep(const WorkerMetrics& metrics);
  /// Rank 0: one committed checkpoint.
  void RecordCheckpoint(const CommittedCheckpoint& checkpoint);
  /// An evaluation job's progress: count (images) stands as the step; no step timings.
  void RecordProgress(int64_t count);
  RankSnapshot Snapshot() const;
  int rank() const { return rank_; }
  const std::string& device() const { return device_; }

 private:
  const int rank_;
  const std::string device_;
  const std::function<int64_t()> memory_probe_;
  mutable std::mutex mutex_;
  std::string run_id_;
  bool has_step_ = false;
  v1::RankMetrics metrics_;
};

/// Bytes in use on the CPU by this process: its resident set size (0 if /proc is missing).
int64_t ResidentMemoryBytes();

/// "HOST:PORT" with PORT + offset: a rank's own /metrics address from the group's base address.
/// Throws std::invalid_argument naming listen when it is not HOST:PORT.
std::string OffsetListenAddress(const std::string& listen, int offset);

/// A rank's own Prometheus endpoint over its recorder: ddpm_rank_step,
/// ddpm_rank_step_seconds and ddpm_rank_allreduce_seconds (histograms), each labelled run and
/// rank, and ddpm_rank_device_memory_bytes{rank, device}. A finished run's series go with it.
///
/// It answers GET /metrics from one thread of its own rather than through prometheus-cpp's
/// civetweb Exposer: civetweb starts its threads with a fixed 100 KiB stack, which the static
/// TLS of LibTorch and OpenBLAS in a worker process does not fit, so pthread_create fails.
class RankMetricsEndpoint {
 public:
  /// Serves on listen (HOST:PORT, port 0 for any); throws RpcSetupError naming the address
  /// when it cannot.
  RankMetricsEndpoint(const RankRecorder& recorder, const std::string& listen);
  ~RankMetricsEndpoint();
  RankMetricsEndpoint(const RankMetricsEndpoint&) = delete;
  RankMetricsEndpoint& operator=(const RankMetricsEndpoint&) = delete;
  /// The port bound.
  int port() const { return port_; }

 private:
  void Serve();

  std::shared_ptr<prometheus::Collectable> collector_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace ddpm
