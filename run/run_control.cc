#include "run/run_control.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <thread>
#include <vector>

#include "base/file_io.h"
#include "base/log.h"
#include "base/signals.h"
#include "base/text.h"
#include "run/run.h"
#include "trainer/image_io.h"

namespace ddpm {
namespace {

std::atomic<int> g_stop_signal{0};
std::atomic<bool> g_checkpoint_requested{false};
std::atomic<bool> g_sample_requested{false};
// Seconds a stopping process may take to reach its checkpoint before SIGALRM ends it: a rank
// stuck in a collective (mpirun's SIGTERM after a peer aborted) must not outlive the job.
std::atomic<unsigned> g_stop_grace_seconds{600};

extern "C" void OnStopSignal(int signal) {
  if (g_stop_signal.exchange(signal) != 0) _exit(128 + signal);
  alarm(g_stop_grace_seconds.load());
}

extern "C" void OnRequestSignal(int signal) {
  if (signal == SIGUSR1) g_checkpoint_requested = true;
  if (signal == SIGUSR2) g_sample_requested = true;
}

// The control word's bits; the stop signal sits above them.
constexpr int64_t kStop = 1;
constexpr int64_t kCheckpoint = 2;
constexpr int64_t kSample = 4;
constexpr int64_t kRequested = 8;
constexpr int64_t kAbandon = 16;
constexpr int64_t kSuperseded = 32;
constexpr int64_t kFailed = 64;
constexpr int kSignalShift = 8;

}  // namespace

int64_t ControlDecision::Encode() const {
  return (stop ? kStop : 0) | (checkpoint ? kCheckpoint : 0) | (sample ? kSample : 0) |
         (requested ? kRequested : 0) | (abandon ? kAbandon : 0) | (superseded ? kSuperseded : 0) |
         (failed ? kFailed : 0) | (static_cast<int64_t>(signal) << kSignalShift);
}

ControlDecision ControlDecision::Decode(int64_t word) {
  ControlDecision decision;
  decision.stop = (word & kStop) != 0;
  decision.checkpoint = (word & kCheckpoint) != 0;
  decision.sample = (word & kSample) != 0;
  decision.requested = (word & kRequested) != 0;
  decision.abandon = (word & kAbandon) != 0;
  decision.superseded = (word & kSuperseded) != 0;
  decision.failed = (word & kFailed) != 0;
  decision.signal = static_cast<int>(word >> kSignalShift);
  return decision;
}

RunSignals::RunSignals(double grace_seconds) {
  g_stop_grace_seconds = static_cast<unsigned>(std::max(1.0, std::ceil(grace_seconds)));
  g_stop_signal = 0;
  g_checkpoint_requested = false;
  g_sample_requested = false;
  stop_ = std::make_unique<SignalScope>(std::initializer_list<int>{SIGINT, SIGTERM}, OnStopSignal);
  requests_ =
      std::make_unique<SignalScope>(std::initializer_list<int>{SIGUSR1, SIGUSR2}, OnRequestSignal);
}

RunSignals::~RunSignals() { alarm(0); }

ControlDecision RunSignals::Take() {
  ControlDecision decision;
  decision.checkpoint = g_checkpoint_requested.exchange(false);
  decision.sample = g_sample_requested.exchange(false);
  decision.signal = g_stop_signal.load();
  decision.stop = decision.signal != 0;
  return decision;
}

FaultInjection FaultInjection::FromEnvironment(int rank) {
  FaultInjection fault;
  if (const char* disk = std::getenv("DDPM_FAULT_DISK_FULL"); disk != nullptr) {
    long long from = 0, to = 0;
    char end = 0;
    if (std::sscanf(disk, "%lld-%lld%c", &from, &to, &end) != 2 || from < 0 || to < from) {
      throw std::invalid_argument(
          std::string("DDPM_FAULT_DISK_FULL: expected FROM-TO (steps, FROM <= TO), got '") + disk +
          "'");
    }
    fault.disk_full_from_ = from;
    fault.disk_full_to_ = to;
  }
  if (const char* planted = std::getenv("DDPM_FAULT_EVAL_SCORES"); planted != nullptr) {
    for (const std::string& item : SplitList(planted)) {
      long long step = 0;
      double score = 0;
      char end = 0;
      if (std::sscanf(item.c_str(), "%lld:%lf%c", &step, &score, &end) != 2 || step < 1) {
        throw std::invalid_argument(
            std::string("DDPM_FAULT_EVAL_SCORES: expected STEP:SCORE,... (steps >= 1), got '") +
            planted + "'");
      }
      fault.planted_scores_[step] = score;
    }
  }
  if (const char* kill = std::getenv("DDPM_FAULT_KILL_BEFORE_BEST"); kill != nullptr) {
    long long step = 0;
    char end = 0;
    if (std::sscanf(kill, "%lld%c", &step, &end) != 1 || step < 1) {
      throw std::invalid_argument(
          std::string("DDPM_FAULT_KILL_BEFORE_BEST: expected a step >= 1, got '") + kill + "'");
    }
    if (rank == 0) fault.kill_before_best_ = step;
  }
  const char* text = std::getenv("DDPM_FAULT_INJECT");
  if (text == nullptr) return fault;
  int fault_rank = -1;
  long long fault_step = -1;
  int consumed = 0;
  const std::string all(text);
  if (std::sscanf(text, "rank=%d,step=%lld%n", &fault_rank, &fault_step, &consumed) != 2 ||
      (all.substr(consumed) != "" && all.substr(consumed) != ",hang" &&
       all.substr(consumed) != ",nan")) {
    throw std::invalid_argument(
        std::string("DDPM_FAULT_INJECT: expected rank=R,step=S[,hang|,nan], got '") + text + "'");
  }
  if (fault_rank == rank) {
    const std::string kind = all.substr(consumed);
    fault.step_ = fault_step;
    fault.hang_ = kind == ",hang";
    if (kind == ",nan") fault.input_scale_ = std::numeric_limits<double>::quiet_NaN();
  }
  return fault;
}

std::optional<double> FaultInjection::PlantedScore(int64_t step) const {
  const auto found = planted_scores_.find(step);
  if (found == planted_scores_.end()) return std::nullopt;
  return found->second;
}

double FaultInjection::TakeInputScale(int64_t next_step) {
  if (input_scale_ == 1 || input_taken_ || next_step != step_) return 1;
  input_taken_ = true;
  LogWarning("ddpm: DDPM_FAULT_INJECT: input x %g at step %lld\n", input_scale_,
             static_cast<long long>(next_step));
  return input_scale_;
}

void FaultInjection::MaybeFail(int64_t next_step) const {
  if (next_step != step_ || input_scale_ != 1) return;
  if (hang_) {
    LogWarning("ddpm: DDPM_FAULT_INJECT: hanging before step %lld\n",
               static_cast<long long>(step_));
    while (true) std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  throw RunError("DDPM_FAULT_INJECT: injected failure before step " + std::to_string(step_));
}

std::string LossSpikeDetector::Check(double loss, int64_t step) {
  if (factor_ <= 0 || !std::isfinite(loss)) return "";
  constexpr std::size_t kHistory = 21, kEnough = 5;
  if (recent_.size() >= kEnough) {
    std::vector<double> sorted = recent_;
    std::nth_element(sorted.begin(), sorted.begin() + sorted.size() / 2, sorted.end());
    const double median = sorted[sorted.size() / 2];
    if (loss > factor_ * median) {
      char text[200];
      std::snprintf(text, sizeof(text),
                    "a loss spike at step %lld: %.4g is above %g x %.4g, the median of the last "
                    "%zu logged losses (train.spike_factor)",
                    static_cast<long long>(step), loss, factor_, median, recent_.size());
      return text;
    }
  }
  recent_.push_back(loss);
  if (recent_.size() > kHistory) recent_.erase(recent_.begin());
  return "";
}

// Progress is 2 x step + 1 inside a step, 2 x step after it.
RankProgress::RankProgress(const std::string& run_dir, int rank, int world)
    : dir_(run_dir + "/ranks"), world_(world) {
  if (world_ < 2) return;
  MakeDirectories(dir_);
  fd_ = ::open(PathOf(rank).c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
}

RankProgress::~RankProgress() {
  if (fd_ >= 0) ::close(fd_);
}

void RankProgress::Inside(int64_t step) { Write(2 * step + 1); }

void RankProgress::Finished(int64_t step) { Write(2 * step); }

std::string RankProgress::Describe() const {
  std::string text = "progress:";
  int64_t lowest = std::numeric_limits<int64_t>::max(), highest = -1;
  std::vector<int64_t> values(world_, -1);
  for (int r = 0; r < world_; ++r) {
    std::ifstream in(PathOf(r));
    long long value = -1;
    if (in >> value) values[r] = value;
    lowest = std::min<int64_t>(lowest, values[r]);
    highest = std::max<int64_t>(highest, values[r]);
    text += std::string(r ? "," : "") + " rank " + std::to_string(r) +
            (values[r] < 0 ? " unknown"
                           : (values[r] % 2 ? " inside step " : " after step ") +
                                 std::to_string(values[r] / 2));
  }
  if (lowest < highest) {
    text += "; behind:";
    for (int r = 0; r < world_; ++r) {
      if (values[r] == lowest) text += " rank " + std::to_string(r);
    }
  }
  return text;
}

std::string RankProgress::PathOf(int rank) const { return dir_ + "/rank-" + std::to_string(rank); }

void RankProgress::Write(int64_t value) {
  if (fd_ < 0) return;
  char text[32];
  const int n = std::snprintf(text, sizeof(text), "%-20lld\n", static_cast<long long>(value));
  if (::pwrite(fd_, text, n, 0) != n) {
    ::close(fd_);
    fd_ = -1;
  }
}

}  // namespace ddpm
