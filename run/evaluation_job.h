// An evaluation job: FID and IS of checkpoints of a training run, on one process or every rank
// of a worker group, resumable. The service schedules it like a training run (ddpmctl eval);
// the job keeps what it needs in its own directory:
//   ATTEMPT      its fence (base/fence.h): a superseded attempt records no result
//   plan.txt     the checkpoint steps chosen on its first start, one per line
//   sweep.csv    one row per checkpoint evaluated (eval/checkpoint_sweep.h), and sweep.png
//   step_X/      the samples of the checkpoint in progress (000000.png ...), which a restarted
//                job reads back instead of drawing again; removed once its row is in sweep.csv
// Torch-free header.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "config/config.h"
#include "eval/report.h"
#include "run/run.h"

namespace ddpm {

struct EvaluationJobOptions {
  /// The job's own directory.
  std::string job_dir;
  /// The training run evaluated: its id (for messages) and its run directory.
  std::string source_run;
  std::string source_run_dir;
  /// CheckpointSelection text: latest, all, every:K or a step.
  std::string checkpoints = "latest";
  /// The training set of a memorization report of each checkpoint's samples (OpenTrainingSet's
  /// specs), or empty; the reports go to job_dir/memorization/step_X/.
  std::string memorization_train;
  /// The coordinator's attempt (the fencing token); 0: not fenced.
  int attempt = 0;
  ProgressMode progress = ProgressMode::kAuto;
  /// Rank 0, between batches: whether to stop (the coordinator's STOP, a signal).
  std::function<bool()> poll_stop;
  /// Rank 0, after each batch: images of the whole job sampled (about: rank 0's share of the
  /// checkpoint in progress times the ranks) and in all, and images per second of the group.
  std::function<void(int64_t done, int64_t total, double images_per_second)> on_progress;
  /// Rank 0, after each checkpoint's row is in sweep.csv (not for rows an earlier attempt wrote).
  std::function<void(const EvalReport&)> on_result;
};

struct EvaluationJobResult {
  /// Every checkpoint's result so far, earlier attempts' included, in step order.
  std::vector<EvalReport> reports;
  /// The checkpoints planned.
  std::vector<int64_t> planned;
  /// poll_stop ended it before the last checkpoint.
  bool stopped = false;
};

/// Runs the job with config's eval.* protocol on dist's ranks (every rank calls it). Throws
/// FencedError when a newer attempt holds the job, and std::runtime_error naming the checkpoint,
/// file or setting at fault.
EvaluationJobResult RunEvaluationJob(const Config& config, const EvaluationJobOptions& options,
                                     const DistributedContext& dist);

}  // namespace ddpm
