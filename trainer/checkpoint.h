// Sharded checkpoints (docs/architecture.md, "The life of a checkpoint"):
// RUN_DIR/checkpoints/step_XXXXXXXXX/ holds manifest.json, one shard-RRRRR-of-WWWWW per rank and a
// COMMITTED marker, beside a `latest` pointer. Every rank writes its byte range of the replicated
// state and its own small state, in the background; rank 0 commits. Any world size reads any
// checkpoint. A world of one is W = 1.
#pragma once

#include <torch/torch.h>

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "config/config.h"
#include "trainer/tensor_io.h"

namespace ddpm {

/// "step_000001000": the name of a step's checkpoint directory, and of its sample grid.
std::string StepName(int64_t step);

/// The first 8 bytes of every shard file.
inline constexpr char kShardMagic[8] = {'D', 'D', 'P', 'M', 'S', 'H', 'R', 'D'};
/// The format this build writes and the newest it reads (1 was the single-file format).
inline constexpr uint32_t kCheckpointVersion = 2;

/// Called with the bytes of a shard written so far; tests use it to die part-way through.
using WriteHook = std::function<void(std::size_t written, std::size_t total)>;

/// Reads and verifies one checkpoint directory: the COMMITTED marker, the manifest, and every
/// shard's size and xxHash64. Returns the replicated tensors by name, and each rank's own
/// tensors as "<name>/<rank>". Throws CheckpointError naming the file at fault.
std::map<std::string, torch::Tensor> ReadCheckpoint(const std::string& step_dir);

/// The checkpoints of one run: DIR/step_XXXXXXXXX/ and DIR/latest (the newest's name).
class CheckpointDir {
 public:
  explicit CheckpointDir(std::string dir);
  const std::string& dir() const { return dir_; }
  /// Steps that have a (finished-looking) checkpoint directory, newest first.
  std::vector<int64_t> Steps() const;
  /// The directory of step's checkpoint.
  std::string PathFor(int64_t step) const;
  /// Deletes step_*.tmp directories that a killed writer left behind. Call before any rank
  /// starts writing.
  void RemoveTemporaries() const;
  /// Deletes the checkpoints of steps after step (COMMITTED first, so that a deletion cut short
  /// leaves nothing a reader takes for a checkpoint); returns how many.
  int RemoveAfter(int64_t step) const;

  /// A loaded checkpoint and where it came from.
  struct Loaded {
    std::string path;
    std::map<std::string, torch::Tensor> tensors;
  };
  /// The newest checkpoint that reads and verifies, starting from `latest`. Each one refused on
  /// the way is reported to warn with the reason. Empty when there is none. refuse, when given,
  /// sees each candidate's path first and returns why it must be skipped (or "").
  std::optional<Loaded> LoadLatestValid(
      const std::function<void(const std::string&)>& warn,
      const std::function<std::string(const std::string& path)>& refuse = nullptr) const;

