// The single-process training run: data, steps, logs, checkpoints and resume, sample grids and
// exported EMA weights. Torch-free header.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "trainer/config.h"

namespace ddpm {

/// Where and how a run writes.
struct TrainOptions {
  /// Run directory: config.yaml, metrics.csv, checkpoints/, samples/ and ema_weights.pt.
  std::string run_dir = "runs/default";
  /// Continue from the run directory's newest valid checkpoint, if it has one.
  bool resume = false;
  /// Continue from this checkpoint file instead.
  std::string resume_from;
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
};

/// Trains to config.train.steps on one process, writing into options.run_dir. Ctrl-C or
/// SIGTERM stops at the next step boundary with a checkpoint.
TrainResult RunTraining(const Config& config, const TrainOptions& options);

/// Sets torch's intra-op threads from train.threads; when it is 0, from OMP_NUM_THREADS if set,
/// else cores / local ranks.
/// Returns the thread count in use.
int ConfigureThreads(const TrainConfig& config);
/// "cuda" or "cpu" for train.device ("auto" picks cuda when it is available).
std::string ResolveDevice(const TrainConfig& config);
/// Seconds as H:MM:SS.
std::string FormatDuration(double seconds);

/// What ddpm_sample draws from and where it writes.
struct SampleJob {
  /// A training checkpoint; its EMA weights and config are used.
  std::string checkpoint;
  /// Or a weights file (ema_weights.pt or a torch.save'd state dict) ...
  std::string weights;
  /// ... with the config it was trained with.
  std::string config_path;
  /// "section.key" -> YAML value overrides of the config (sample.* mostly).
  std::vector<std::pair<std::string, std::string>> overrides;
  /// Images per forward pass.
  int batch_size = 64;
  /// A PNG grid, or a directory (existing, or ending in '/') for one PNG per image.
  std::string out = "samples.png";
};

/// Draws the samples of job and writes them; returns the files written.
std::vector<std::string> RunSampleJob(const SampleJob& job);

}  // namespace ddpm
