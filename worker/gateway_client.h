// A worker group's side of the WorkerGateway: rank 0's registration and command stream, and
// every rank's heartbeats. Torch-free.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "ddpm/v1/worker_gateway.grpc.pb.h"
#include "proto/rpc.h"
#include "run/run.h"
#include "worker/rank_metrics.h"

namespace ddpm {

/// How a rank reaches the coordinator.
struct GatewayOptions {
  ChannelOptions channel;
  /// The worker token.
  std::string token;
  /// Seconds a unary call may take.
  double rpc_timeout_seconds = 10;
};

/// Unary WorkerGateway calls with the token and a deadline. Thread-safe.
class GatewayClient {
 public:
  explicit GatewayClient(const GatewayOptions& options);
  grpc::Status Register(const v1::RegisterRequest& request, v1::RegisterResponse* response);
  grpc::Status Heartbeat(const v1::HeartbeatRequest& request);
  grpc::Status ReportCheckpoint(const v1::ReportCheckpointRequest& request);
  grpc::Status ReportEval(const v1::ReportEvalRequest& request);
  grpc::Status ReportRunEnd(const v1::ReportRunEndRequest& request);
  grpc::Status Leave(const v1::LeaveRequest& request);
  /// The current stub; keep the pointer for the length of a call.
  std::shared_ptr<v1::WorkerGateway::Stub> stub() const;
  std::unique_ptr<grpc::ClientContext> StreamContext() const { return MakeContext(options_.token); }
  /// Replaces the channel with a new one. A channel whose server went away retries on its own
  /// backoff schedule, which can leave it failing for seconds after a restarted coordinator is
  /// back; a fresh channel connects at once.
  void Reconnect();

 private:
  std::unique_ptr<grpc::ClientContext> Context() const;
  /// Reconnects after a call that could not reach the coordinator.
  grpc::Status Checked(const grpc::Status& status);

  GatewayOptions options_;
  mutable std::mutex mutex_;
  std::shared_ptr<v1::WorkerGateway::Stub> stub_;
};

/// Rank 0's link to the coordinator: registers the group (again after a coordinator restart,
/// naming the run it trains) and keeps the command stream open, reconnecting with backoff.
class CommandChannel {
 public:
  CommandChannel(GatewayClient& client, v1::RegisterRequest registration);
  ~CommandChannel();
  /// Registers, retrying while the coordinator is unreachable; returns false (see fatal()) if it
  /// refuses the group, or if stop_waiting becomes true first. Then starts the stream thread.
  bool Start(const std::atomic<bool>& stop_waiting);
  /// The newest command and its number (0 before the first).
  v1::GroupCommand Latest(int64_t* version = nullptr) const;
  /// Waits until the command numbered after seen arrives, a fatal error, or timeout.
  void WaitForChange(int64_t seen, std::chrono::milliseconds timeout) const;
  /// The run this group trains, for a re-registration (empty when idle).
  void SetCurrentRun(const std::string& run_id, int64_t step);
  /// A reason the group cannot go on (refused registration, rejected token), or empty.
  std::string fatal() const;
  /// Seconds between heartbeats, as the coordinator asked.
  double heartbeat_interval_seconds() const { return heartbeat_interval_; }
  /// Ends the stream and its thread.
  void Stop();

 private:
  /// One Register call; true when registered. Sets fatal_ when refused for good.
  bool RegisterOnce(bool& unreachable_reported);
  void Run();

  GatewayClient& client_;
  const v1::RegisterRequest registration_;
  mutable std::mutex mutex_;
  mutable std::condition_variable changed_;
  std::string session_;
  v1::GroupCommand latest_;
  int64_t version_ = 0;
  std::string current_run_;
  int64_t current_step_ = 0;
  std::string fatal_;
  double heartbeat_interval_ = 5;
  bool stop_ = false;
  std::unique_ptr<grpc::ClientContext> stream_context_;
  std::thread thread_;
};

/// How the ranks of a group reach rank 0 for the group's one heartbeat: messages to rank 0 on a
/// communicator of their own, beside training's collectives and never waiting on them.
class RankLink {
 public:
  virtual ~RankLink() = default;
  /// Ranks above 0: sends report to rank 0 without waiting. False, and report dropped, while
  /// the previous one has not left (rank 0 stopped, or not receiving).
  virtual bool Post(const std::string& report) = 0;
  /// Rank 0: every report that has arrived since the last call, as (rank, bytes), in order.
  virtual std::vector<std::pair<int, std::string>> Collect() = 0;
};

/// A group's heartbeats. Without a link, each rank sends its own to the coordinator. With one,
/// the ranks above 0 post their reports to rank 0 every interval, and rank 0 sends one
/// heartbeat for the group with the newest report of each (HeartbeatRequest.peers, with its
/// age): a thousand 8-rank groups make a thousand heartbeats, not eight thousand. Rank 0 sends
/// every interval, and at once when it has new train metrics. Each carries the recorder's
/// measurements of the run.
class Heartbeater {
 public:
  Heartbeater(GatewayClient& client, std::string group_id, const RankRecorder& recorder,
              double interval_seconds, RankLink* link = nullptr);
  ~Heartbeater();
  /// The run (and placement attempt) this rank now trains; empty when idle. Clears the metrics
  /// of the last one.
  void SetRun(const std::string& run_id, int attempt = 0);
  /// Rank 0's log interval; sent at once.
  void PushTrainMetrics(const LogMetrics& metrics);
  /// Rank 0's newest sample grid.
  void SetSampleGrid(const std::string& path);
  /// Sends a heartbeat now (the run's first step: the coordinator shows it RUNNING at once).
  void Poke();
  /// Seconds since rank 0 last heard from each rank (rank 0 itself: 0; never heard: -1).
  std::vector<double> PeerAges() const;

