// Single-process checkpoints: a versioned, checksummed file of named tensors, written
// atomically, and the run directory's checkpoints/ folder with its `latest` pointer.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace ddpm {

/// A checkpoint that cannot be read: the message names the file and what is wrong with it.
class CheckpointError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A dict of named tensors as pickle bytes that Python's torch.load reads.
std::vector<char> PickleTensors(const std::map<std::string, torch::Tensor>& tensors);
/// The dict of named tensors in pickle bytes (from PickleTensors or Python's torch.save);
/// throws std::runtime_error naming origin if the bytes are not one.
std::map<std::string, torch::Tensor> UnpickleTensors(const std::vector<char>& bytes,
                                                     const std::string& origin);

/// tensors[name], or CheckpointError naming origin and the missing name.
const torch::Tensor& RequireTensor(const std::map<std::string, torch::Tensor>& tensors,
                                   const std::string& name, const std::string& origin);
/// A 0-d int64 tensor, for counters and cursors in a checkpoint.
torch::Tensor Int64Tensor(int64_t value);

/// The file's first 8 bytes.
inline constexpr char kCheckpointMagic[8] = {'D', 'D', 'P', 'M', 'C', 'K', 'P', 'T'};
/// The format this build writes and the newest it reads.
inline constexpr uint32_t kCheckpointVersion = 1;

/// Called with the bytes written so far while a checkpoint file is written; tests use it to
/// die part-way through.
using WriteHook = std::function<void(std::size_t written, std::size_t total)>;

/// Writes tensors to path: header (magic, version, payload size, xxHash64 of the payload),
/// then the payload (a torch.load-able pickle of the dict). Writes path.tmp, fsyncs it, renames
/// it over path and fsyncs the folder, so a crash leaves either the old file or the new one.
void WriteCheckpointFile(const std::string& path,
                         const std::map<std::string, torch::Tensor>& tensors,
                         const WriteHook& hook = nullptr);
/// Reads and verifies a checkpoint file; throws CheckpointError naming the file.
std::map<std::string, torch::Tensor> ReadCheckpointFile(const std::string& path);

/// The checkpoints of one run: DIR/step_XXXXXXXXX.ckpt and DIR/latest (the newest's name).
class CheckpointDir {
 public:
  explicit CheckpointDir(std::string dir);
  const std::string& dir() const { return dir_; }

  /// Writes step's checkpoint, moves `latest` to it, and deletes all but the newest keep.
  /// Returns its path.
  std::string Save(int64_t step, const std::map<std::string, torch::Tensor>& tensors, int keep,
                   const WriteHook& hook = nullptr);
  /// Steps that have a checkpoint file, newest first.
  std::vector<int64_t> Steps() const;
  /// The path of step's checkpoint.
  std::string PathFor(int64_t step) const;

  /// A loaded checkpoint and where it came from.
  struct Loaded {
    std::string path;
    std::map<std::string, torch::Tensor> tensors;
  };
  /// The newest checkpoint that reads and verifies, starting from `latest`. Each one refused on
  /// the way is reported to warn with the reason. Empty when there is none.
  std::optional<Loaded> LoadLatestValid(const std::function<void(const std::string&)>& warn) const;

 private:
  std::string dir_;
};

}  // namespace ddpm
