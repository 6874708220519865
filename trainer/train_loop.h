// The single-process training run: data, steps, logs, sample grids and exported EMA weights.
// Torch-free header.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "trainer/config.h"

namespace ddpm {

/// Where and how a run writes.
struct TrainOptions {
  /// Run directory: config.yaml, metrics.csv, samples/*.png and ema_weights.pt go here.
  std::string run_dir = "runs/default";
};

/// What a finished run produced.
struct TrainResult {
  int64_t steps = 0;
  /// Mean loss over the last log window.
  double last_loss = 0;
  /// Every sample grid written, in order.
  std::vector<std::string> sample_grids;
  /// The exported EMA weights (a torch.load-able dict of tensors).
  std::string ema_weights;
};

/// Trains config.train.steps steps on one process and writes everything into options.run_dir.
TrainResult RunTraining(const Config& config, const TrainOptions& options);

/// Sets torch's intra-op threads from train.threads, or cores / local ranks when it is 0.
/// Returns the thread count in use.
int ConfigureThreads(const TrainConfig& config);
/// "cuda" or "cpu" for train.device ("auto" picks cuda when it is available).
std::string ResolveDevice(const TrainConfig& config);
/// Seconds as H:MM:SS.
std::string FormatDuration(double seconds);
/// Writes EMA samples of the model in weights_path as a PNG grid; returns the seconds taken.
double SampleFromWeights(const Config& config, const std::string& weights_path,
                         const std::string& png_path);

}  // namespace ddpm
