#include "worker/peer_watchdog.h"

#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace ddpm {

std::string ProcessId::ToText() const {
  return std::to_string(pid) + ":" + std::to_string(start_ticks);
}

ProcessId ProcessId::FromText(const std::string& text) {
  ProcessId process;
  const size_t colon = text.find(':');
  try {
    process.pid = static_cast<pid_t>(std::stol(text.substr(0, colon)));
    if (colon != std::string::npos) process.start_ticks = std::stoll(text.substr(colon + 1));
  } catch (const std::exception&) {
    process = ProcessId();
  }
  return process;
}

ProcessId ProcessOf(pid_t pid) {
  ProcessId process;
  process.pid = pid;
  // /proc/PID/stat: "PID (COMM) STATE PPID ..."; COMM may hold spaces and parentheses, so the
  // fields are counted from the last ')': STATE is field 3, the start time field 22.
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return process;
  const size_t close = line.rfind(')');
  if (close == std::string::npos) return process;
  std::istringstream fields(line.substr(close + 2));
  std::string field;
  for (int index = 3; index <= 22 && fields >> field; ++index) {
    if (index == 3 && (field == "Z" || field == "X")) return process;  // Exited: gone.
    if (index == 22) process.start_ticks = std::stoll(field);
  }
  return process;
}

ProcessId ThisProcess() { return ProcessOf(::getpid()); }

bool ProcessGone(const ProcessId& process) {
  if (::kill(process.pid, 0) != 0 && errno == ESRCH) return true;
  const ProcessId now = ProcessOf(process.pid);
  if (now.start_ticks < 0) {
    // Its /proc entry says it exited (a zombie), or there is no /proc here, where kill()'s
    // answer (alive) stands.
    return static_cast<bool>(std::ifstream("/proc/" + std::to_string(process.pid) + "/stat"));
  }
  return now.start_ticks != process.start_ticks;
}

PeerWatchdog::PeerWatchdog(int rank, const std::vector<std::string>& hosts,
                           const std::vector<ProcessId>& processes,
                           std::function<void(int, pid_t, const std::string&)> on_death,
                           std::chrono::milliseconds poll)
    : processes_(processes), hosts_(hosts), on_death_(std::move(on_death)), poll_(poll) {
  for (int peer = 0; peer < static_cast<int>(processes.size()); ++peer) {
    if (peer == rank || peer >= static_cast<int>(hosts.size()) || hosts[peer] != hosts[rank] ||
        processes[peer].pid <= 0 || processes[peer].start_ticks < 0 ||
        ProcessGone(processes[peer])) {
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
      if (!ProcessGone(processes_[peer])) continue;
      lock.unlock();
      on_death_(peer, processes_[peer].pid, hosts_[peer]);
      return;
    }
  }
}

}  // namespace ddpm
