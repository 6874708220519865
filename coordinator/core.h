// The coordinator's core: the run state machine, the scheduler over worker groups, heartbeats
// and recovery, over the SQLite registry. No gRPC here: the services translate messages and
// call it, and tests drive it directly with a FakeClock.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "config/config.h"
#include "coordinator/clock.h"
#include "coordinator/data_dir_lock.h"
#include "coordinator/registry.h"
#include "ddpm/v1/console.pb.h"
#include "ddpm/v1/control.pb.h"
#include "ddpm/v1/worker_gateway.pb.h"

namespace ddpm {

/// Why a request was refused, as the gRPC code the service will send.
enum class ErrorCode {
  kInvalidArgument,
  kNotFound,
  kAlreadyExists,
  kFailedPrecondition,
  kUnavailable,
};

/// A refused request; the message names the run, group, rank or config key.
class CoordinatorError : public std::runtime_error {
 public:
  CoordinatorError(ErrorCode code, const std::string& message)
      : std::runtime_error(message), code_(code) {}
  ErrorCode code() const { return code_; }

 private:
  ErrorCode code_;
};

/// How the coordinator runs.
struct CoordinatorOptions {
  /// Directory of the registry (registry.db) and the generated tokens.
  std::string data_dir = "coordinator-data";
  /// Directory under which each run gets its run directory; every group must see this path.
  /// Empty: DATA_DIR/runs.
  std::string runs_dir;
  /// Seconds between the heartbeats each rank sends.
  double heartbeat_interval_seconds = 5;
  /// Seconds without a heartbeat from a rank after which its group is declared lost.
  double heartbeat_timeout_seconds = 30;
  /// Seconds a group whose command stream closed (its process gone, its connection reset) has
  /// to open one again, or to register again, before it is declared lost.
  double stream_grace_seconds = 3;
  /// Restarts a run gets after lost groups, unless StartRun says otherwise.
  int default_max_restarts = 3;
  /// Ended runs (COMPLETED, STOPPED, FAILED for good) kept in the registry: at most this many,
  /// the newest (0: no limit), and none that ended longer than this many seconds ago (0: no
  /// limit). Pruned at start and every few seconds; their run directories stay.
  int64_t retain_ended_count = 0;
  double retain_ended_seconds = 0;
};

/// --retain-ended's value: a count of runs ("500") or an age with its unit ("30d", "12h", "90m",
/// "45s"), into options; throws std::invalid_argument naming the value.
void ParseRetainEnded(const std::string& value, CoordinatorOptions& options);

/// Restores a registry backup (ddpmctl backup) into data_dir while no coordinator holds it:
/// checks the file (InspectRegistryFile), keeps the current registry beside it as
/// registry.db.replaced-UNIXTIME, and puts the copy in its place; returns what it holds. Throws
/// DataDirInUse while a coordinator runs there, RegistryError naming a bad file.
RegistryFileSummary RestoreRegistry(const std::string& data_dir, const std::string& backup);

/// The indices of rows to draw at most max_points (>= 2) of them: all when they fit, else the
/// first and the last and, per bucket of consecutive rows between, the rows of the lowest and
/// the highest loss, in order, so that a spike or a minimum is never thinned away.
std::vector<size_t> ThinKeepingExtremes(const std::vector<v1::TrainMetrics>& rows,
                                        size_t max_points);

/// True for STOPPED, COMPLETED and FAILED.
bool IsFinal(v1::RunState state);

/// A live worker group, as the coordinator tracks it.
struct GroupStatus {
  std::string id;
  int world_size = 0;
  /// The run it holds, or empty.
  std::string run_id;
  /// Each rank's host, as the group registered it (may be empty).
  std::vector<std::string> hostnames;
  /// Seconds since each rank's last heartbeat.
  std::vector<double> heartbeat_age_seconds;
  /// Each rank's device ("cpu", "cuda:0") and the bytes in use on it at its last heartbeat.
  std::vector<std::string> devices;
  std::vector<int64_t> device_memory_bytes;
};

/// The coordinator. Thread-safe: every call takes one lock; the Wait* calls release it while
/// they wait.
class Coordinator {
 public:
  Coordinator(CoordinatorOptions options, const Clock& clock);
  ~Coordinator();

