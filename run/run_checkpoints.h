// A training run's checkpoints: the writer of its sharded checkpoints and the one of its
// post-hoc EMA snapshots, the attempt's fence that guards every write into the run directory,
// the checkpoints that failed to write, and eval.select's `best`.
#pragma once

#include <torch/torch.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "base/fence.h"
#include "config/config.h"
#include "run/best_checkpoint.h"
#include "run/run.h"
#include "run/run_control.h"
#include "run/run_log.h"
#include "trainer/checkpoint.h"
#include "trainer/communicator.h"

namespace ddpm {

/// The step of a checkpoint directory's path (…/step_000000040), or -1.
int64_t StepOfCheckpointPath(const std::string& path);

/// What DDPM_FAULT_DISK_FULL makes a write fail with.
std::string InjectedDiskFull();

/// One rank's side of a run's checkpoints, kept as torchtitan's CheckpointManager keeps them:
/// every rank writes its shard in the background, rank 0 commits, and once a newer attempt
/// holds the run directory its fence refuses whatever this attempt would still write. Used from
/// the training thread; only rank 0's writer thread calls TrainOptions::on_checkpoint.
class RunCheckpoints {
 public:
  /// An incident in words (a checkpoint or a snapshot that failed) and whether the run reports
  /// it at once (a checkpoint) or with its next log line (a snapshot).
  using IncidentHook = std::function<void(const std::string& text, bool report_now)>;

  RunCheckpoints(const Config& config, const TrainOptions& options, const RunConsole& console,
                 Communicator& comm, const FaultInjection& fault);
  ~RunCheckpoints();
  RunCheckpoints(const RunCheckpoints&) = delete;
  RunCheckpoints& operator=(const RunCheckpoints&) = delete;

  /// The checkpoint to resume from: options.resume_from, the run directory's newest valid one
  /// (options.resume), or none; refuses a run directory that holds checkpoints without resume.
  std::optional<CheckpointDir::Loaded> FindResumable() const;
  /// Rank 0 records that this attempt began from loaded (RUN_DIR/ATTEMPT) unless a newer
  /// attempt holds the run; then every rank refuses together, before anything is written. Rank
  /// 0 then makes samples/ and removes what interrupted writes left behind.
  void TakeFence(const std::optional<CheckpointDir::Loaded>& loaded);
  /// Starts the writers once the run's state is in place at step (resumed: from a checkpoint
  /// of that step); incidents go to on_incident.
  void StartWriters(int64_t step, bool resumed, IncidentHook on_incident);

  /// Whether step's checkpoint has been started (a second request at one step writes nothing).
  bool SavedAt(int64_t step) const { return step == last_saved_step_; }
  /// Starts the checkpoint of step: the replicated state and this rank's own, written in the
  /// background. Settle the previous one first (its failures are in the state).
  void Save(int64_t step, const std::map<std::string, torch::Tensor>& replicated,
            const std::map<std::string, torch::Tensor>& own);
  /// Waits for the pending checkpoint. One that failed to write is abandoned (the writer has
  /// cleaned up), counted and reported, and training goes on; after
  /// train.max_checkpoint_failures in a row FailingTooOften() stops the run. strict rethrows
  /// instead: the run's last checkpoint must not fail quietly.
  void Settle(bool strict);
  /// Waits for the pending checkpoint (rank 0: until committed); rethrows its error. False, on
  /// every rank, when the fence refused it: a newer attempt holds the run.
  bool Finish();
  /// A superseded attempt's end: waits for what is still being written (the fence refuses it)
  /// and says so when it was not committed.
  void Drain();
  /// Rank 0: whether a newer attempt holds the run directory; reads RUN_DIR/ATTEMPT at most
  /// once per options.fence_check_seconds unless now.
  bool Superseded(bool now);
  /// Rank 0: whether train.max_checkpoint_failures checkpoints in a row failed.
  bool FailingTooOften() const;
  /// The error of a run that FailingTooOften() stopped.
  std::string FailureError() const;
  /// The last checkpoint's stall and the last write's seconds, as the run reports them.
  const CheckpointTimes& times() const { return times_; }
  /// Rank 0: the newest committed checkpoint ("" none yet).
  const std::string& committed() const { return committed_; }
  /// Checkpoints that failed over the run's life (carried by the checkpoints).
  int64_t failures() const { return failures_; }
  void set_failures(int64_t failures) { failures_ = failures; }

  /// Whether a post-hoc EMA snapshot of step is due (train.phema_snapshot_every, the last step).
  bool SnapshotDue(int64_t step) const;
  /// Whether step's snapshot has been started.
  bool SnapshotAt(int64_t step) const { return step == last_snapshot_step_; }
  /// Starts step's snapshot into RUN_DIR/phema/ (never pruned), after the previous one settles.
  void SaveSnapshot(int64_t step, const std::map<std::string, torch::Tensor>& replicated);
  /// Waits for the pending snapshot; a failure is an incident (a missing snapshot narrows what
  /// ddpm_phema can reconstruct, it loses no training).
  void SettleSnapshot();

  /// The checkpoint every rank rolls back to from step at (cause: the divergence): the pending
  /// checkpoint settles, rank 0 picks the newest that reads and verifies, and snapshots after
  /// it are dropped. Throws when there is none before at.
  CheckpointDir::Loaded RollBackTarget(int64_t at, const std::string& cause);

  /// eval.select's best checkpoint (rank 0 keeps the state).
  BestKeeper& best() { return best_; }
  /// Rank 0, once step's checkpoint has settled: moves `best` to it with score, or says why
  /// not (its checkpoint was not committed; the fence refused).
  void PromoteBest(int64_t step, double score);

 private:
  /// Rank 0: removes snapshots after step, which a resumed or rolled-back run writes anew.
  void DropSnapshotsAfter(int64_t step);
  /// Why path's checkpoint is of an attempt the fence says was superseded ("" when it is not).
  std::string Stale(const std::string& path) const;

  const Config& config_;
  const TrainOptions& options_;
  const RunConsole& console_;
  Communicator& comm_;
  const FaultInjection& fault_;
  CheckpointDir checkpoints_;
  CheckpointDir snapshots_;
  const RunFence fence_;
  std::unique_ptr<CheckpointWriter> writer_;
  std::unique_ptr<CheckpointWriter> snapshot_writer_;
  IncidentHook on_incident_;
  BestKeeper best_;
  int64_t last_saved_step_ = -1;
  int64_t last_snapshot_step_ = -1;
  CheckpointTimes times_;
  std::string committed_;
  // Fencing: when rank 0 last read the fence, and whether a newer attempt held the run then.
  std::chrono::steady_clock::time_point fence_read_{};
  bool superseded_ = false;
  /// Set around a checkpoint's Save when DDPM_FAULT_DISK_FULL covers its step.
  std::atomic<bool> inject_disk_full_{false};
  // Failed checkpoints: over the run's life, in a row now, and the last error.
  int consecutive_failures_ = 0;
  int64_t failures_ = 0;
  std::string error_;
};

}  // namespace ddpm
