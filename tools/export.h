// ddpm_export: a checkpoint's EMA (or raw) weights as one state dict for Python's torch.load.
#pragma once

#include <string>
#include <vector>

namespace ddpm {

/// What ddpm_export reads and writes.
struct ExportJob {
  /// A checkpoint directory, a checkpoints folder or a run directory.
  std::string checkpoint;
  /// "ema" (for sampling) or "model" (the raw trained weights).
  std::string which = "ema";
  /// The state dict file, which Python's torch.load reads; its config goes beside it as .yaml.
  std::string out = "model.pt";
};

/// Writes job.which's weights of the checkpoint as one state dict with the UNet's names, and
/// its config beside it; returns the files written.
std::vector<std::string> RunExport(const ExportJob& job);

}  // namespace ddpm