 private:
  void Run();
  /// This rank's report to rank 0 (ranks above 0, with a link).
  v1::PeerReport Report(const v1::HeartbeatRequest& pending) const;
  /// Rank 0: takes in what the link has delivered.
  void CollectPeers();
  /// Rank 0: the newest report of every rank heard from, with its age.
  void AddPeers(v1::HeartbeatRequest& request) const;

  GatewayClient& client_;
  const std::string group_id_;
  const RankRecorder& recorder_;
  const int rank_;
  const std::chrono::milliseconds interval_;
  RankLink* const link_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  v1::HeartbeatRequest pending_;
  /// Rank 0 with a link: each peer's newest report and when it arrived.
  std::map<int, std::pair<v1::PeerReport, std::chrono::steady_clock::time_point>> peers_;
  bool poke_ = false;
  bool stop_ = false;
  std::thread thread_;
};

/// Rank 0's reports of a run (committed checkpoints and evaluation results), sent on a thread of
/// their own: neither training, nor the checkpoint writer, nor an evaluation waits on a
/// coordinator that is away (restarting, or out of reach). Every evaluation result is sent, in
/// the order posted; of checkpoints only the newest matters, so one still unsent (or being
/// retried) when a newer one comes is dropped. A report is retried while the coordinator is
/// unreachable or does not know the group yet (a restarted coordinator, before the group
/// registers again), for at most patience; the coordinator refusing it (the run taken away)
/// ends it.
class RunReporter {
 public:
  RunReporter(GatewayClient& client, std::chrono::seconds patience);
  /// Waits for what is in flight and pending (see Flush, 10 s), then stops.
  ~RunReporter();
  RunReporter(const RunReporter&) = delete;
  RunReporter& operator=(const RunReporter&) = delete;
  /// Queues request in place of any unsent checkpoint report; returns at once.
  void Post(v1::ReportCheckpointRequest request);
  /// Queues request after the evaluation results not yet sent; returns at once.
  void Post(v1::ReportEvalRequest request);
  /// Waits until nothing is pending or in flight, for at most timeout; false on timeout.
  bool Flush(std::chrono::milliseconds timeout);
  /// How many checkpoint reports, and how many evaluation results, the coordinator accepted.
  int64_t accepted_checkpoints() const;
  int64_t accepted_evals() const;

 private:
  void Run();
  // Sends one report (ReportWithRetry) until it is accepted, refused, superseded (superseded()
  // true, asked under mutex_), stopped or out of patience. Called and returns with mutex_ held
  // through lock, which it releases while it sends and waits.
  grpc::Status Send(std::unique_lock<std::mutex>& lock, const std::function<grpc::Status()>& call,
                    const std::function<bool()>& superseded);

  GatewayClient& client_;
  const std::chrono::seconds patience_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::optional<v1::ReportCheckpointRequest> checkpoint_;
  std::deque<v1::ReportEvalRequest> evals_;
  bool busy_ = false;
  bool stop_ = false;
  int64_t accepted_checkpoints_ = 0;
  int64_t accepted_evals_ = 0;
  std::thread thread_;
};

/// Sends a report until the coordinator takes or refuses it, for at most patience: it is sent
/// again, after 250 ms doubling to 4 s, while the coordinator is unreachable or does not know the
/// group (NOT_FOUND: restarted, before the group has registered again, naming its run). wait
/// sleeps between tries and returns false to give up early; the default sleeps. Returns the last
/// status. For reports that must not be lost across a coordinator restart.
grpc::Status ReportWithRetry(
    const std::function<grpc::Status()>& call, std::chrono::seconds patience,
    const std::function<bool(std::chrono::milliseconds)>& wait =
        [](std::chrono::milliseconds pause) {
          std::this_thread::sleep_for(pause);
          return true;
        });

}  // namespace ddpm