 private:
  std::string dir_;
};

/// The checkpoint a run keeps as its best (DIR/best beside DIR/latest): its step and the score
/// it was chosen by (eval.select; lower is better).
struct BestCheckpoint {
  int64_t step = 0;
  /// "fid", "kid" or "nll".
  std::string metric;
  double score = 0;
};
/// DIR/best ("step_000000020\nfid 3.1699999999999999\n"), or nullopt when there is none. Throws
/// CheckpointError naming the file when it does not read.
std::optional<BestCheckpoint> ReadBestCheckpoint(const std::string& dir);
/// Moves DIR/best to best, atomically (written aside, fsynced, renamed over, DIR fsynced).
void WriteBestCheckpoint(const std::string& dir, const BestCheckpoint& best);

/// The attempt that wrote the checkpoint in step_dir, from its manifest (0 when it was written
/// outside a coordinator, by an older version, or the manifest cannot be read).
int CheckpointAttempt(const std::string& step_dir);

/// A checkpoint at path: a step directory, a checkpoints folder (its newest valid checkpoint), a
/// run directory (its checkpoints/), or RUN/best or RUN/checkpoints/best (the checkpoint that
/// eval.select kept). Refused checkpoints are reported to warn.
CheckpointDir::Loaded LoadCheckpointAt(const std::string& path,
                                       const std::function<void(const std::string&)>& warn);

/// How long the last checkpoint took on this rank.
struct CheckpointTimes {
  /// The train loop was blocked: waiting for the previous write, and copying to host memory.
  double stall_seconds = 0;
  /// The background write of the shard (and on rank 0 the commit).
  double write_seconds = 0;
};

/// Writes the checkpoints of one rank of a world. Save copies the rank's share to host memory
/// (reused buffers, pinned when the state is on a GPU) and returns; a background thread writes
/// the shard into step_X.tmp/ and fsyncs it. Rank 0's thread then waits until every rank's
/// shard is in, writes the manifest and COMMITTED, renames the folder to step_X, moves
/// `latest` and deletes all but the newest keep checkpoints (those holding a KEEP file and the
/// one `best` names stay; keep <= 0 deletes none).
/// A checkpoint whose write fails anywhere (a full disk, an I/O error, a fence) is abandoned:
/// the failing rank leaves a `.failed` receipt so that rank 0 stops waiting, rank 0 removes the
/// temporary folder (or the half-published one), and `latest` and the older checkpoints stay as
/// they were; Wait() rethrows the error. The folder must be shared by the ranks. Use from one
/// thread.
class CheckpointWriter {
 public:
  CheckpointWriter(std::string dir, int rank, int world_size, int keep, double timeout_seconds,
                   WriteHook hook = nullptr);
  /// Waits for the pending checkpoint; errors are dropped (call Wait to see them).
  ~CheckpointWriter();
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;

  /// Checkpoints step: replicated holds the tensors every rank has alike (the same names,
  /// shapes and dtypes on every rank; rank r writes the r-th byte range of them all), own the
  /// rank's own small tensors. Waits for the previous checkpoint first; rethrows its error.
  void Save(int64_t step, const std::map<std::string, torch::Tensor>& replicated,
            const std::map<std::string, torch::Tensor>& own);
  /// Blocks until the pending checkpoint is written (and on rank 0 committed); rethrows its
  /// error. Returns the committed directory on rank 0, else "".
  std::string Wait();
  /// The last Save's stall and the last finished write.
  CheckpointTimes times() const;
  /// Calls on_commit(step, directory) on rank 0's writer thread after each commit. Set it
  /// before the first Save.
  void set_on_commit(std::function<void(int64_t, const std::string&)> on_commit) {
    on_commit_ = std::move(on_commit);
  }
  /// Fencing (base/fence.h): the manifest records attempt, and rank 0 calls check(what) right
  /// before it publishes the folder and before it moves `latest`; check throws (FencedError)
  /// when a newer attempt holds the run, and the checkpoint is abandoned. Set it before the
  /// first Save.
  void set_fence(int attempt, std::function<void(const std::string& what)> check) {
    attempt_ = attempt;
    check_fence_ = std::move(check);
  }

 private:
  struct Job;
  void Run();
  void Write(Job& job);
  void Commit(Job& job);
  /// Removes what a failed checkpoint left (rank 0) or tells rank 0 that it failed (others).
  void Abandon(const Job& job, const std::string& why);

  const std::string dir_;
  const int rank_;
  const int world_;
  const int keep_;
  const double timeout_seconds_;
  const WriteHook hook_;
  std::function<void(int64_t, const std::string&)> on_commit_;
  int attempt_ = 0;
  std::function<void(const std::string&)> check_fence_;
  torch::Tensor host_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::unique_ptr<Job> job_;
  bool busy_ = false;
  bool stop_ = false;
  std::exception_ptr error_;
  std::string committed_;
  CheckpointTimes times_;
  std::thread thread_;
};

/// The config a checkpoint was trained with (its checkpoint_keys::kConfig); throws naming
/// origin when it is missing or does not load.
Config ConfigFromCheckpoint(const std::map<std::string, torch::Tensor>& tensors,
                            const std::string& origin);

/// Saves one checkpoint of a world of one and waits for it; returns its directory.
std::string SaveCheckpoint(const std::string& dir, int64_t step,
                           const std::map<std::string, torch::Tensor>& tensors, int keep);

}  // namespace ddpm
