// The training run as a class whose steps have names: set up (or resume), then at each step
// boundary decide, train one step, log, checkpoint, sample and evaluate, and finish.
#pragma once

#include <torch/torch.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <optional>
#include <string>

#include "base/fence.h"
#include "config/batch_plan.h"
#include "config/config.h"
#include "eval/likelihood.h"
#include "run/best_checkpoint.h"
#include "run/run.h"
#include "run/run_control.h"
#include "run/run_log.h"
#include "trainer/checkpoint.h"
#include "trainer/communicator.h"
#include "trainer/data.h"
#include "trainer/trainer.h"

namespace ddpm {

class RunEvaluator;

/// One rank's part of a training run. Construct on every rank of the world (it loads or
/// resumes the state and makes every rank start from rank 0's), then Run(). Used from one
/// thread; only rank 0's checkpoint writer thread calls TrainOptions::on_checkpoint.
class TrainingRun {
 public:
  TrainingRun(const Config& config, const TrainOptions& options, const DistributedContext& dist);
  ~TrainingRun();
  TrainingRun(const TrainingRun&) = delete;
  TrainingRun& operator=(const TrainingRun&) = delete;

  /// Trains to train.steps or to a stop; returns what the run produced.
  TrainResult Run();

 private:
  using Clock = std::chrono::steady_clock;

  /// The checkpoint to resume from: options.resume_from, the run directory's newest valid one
  /// (options.resume), or none; refuses a run directory that holds checkpoints without resume.
  std::optional<CheckpointDir::Loaded> FindCheckpoint() const;
  /// Restores the trainer and the data cursor from loaded, checking that the model and the
  /// diffusion are the ones it was trained with.
  void Resume(const CheckpointDir::Loaded& loaded);
  /// Every rank takes rank 0's weights, EMA and optimizer state, and its gradient averaging.
  void JoinWorld();
  /// Reads the steps' values summed on the device into the window and this rank's last
  /// metrics (waits for the device). A loss that is not finite throws (train.on_divergence:
  /// stop) or is kept as this rank's divergence for the next collective check (rollback).
  void ReadPendingValues();
  /// The divergence that any rank saw since the last check, agreed on by every rank (an
  /// all-reduce when the world has more than one); "" when none did.
  std::string AgreeOnDivergence();
  /// Every rank at the same step: throws for train.on_divergence stop (or when no rollback is
  /// left, or no checkpoint to go back to); otherwise restores the newest good checkpoint, keeps
  /// the data cursor past the steps that diverged, scales the learning rate and goes on.
  void RollBack(const std::string& cause);
  /// Rank 0: whether a newer attempt holds the run directory; reads RUN_DIR/ATTEMPT at most
  /// once a second unless now.
  bool Superseded(bool now);
  /// Waits for the pending checkpoint. One that failed to write is abandoned (the writer has
  /// cleaned up), counted and warned about, and training goes on; after
  /// train.max_checkpoint_failures in a row the next step boundary stops the run with the
  /// error. strict rethrows instead: the run's last checkpoint must not fail quietly.
  void SettleCheckpoint(bool strict);
  /// Runs write (a sample grid, a metrics row) and turns its failure into a warning: those
  /// never take training down.
  template <typename Write>
  void Tolerate(const char* what, int64_t step, Write&& write);
  /// The counters and the last incident, for on_log.
  void ReportIncidents();
  /// Rank 0's decision at this step boundary (signals, the caller's stop), the same on every rank.
  ControlDecision Decide();
  /// One optimizer step on this rank's share of the next batch, and its metrics.
  void TrainStep();
  /// The log line, metrics.csv row and on_log report of the window that ends at this step.
  void Log(double lr);
  /// Starts a checkpoint of this step (once per step); its write goes on in the background.
  void Checkpoint();
  /// Waits for the pending checkpoint (rank 0: until committed) and reports it; rethrows its
  /// error. False, on every rank, when the fence refused it: a newer attempt holds the run.
  bool FinishCheckpoint();
  /// Rank 0 draws a sample grid of the EMA model; the other ranks wait for it.
  void WriteSamples(int64_t step);
  /// FID and IS (fid) and the bound on held-out images (nll) of the EMA model at step, over
  /// every rank, reported as one evaluation; its time is not training time.
  void Evaluate(int64_t step, bool fid, bool nll);
  /// eval.select after an evaluation at step: rank 0 decides whether report's score improves on
  /// the best and every rank acts alike; an improvement checkpoints the step (if not already),
  /// waits for its commit and moves `best`; eval.patience used up sets completed_early_.
  void UpdateBest(int64_t step, EvalReport& report);
  /// Writes a snapshot of the post-hoc EMA profiles at this step into RUN_DIR/phema/ (every
  /// rank its share, in the background, as a checkpoint), unless the weights diverged.
  void Snapshot();
  /// Waits for the pending snapshot; a failure is a warning (a missing snapshot narrows what
  /// ddpm_phema can reconstruct, it loses no training).
  void SettleSnapshot();
  /// Rank 0: removes snapshots after step, which a resumed or rolled-back run writes anew.
  void DropSnapshotsAfter(int64_t step);
  /// The end: a stop's checkpoint, or the final checkpoint, grid and exported EMA weights.
  TrainResult Finish(const ControlDecision& stop);

