// ddpm_fid checkpoint's work: the in-training evaluation (RunEvaluator) of a trained model's
// EMA weights, on demand, over every rank, at one classifier-free guidance scale or a sweep.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "config/flags.h"
#include "tools/trained_model.h"
#include "trainer/communicator.h"

namespace ddpm {

/// What ddpm_fid checkpoint evaluates and where its results go.
struct CheckpointEvalOptions {
  /// The config overrides of the evaluation flags (eval.*, sample.*), applied to the model's.
  std::vector<std::pair<std::string, std::string>> overrides;
  /// Guidance scales, each evaluated in turn; empty: the config's eval.guidance.
  std::vector<double> scales;
  /// A directory to keep the samples in as PNGs ("": none; one scale only).
  std::string keep_dir;
  /// With more than one scale: FID and IS against w go to OUT.csv and OUT.png.
  std::string out = "guidance_sweep";
  /// The reference statistics' path, as the report names it.
  std::string reference;
};

/// Declares ddpm_fid checkpoint's flags: the trained model's, the evaluation's, --out and
/// --also-save.
void AddCheckpointEvalFlags(Flags& flags);
/// Reads them; throws FlagError naming the flag (--also-save with several scales).
CheckpointEvalOptions CheckpointEvalOptionsFromFlags(const Flags& flags);

/// Samples trained's EMA weights and streams the samples into the FID Inception network over
/// comm's ranks, for each scale; rank 0 prints progress, then FID, IS (and KID, PRD) with the
/// protocol, and writes the sweep's CSV and plot. Throws FlagError when several scales are
/// asked of an unconditional model. Returns the exit code (0).
int EvaluateCheckpoint(TrainedModel& trained, Communicator& comm,
                       const CheckpointEvalOptions& options);

}  // namespace ddpm
