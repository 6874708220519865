// The training run, on one process or one rank of a data-parallel job: data, steps, logs,
// checkpoints and resume, sample grids, evaluations and exported EMA weights. Torch-free
// header: the worker's gateway client and metrics read these structs without LibTorch.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "config/batch_plan.h"
#include "config/config.h"
#include "eval/report.h"

namespace ddpm {

/// A run that cannot go on for a reason of its own: its directory holds another run's
/// checkpoints, a checkpoint it was asked for is gone, or DDPM_FAULT_INJECT said so.
class RunError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Training diverged (a loss that is not finite, or a spike) and the policy, or the rollbacks
/// left, say stop. The message names the step and the cause.
class DivergedError : public RunError {
 public:
  using RunError::RunError;
};

class Communicator;
class DataParallel;
class Trainer;

/// What one rank measured in one step; the train loop fills it and hands it to
/// TrainOptions::on_step (the coordinator's metrics read it).
struct WorkerMetrics {
  int64_t step = 0;
  int rank = 0;
  /// This rank's mean loss and the global gradient norm over the steps up to the last read of
  /// the device's values (a log step or a checkpoint): steps do not wait for the GPU.
  double loss = 0;
  double grad_norm = 0;
  double lr = 0;
  /// Seconds of the whole step on this rank, data wait included.
  double step_seconds = 0;
  /// Images this rank trained on per second, over this step.
  double images_per_second = 0;
  /// The last checkpoint: seconds the train loop was blocked, and seconds its background write
  /// (and commit) took.
  double checkpoint_stall_seconds = 0;
  double checkpoint_write_seconds = 0;
  /// Gradient all-reduce: seconds summed over buckets, the share of them hidden behind
  /// backward, and the seconds the step waited for them after backward (0 for one process).
  double allreduce_seconds = 0;
  double overlap_fraction = 0;
  double exposed_seconds = 0;
};

/// The data-parallel group a run trains in. Empty: a world of one.
struct DistributedContext {
  /// Collectives across ranks (not owned); null for a world of one.
  Communicator* comm = nullptr;
  /// Makes the run's trainer's handle to the ranks (comm/'s GradientBucketsFor).
  std::function<std::unique_ptr<DataParallel>(Trainer&)> make_data_parallel;
  /// The torch device of this rank ("cpu", "cuda:1"); empty: from train.device.
  std::string device;
  /// Ranks on this node, which share its cores; 0: from the launcher's environment.
  int local_ranks = 0;
  /// The split of the batch that a coordinator placed the run with; empty: PlanBatch of the
  /// config for this world.
  std::optional<BatchPlan> plan;
};

/// What rank 0 reports once per log interval.
struct LogMetrics {
  int64_t step = 0;
  int64_t total_steps = 0;
  /// Mean loss over the interval and every rank.
  double loss = 0;
  double grad_norm = 0;
  double lr = 0;
  /// Images per second of the whole group over the interval.
  double images_per_second = 0;
  double elapsed_seconds = 0;
  double eta_seconds = 0;
  /// Mean loss over the interval and every rank of the samples whose timestep fell in each
  /// quarter of [0, T); NaN for a quarter that none did.
  std::array<double, kTimestepQuartiles> loss_by_quartile{};
  /// Over the run's life so far (carried by its checkpoints): divergence rollbacks, and
  /// checkpoints abandoned because they could not be written.
  int64_t rollbacks = 0;
  int64_t checkpoint_failures = 0;
  /// The newest of those, in words ("" when none): what a user should look at.
  std::string last_incident;
};

/// A checkpoint that rank 0 has committed, with what it cost.
struct CommittedCheckpoint {
  int64_t step = 0;
  /// Its directory.
  std::string dir;
  /// Seconds the train loop was blocked while the checkpoint's tensors were copied.
  double stall_seconds = 0;
  /// Seconds its background write and commit took.
  double write_seconds = 0;
};

/// A stop that the caller of RunTraining asks for (the coordinator's commands).
enum class StopRequest {
  kNone,
  /// Checkpoint, then stop.
  kStop,
  /// Stop at the next step boundary without a checkpoint.
  kAbandon,
};

/// How a run shows its progress on stdout.
enum class ProgressMode {
  /// A bar when stdout is the user's terminal, lines otherwise. Under an MPI launcher or Slurm
  /// the ranks' stdout is a pseudo-terminal even when the job's output goes to a file: lines.
  kAuto,
  /// A bar redrawn in place every step, and a line at each log interval.
  kBar,
  /// A plain line at each log interval (and a few per sample grid): what a log file wants.
  kLines,
  /// No progress lines at all; every other message still prints.
  kOff,
};

/// "auto", "bar", "lines" or "off"; throws ConfigError naming origin otherwise.
ProgressMode ParseProgressMode(const std::string& text, const std::string& origin);
/// What mode means for this process's stdout: kBar, kLines or kOff.
ProgressMode ResolveProgressMode(ProgressMode mode);

/// Where and how a run writes.
struct TrainOptions {
  /// Run directory: config.yaml, metrics.csv, checkpoints/, samples/ and ema_weights.pt.
  std::string run_dir = "runs/default";
  /// Continue from the run directory's newest valid checkpoint, if it has one.
  bool resume = false;
  /// Continue from this checkpoint file instead.
  std::string resume_from;
  /// How rank 0 shows progress on stdout.
  ProgressMode progress = ProgressMode::kAuto;
  /// The coordinator's attempt of this run (its fencing token, base/fence.h): rank 0 records it
  /// in RUN_DIR/ATTEMPT and the run writes nothing once a newer attempt holds the directory.
  /// 0: a run started by hand, not fenced.
  int attempt = 0;
  /// Rank 0 reads the fence at step boundaries at most this often (and always before it writes
  /// a grid, a metrics row or the exported weights, and before a checkpoint publishes).
  double fence_check_seconds = 1.0;
  /// Called on every rank after every step.
  std::function<void(const WorkerMetrics&)> on_step;
  /// Rank 0, at every step boundary: whether to stop. Every rank acts on the answer together.
  std::function<StopRequest()> poll_stop;
  /// Rank 0, once per log interval.
  std::function<void(const LogMetrics&)> on_log;
  /// Rank 0, after each checkpoint has committed (called from the checkpoint writer's thread).
  std::function<void(const CommittedCheckpoint&)> on_checkpoint;
  /// Rank 0, after each sample grid has been written.
  std::function<void(const std::string& path)> on_sample_grid;
  /// Rank 0, after each evaluation (eval.every).
  std::function<void(const EvalReport&)> on_eval;
};

/// What a run produced.
struct TrainResult {
  int64_t steps = 0;
  /// Mean loss over the last log window.
  double last_loss = 0;
  /// Every sample grid written, in order.
  std::vector<std::string> sample_grids;
  /// The last checkpoint written.
  std::string checkpoint;
  /// The exported EMA weights (a torch.load-able dict of tensors); empty if interrupted.
  std::string ema_weights;
  /// The signal (SIGINT or SIGTERM) that stopped the run early, or 0.
  int interrupted_by = 0;
  /// The stop TrainOptions::poll_stop asked for, if the run ended by one.
  StopRequest stopped_by = StopRequest::kNone;
  /// The run stopped because a newer attempt holds its directory; it wrote nothing after that.
  bool superseded = false;
  /// Why a run that completed before train.steps stopped (eval.patience), or "".
  std::string completed_early;
  /// Divergence rollbacks and failed checkpoints over the run's life, as in LogMetrics.
  int64_t rollbacks = 0;
  int64_t checkpoint_failures = 0;
  /// This rank's last step.
  WorkerMetrics last_metrics;
};

/// Trains to config.train.steps, writing into options.run_dir (rank 0 writes; every rank reads
/// its shard of the data). Rank 0 decides at each step boundary whether to stop (SIGINT or
/// SIGTERM), checkpoint now (SIGUSR1) or draw a sample grid now (SIGUSR2), and every rank acts on
/// the same step. A TrainingRun, run to its end.
TrainResult RunTraining(const Config& config, const TrainOptions& options,
                        const DistributedContext& dist = {});

}  // namespace ddpm
