// The training run as a class whose steps have names: set up (or resume), then at each step
// boundary decide, train one step, log, checkpoint, sample and evaluate, and finish. Its
// concerns live in their own units: the checkpoints, snapshots, fence and `best`
// (RunCheckpoints), divergence and rollback (DivergenceGuard), the log lines, CSV rows and
// reports (RunReport), and the evaluations (RunEvaluations).
#pragma once

#include <torch/torch.h>

#include <map>
#include <memory>
#include <optional>
#include <string>

#include "config/batch_plan.h"
#include "config/config.h"
#include "run/divergence_guard.h"
#include "run/run.h"
#include "run/run_checkpoints.h"
#include "run/run_control.h"
#include "run/run_evaluations.h"
#include "run/run_log.h"
#include "run/run_report.h"
#include "trainer/checkpoint.h"
#include "trainer/communicator.h"
#include "trainer/data.h"
#include "trainer/trainer.h"

namespace ddpm {

/// The run's data: the data set, this rank's share of each global batch, where the run is in
/// the data, and the loader that prepares the next batches from there.
struct RunData {
  std::unique_ptr<ImageDataset> dataset;
  DataShard shard;
  DataCursor cursor;
  std::unique_ptr<BatchLoader> loader;
};

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
  int rank() const { return comm_.rank(); }
  int world() const { return comm_.world_size(); }
  /// Opens the data set (and, for a conditional model, checks and writes its classes).
  void OpenData();
  /// Restores the trainer and the data cursor from loaded, checking that the model and the
  /// diffusion are the ones it was trained with.
  void Resume(const CheckpointDir::Loaded& loaded);
  /// Warns where the checkpoint's world or threads differ from this run's (not bitwise then).
  void WarnAboutResumedWorld(const std::map<std::string, torch::Tensor>& state,
                             const std::string& path) const;
  /// Every rank takes rank 0's weights, EMA and optimizer state, and its gradient averaging.
  void JoinWorld();
  /// Starts the writers, the loader, the evaluations and the CSV files once the state is set.
  void StartRun(bool resumed);
  /// Reads the steps' values summed on the device into the window and this rank's last
  /// metrics (waits for the device). A loss that is not finite goes to the divergence guard.
  void ReadPendingValues();
  /// Every rank at the same step: rolls back for cause (DivergenceGuard::RollBack), restarts
  /// the log window and reports the incident.
  void RollBack(const std::string& cause);
  /// The run's incidents so far.
  RunCounters Counters() const { return {guard_.rollbacks(), checkpoints_.failures()}; }
  /// Rank 0's decision at this step boundary (signals, the caller's stop), the same on every rank.
  ControlDecision Decide();
  /// One optimizer step on this rank's share of the next batch, and its metrics.
  void TrainStep();
  /// This rank's metrics of the step just trained, as on_step sees them.
  void RecordStep(const StepStats& stats, double step_seconds);
  /// The log line, metrics.csv row and on_log report of the window that ends at this step.
  void Log(double lr);
  /// Starts a checkpoint of this step (once per step); its write goes on in the background.
  void Checkpoint();
  /// The state a checkpoint of this step holds: replicated on every rank, and this rank's own.
  std::pair<std::map<std::string, torch::Tensor>, std::map<std::string, torch::Tensor>>
  CheckpointState() const;
  /// Waits for the pending checkpoint (rank 0: until committed) and reports it; rethrows its
  /// error. False, on every rank, when the fence refused it: a newer attempt holds the run.
  bool FinishCheckpoint();
  /// Writes a snapshot of the post-hoc EMA profiles at this step into RUN_DIR/phema/ (every
  /// rank its share, in the background, as a checkpoint), unless the weights diverged.
  void Snapshot();
  /// Rank 0 draws a sample grid of the EMA model; the other ranks wait for it.
  void WriteSamples(int64_t step);
  /// What is due at step: FID and IS (fid) and the bound on held-out images (nll) of the EMA
  /// model, over every rank, reported as one evaluation; its time is not training time.
  void Evaluate(int64_t step, bool fid, bool nll);
  /// eval.select after an evaluation at step: rank 0 decides whether report's score improves on
  /// the best and every rank acts alike; an improvement checkpoints the step (if not already),
  /// waits for its commit and moves `best`; eval.patience used up ends the run early.
  void UpdateBest(int64_t step, EvalReport& report);
  /// The end: a stop's checkpoint, or the final checkpoint, grid and exported EMA weights.
  void Finish(const ControlDecision& stop);
  /// The end of a run that trained to train.steps (or that eval.patience ended).
  void Complete();
  /// What the run produced, with the counters and checkpoint of its components.
  TrainResult Result();

  const Config config_;
  const TrainOptions options_;
  const DistributedContext dist_;
  SoloCommunicator solo_;
  Communicator& comm_;
  const BatchPlan plan_;
  const RunConsole console_;
  const int threads_;
  const torch::Device device_;
  FaultInjection fault_;
  RunCheckpoints checkpoints_;
  DivergenceGuard guard_;
  RunReport report_;
  RunData data_;
  std::unique_ptr<Trainer> trainer_;
  std::unique_ptr<DataParallel> ranks_;
  std::unique_ptr<RunEvaluations> evaluations_;
  std::unique_ptr<RunSignals> signals_;
  std::unique_ptr<RankProgress> progress_;
  TrainResult result_;
};

}  // namespace ddpm
