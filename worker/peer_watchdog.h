// Every rank watches the other ranks of its group that run on its own host: a rank that dies
// on its own (kill -9, the OOM killer, a crash) is noticed within a tenth of a second, and its
// peer tells the coordinator at once, naming it, instead of the run standing still until the
// heartbeat timeout or until the launcher has torn the job down. Torch-free.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace ddpm {

/// A process as its peers name it: its pid and its start time (clock ticks after boot, from
/// /proc/PID/stat), which tells it from a later process that reuses the pid.
struct ProcessId {
  pid_t pid = 0;
  int64_t start_ticks = -1;
  /// "PID:TICKS", and back (a malformed text gives pid 0).
  std::string ToText() const;
  static ProcessId FromText(const std::string& text);
  bool operator==(const ProcessId& other) const {
    return pid == other.pid && start_ticks == other.start_ticks;
  }
};

/// This process's ProcessId.
ProcessId ThisProcess();

/// Whether the process is gone: no such pid, one that has exited and not yet been reaped (a
/// zombie), or another process that took the pid since.
bool ProcessGone(const ProcessId& process);

/// The process pid now (start_ticks -1 when there is none, or no /proc).
ProcessId ProcessOf(pid_t pid);

/// Watches, from its own thread, the ranks whose host is this rank's host and whose process
/// this rank can see as the same process (a peer in another pid namespace is not watched: its
/// pid is not, or is another process, here).
class PeerWatchdog {
 public:
  /// on_death(rank, pid, host) is called once, from the watchdog's thread, for the first peer
  /// found gone. hosts and processes are indexed by rank.
  PeerWatchdog(int rank, const std::vector<std::string>& hosts,
               const std::vector<ProcessId>& processes,
               std::function<void(int, pid_t, const std::string&)> on_death,
               std::chrono::milliseconds poll = std::chrono::milliseconds(100));
  /// Stops watching (an orderly shutdown, where peers exit on their own).
  ~PeerWatchdog();
  PeerWatchdog(const PeerWatchdog&) = delete;
  PeerWatchdog& operator=(const PeerWatchdog&) = delete;
  /// The ranks watched.
  const std::vector<int>& watched() const { return watched_; }
  void Stop();

 private:
  void Run();

  std::vector<int> watched_;
  std::vector<ProcessId> processes_;
  std::vector<std::string> hosts_;
  const std::function<void(int, pid_t, const std::string&)> on_death_;
  const std::chrono::milliseconds poll_;
  std::mutex mutex_;
  std::condition_variable changed_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace ddpm