  const Config config_;
  const TrainOptions options_;
  const DistributedContext dist_;
  SoloCommunicator solo_;
  Communicator& comm_;
  const int rank_;
  const int world_;
  const BatchPlan plan_;
  const RunConsole console_;
  const int threads_;
  const torch::Device device_;
  CheckpointDir checkpoints_;
  const RunFence fence_;
  const int attempt_;
  bool resumed_ = false;
  /// Whether the loss-aware timestep sampler was drawing from its history after the last step.
  bool sampler_warm_ = false;
  std::unique_ptr<ImageDataset> dataset_;
  std::unique_ptr<Trainer> trainer_;
  DataCursor cursor_;
  std::unique_ptr<GradientSync> sync_;
  CsvLog metrics_csv_;
  CsvLog eval_csv_;
  std::unique_ptr<CheckpointWriter> writer_;
  /// Post-hoc EMA snapshots (train.phema_snapshot_every > 0): RUN_DIR/phema/, never pruned.
  CheckpointDir snapshots_;
  std::unique_ptr<CheckpointWriter> snapshot_writer_;
  int64_t last_snapshot_step_ = -1;
  StepWindow window_;
  int64_t last_saved_step_ = -1;
  int64_t first_step_ = 0;
  FaultInjection fault_;
  std::unique_ptr<RunSignals> signals_;
  DataShard shard_;
  std::unique_ptr<BatchLoader> loader_;
  std::unique_ptr<RunEvaluator> evaluator_;
  /// The best checkpoint by eval.select (rank 0 keeps the state).
  BestKeeper best_;
  /// Why the run ends before train.steps (eval.patience), or "".
  std::string completed_early_;
  /// The held-out images of the bound (eval.nll_every), opened before training.
  HeldOutImages held_out_;
  std::unique_ptr<RankProgress> progress_;
  /// Training time: evaluations move these forward by their own length.
  Clock::time_point start_, window_start_;
  double last_rate_ = 0;
  /// Steps this process trained (a rollback does not take them back): the ETA's rate.
  int64_t steps_trained_ = 0;
  TrainResult result_;

  // Fencing: when rank 0 last read the fence, and whether a newer attempt held the run then.
  Clock::time_point fence_read_{};
  bool superseded_ = false;
  // Failed checkpoints: over the run's life, in a row now, and the last error.
  int64_t checkpoint_failures_ = 0;
  int consecutive_failures_ = 0;
  std::string checkpoint_error_;
  /// Set around a checkpoint's Save when DDPM_FAULT_DISK_FULL covers its step.
  std::atomic<bool> inject_disk_full_{false};
  // Divergence: this rank's unchecked cause, rollbacks over the run's life, recent logged losses.
  std::string divergence_;
  int64_t rollbacks_ = 0;
  LossSpikeDetector spikes_{0};
  std::string last_incident_;
  LogMetrics last_log_;
};

}  // namespace ddpm
