// The fencing token of a run directory: RUN_DIR/ATTEMPT names the attempt that holds the run
// and, for each attempt, the step it resumed from. The coordinator grants an attempt before a
// group starts it; the group's rank 0 records the step it began at; a superseded attempt (a
// group declared lost but still alive) reads a newer attempt there and refuses to publish
// anything into the run directory. docs/architecture.md, "Fencing".
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace ddpm {

/// A newer attempt holds the run: this one must not write into its directory.
class FencedError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// One attempt of a run as the fence file records it.
struct AttemptRecord {
  int attempt = 0;
  /// The step of the checkpoint it resumed from (0: from scratch); -1 until its rank 0 began.
  int64_t began_at_step = -1;
};

/// RUN_DIR/ATTEMPT, a few lines of text:
///   ddpm-train attempt fence 1
///   attempt 1 began 0
///   attempt 2 began 400
///   attempt 3
/// The newest attempt listed holds the run. Attempt 0 means "not fenced": a run started by hand,
/// outside a coordinator, which neither writes nor is refused by the fence.
class RunFence {
 public:
  explicit RunFence(std::string run_dir);
  const std::string& path() const { return path_; }

  /// The records, oldest first; empty when the file does not exist. Throws FormatError naming
  /// the file and line when it is malformed.
  std::vector<AttemptRecord> Read() const;
  /// The attempt that holds the run (0 when there is no file).
  int Current() const;
  /// Records attempt as the one that holds the run (WriteFileAtomically, synced with its
  /// directory; FileError when it cannot). Never moves the fence back: an older attempt than
  /// the current one throws FencedError.
  void Grant(int attempt) const;
  /// Records the step attempt began at; throws FencedError when a newer attempt holds the run.
  void Began(int attempt, int64_t step) const;
  /// Throws FencedError naming what was about to be written when a newer attempt than attempt
  /// holds the run. Attempt 0 is never refused.
  void Check(int attempt, const std::string& what) const;
  /// Why a checkpoint that attempt committed at step must not be resumed from, or "": it was
  /// committed by a superseded attempt after a newer one had begun (from an older step).
  std::string Stale(int attempt, int64_t step) const;

 private:
  void Write(const std::vector<AttemptRecord>& records) const;

  std::string run_dir_;
  std::string path_;
};

}  // namespace ddpm