  // --- Control ---
  /// Validates and queues a run; CoordinatorError(kInvalidArgument) names the config key.
  v1::Run StartRun(const v1::StartRunRequest& request);
  /// Stops a run gracefully (STOPPING, then STOPPED when its group has checkpointed) or at once.
  v1::Run StopRun(const std::string& run, bool immediate);
  /// A run with its transitions; run is an id or a unique name.
  v1::Run GetRun(const std::string& run) const;
  /// Runs in submission order (without transitions), only those in state unless unspecified.
  std::vector<v1::Run> ListRuns(v1::RunState state) const;
  /// One page of runs (AIP-158): request.page_size (default kDefaultPageSize, clamped to
  /// kMaxPageSize with a notice) after request.page_token; kInvalidArgument names a garbled
  /// token or one from another query.
  v1::ListRunsResponse ListRunsPage(const v1::ListRunsRequest& request) const;
  static constexpr int kDefaultPageSize = 100;
  static constexpr int kMaxPageSize = 1000;
  /// Forgets a finished run.
  void DeleteRun(const std::string& run);
  /// Forgets every run that ended before ended_before_unix_ms; returns their ids, oldest first.
  std::vector<std::string> DeleteRunsEndedBefore(int64_t ended_before_unix_ms);
  /// Writes an online, consistent copy of the registry to path (a new file); returns the runs
  /// it holds.
  int64_t BackupRegistry(const std::string& path);
  /// Queues an evaluation job of a training run's checkpoints (a run of kind EVALUATION);
  /// CoordinatorError names the field or eval.* key at fault.
  v1::Run StartEval(const v1::StartEvalRequest& request);

  /// A run's log-interval rows after since_step, at most max_points of them (>= 2), thinned
  /// by ThinKeepingExtremes when there are more.
  v1::MetricHistory MetricHistory(const std::string& run, int64_t since_step, int max_points) const;
  /// A run's committed checkpoints and its evaluations as the registry recorded them, oldest
  /// first.
  std::vector<v1::CheckpointInfo> Checkpoints(const std::string& run) const;
  std::vector<v1::EvalResult> Evals(const std::string& run) const;
  /// Waits until anything about runs or groups changes after the change numbered seen (or
  /// until deadline, or shutdown); returns the current change number. For the console's
  /// event stream.
  uint64_t WaitForChange(uint64_t seen, std::chrono::steady_clock::time_point deadline) const;

  /// Where a WatchRun stream is in a run's history.
  struct WatchCursor {
    bool started = false;
    size_t transitions = 0;
    int64_t metrics_version = 0;
  };
  /// The events of run after cursor, waiting until there is one or until deadline; the cursor
  /// moves past them. done becomes true once the run has ended and every event is out.
  std::vector<v1::WatchRunEvent> WaitForRunEvents(const std::string& run_id, WatchCursor& cursor,
                                                  std::chrono::steady_clock::time_point deadline,
                                                  bool& done);

  // --- WorkerGateway ---
  /// Registers a group (or takes back one that trains a run after a coordinator restart).
  v1::RegisterResponse Register(const v1::RegisterRequest& request);
  /// The group's command once it differs from the one numbered *version (0: none sent yet),
  /// waiting until deadline; nullopt on timeout. Throws kNotFound for an unknown session.
  std::optional<v1::GroupCommand> WaitForCommand(const std::string& group_id,
                                                 const std::string& session, int64_t& version,
                                                 std::chrono::steady_clock::time_point deadline);
  /// A command stream of the group opened, or closed. A group whose last stream closed has
  /// stream_grace_seconds to open another (or to register again) before Tick declares it
  /// lost. OpenStream throws kNotFound for an unknown session; CloseStream ignores one.
  void OpenStream(const std::string& group_id, const std::string& session);
  void CloseStream(const std::string& group_id, const std::string& session);
  /// Records a rank's heartbeat and, from rank 0, the run's metrics.
  void Heartbeat(const v1::HeartbeatRequest& request);
  void ReportCheckpoint(const v1::ReportCheckpointRequest& request);
  void ReportEval(const v1::ReportEvalRequest& request);
  /// The run ended on its group: COMPLETED, STOPPED, or FAILED (and perhaps re-queued).
  void ReportRunEnd(const v1::ReportRunEndRequest& request);
  /// The group shuts down; a run it still holds fails as lost.
  void Leave(const v1::LeaveRequest& request);

