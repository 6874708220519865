// Which checkpoints of a training run an evaluation job reads: "latest", "all", "every:K" or
// one step. The coordinator checks the text when a job is queued; the job's group picks the
// steps among the checkpoints on disk. Torch-free.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ddpm {

struct CheckpointSelection {
  enum class Kind { kLatest, kAll, kEvery, kStep };
  Kind kind = Kind::kLatest;
  /// K of every:K, or the step of kStep.
  int64_t value = 0;

  /// "latest" (also for empty text), "all", "every:K" with K >= 1, or a step >= 1; throws
  /// ConfigError naming the text and what it may be.
  static CheckpointSelection Parse(const std::string& text);
  /// The text Parse reads back.
  std::string ToString() const;
  /// The selected steps of available (any order), ascending; throws ConfigError naming run and
  /// the steps there are when none is selected.
  std::vector<int64_t> Select(std::vector<int64_t> available, const std::string& run) const;
};

}  // namespace ddpm
