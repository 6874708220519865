// ddpm_sample: a checkpoint's (or a weights file's) EMA model to PNG samples.
#pragma once

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "config/flags.h"

namespace ddpm {

class Communicator;
struct TrainedModel;

/// What ddpm_sample draws from and where it writes.
struct SampleJob {
  /// A checkpoint directory, a checkpoints folder or a run directory (its newest valid
  /// checkpoint); its EMA weights and config are used.
  std::string checkpoint;
  /// Or a weights file (ddpm_export's, ema_weights.pt, or a torch.save'd state dict) ...
  std::string weights;
  /// ... with the config it was trained with; empty: the .yaml beside the weights file.
  std::string config_path;
  /// "section.key" -> YAML value overrides of the config (sample.* mostly).
  std::vector<std::pair<std::string, std::string>> overrides;
  /// Images per forward pass.
  int batch_size = 64;
  /// A PNG grid, a directory (existing, or ending in '/') for one PNG per image, or a .npz
  /// sample archive in the OpenAI evaluator's format (arr_0: uint8 N x H x W x C), assembled by
  /// rank 0 from the images every rank wrote into OUT.images/, with its SHA-256 beside it in
  /// OUT.sha256.
  std::string out = "samples.png";
  /// A directory job keeps the images already there (each file is written whole or not at
  /// all) and draws only the missing ones.
  bool resume = false;
};

/// Declares ddpm_sample's flags.
void AddSampleFlags(Flags& flags);
/// The job the parsed flags ask for; throws FlagError for a bad combination.
SampleJob SampleJobFromFlags(const Flags& flags);
/// Draws the samples of job as rank comm.rank() of comm's world and writes them; returns the
/// files this rank wrote. Image i draws its noise from ImageSeed(sample.seed, i) alone, so the
/// images do not depend on the batch size or on the number of ranks; each rank takes a
/// contiguous share of the images, and writes them itself (a directory job; a grid needs one
/// rank). place, when given, moves the loaded model to this rank's device.
std::vector<std::string> RunSampleJob(const SampleJob& job, Communicator& comm,
                                      const std::function<void(TrainedModel&)>& place = {});

/// The config file that goes with an exported weights file: model.pt -> model.yaml.
std::string ConfigBesideWeights(const std::string& weights);

}  // namespace ddpm