  // --- Health and scheduling ---
  /// Declares groups whose heartbeats stopped lost (failing and re-queueing their runs), and
  /// assigns queued runs to idle groups. The server calls it every few hundred milliseconds.
  void Tick();
  /// Wakes every waiting stream so that it can end.
  void Shutdown();
  /// Whether the registry is open and takes a write (Registry::ProbeWritable); why not in
  /// error. For the gRPC health service.
  bool RegistryWritable(std::string* error);

  /// Live groups, for metrics.
  std::vector<GroupStatus> Groups() const;
  const CoordinatorOptions& options() const { return options_; }
  /// The absolute directory under which run directories go.
  const std::string& runs_dir() const { return runs_dir_; }

 private:
  struct Group {
    std::string id;
    std::string session;
    int world_size = 0;
    std::vector<std::string> hostnames, devices;
    std::string run_id;
    v1::GroupCommand command;
    int64_t version = 0;
    std::vector<int64_t> last_heartbeat_ms;
    std::vector<int64_t> device_memory_bytes;
    int64_t registered_seq = 0;
    /// Command streams open now, and when the last one closed (0: none has, or one is open).
    int open_streams = 0;
    int64_t stream_closed_ms = 0;
    /// Wakes this group's command streams alone (a cluster's thousand streams do not all wake
    /// at every change); shared, because a waiter may outlive the group.
    std::shared_ptr<std::condition_variable> command_changed =
        std::make_shared<std::condition_variable>();
  };
  struct RunEntry {
    int64_t seq = 0;
    v1::Run run;
    /// run.config_yaml parsed once: at StartRun, or when the registry is loaded.
    Config config;
    int64_t metrics_version = 0;
  };

  RunEntry& Find(const std::string& run);
  const RunEntry& Find(const std::string& run) const;
  Group& FindGroup(const std::string& group_id);
  /// The group, if it holds run_id in that attempt (0: any); else kNotFound or
  /// kFailedPrecondition naming what it holds.
  Group& GroupHolding(const std::string& group_id, const std::string& run_id, int attempt);
  /// Moves run to state, recording the transition (in memory and in the registry).
  void Transition(RunEntry& entry, v1::RunState to, const std::string& reason);
  /// Persists a run's record.
  void Save(const RunEntry& entry);
  /// Fails a run; re-queues it when may_restart and its restarts allow.
  void FailRun(RunEntry& entry, const std::string& reason, bool may_restart);
  /// Forgets a group and fails the run it held.
  void LoseGroup(const std::string& group_id, const std::string& reason);
  void SetCommand(Group& group, v1::GroupCommand command);
  /// What a group that holds run must do: TRAIN it, or EVALUATE for an evaluation job.
  v1::GroupCommand CommandFor(const v1::Run& run) const;
  /// Records a new QUEUED run (its id and directory assigned here) and schedules; under the lock.
  const v1::Run& Insert(v1::Run run, Config config);
  void Schedule();
  /// Counts a change and wakes every waiting stream; under the lock.
  void Changed();
  /// Records the run's current attempt in its directory (base/fence.h), if this process can.
  void FenceRunDir(const v1::Run& run) const;
  /// Forgets ids (ended runs) in one transaction, saying so in the log with why.
  void Forget(const std::vector<std::string>& ids, const std::string& why);
  /// Applies retain_ended_count and retain_ended_seconds; under the lock.
  void PruneEnded();

  const CoordinatorOptions options_;
  const Clock& clock_;
  std::string runs_dir_;
  /// Held for the core's life, before the registry opens and after it closes.
  std::unique_ptr<DataDirLock> lock_;
  mutable std::mutex mutex_;
  mutable std::condition_variable changed_;
  /// Counts changes (Changed), for WaitForChange.
  uint64_t change_ = 0;
  std::unique_ptr<Registry> registry_;
  std::map<std::string, RunEntry> runs_;
  std::map<std::string, Group> groups_;
  int64_t next_group_seq_ = 0;
  /// When this coordinator started: groups that held runs before a restart get until
  /// started_ms_ + heartbeat timeout to come back.
  int64_t started_ms_ = 0;
  /// When PruneEnded last ran.
  int64_t pruned_ms_ = 0;
  bool shutdown_ = false;
};

}  // namespace ddpm
