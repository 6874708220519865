#include "worker/peer_watchdog.h"

#include <cerrno>
#include <csignal>
#include <fstream>
#include <sstream>

namespace ddpm {

bool ProcessGone(pid_t pid) {
  if (::kill(pid, 0) != 0) return errno == ESRCH;
  // /proc/PID/stat: "PID (COMM) STATE ..."; COMM may hold spaces and parentheses.
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return false;  // No /proc: trust kill().
  const size_t close = line.rfind(')');
  if (close == std::string::npos || close + 2 >= line.size()) return false;
  const char state = line[close + 2];
  return state == 'Z' || state == 'X';
}

PeerWatchdog::PeerWatchdog(int rank, const std::vector<std::string>& hosts,
                           const std::vector<pid_t>& pids,
                           std::function<void(int, pid_t, const std::string&)> on_death,
                           std::chrono::milliseconds poll)
    : pids_(pids), hosts_(hosts), on_death_(std::move(on_death)), poll_(poll) {
  for (int peer = 0; peer < static_cast<int>(pids.size()); ++peer) {
    if (peer == rank || peer >= static_cast<int>(hosts.size()) || hosts[peer] != hosts[rank] ||
        pids[peer] <= 0 || ProcessGone(pids[peer])) {
      continue;
    }
    watched_.push_back(peer);
  }
  if (!watched_.empty()) thread_ = std::thread([this] { Run(); });
}

PeerWatchdog::~PeerWatchdog() { Stop(); }

void PeerWatchdog::Stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  changed_.notify_all();
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

void PeerWatchdog::Run() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (!changed_.wait_for(lock, poll_, [&] { return stop_; })) {
    for (int peer : watched_) {
      if (!ProcessGone(pids_[peer])) continue;
      lock.unlock();
      on_death_(peer, pids_[peer], hosts_[peer]);
      return;
    }
  }
}

}  // namespace ddpm
