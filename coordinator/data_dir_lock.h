// One coordinator per data directory: an exclusive flock(2) on DATA_DIR/LOCK for the process's
// life, the file recording who holds it. The kernel drops the lock when the holder exits, however
// it exits, so a killed coordinator never blocks the next start.
#pragma once

#include <stdexcept>
#include <string>

namespace ddpm {

/// Another process holds the data directory; the message names it (pid, host, since when).
class DataDirInUse : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Holds DATA_DIR/LOCK exclusively from construction to destruction.
class DataDirLock {
 public:
  /// Takes the lock without waiting and records "pid P", "host H" and "since T" in the file;
  /// throws DataDirInUse naming the holder when another open file holds it, std::runtime_error
  /// naming the file when it cannot be opened or locked.
  explicit DataDirLock(const std::string& data_dir);
  ~DataDirLock();
  DataDirLock(const DataDirLock&) = delete;
  DataDirLock& operator=(const DataDirLock&) = delete;

  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
};

}  // namespace ddpm
