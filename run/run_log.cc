#include "run/run_log.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "base/errors.h"
#include "base/text.h"

namespace ddpm {

ProgressMode ParseProgressMode(const std::string& text, const std::string& origin) {
  if (text == "auto") return ProgressMode::kAuto;
  if (text == "bar") return ProgressMode::kBar;
  if (text == "lines") return ProgressMode::kLines;
  if (text == "off") return ProgressMode::kOff;
  throw ConfigError(origin + ": '" + text + "' is not one of: auto, bar, lines, off");
}

ProgressMode ResolveProgressMode(ProgressMode mode) {
  if (mode != ProgressMode::kAuto) return mode;
  // Launchers give each rank a pseudo-terminal whatever the job's output is bound for; a bar
  // there would write a carriage-return line per step into the log.
  for (const char* launcher : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_PROCID"}) {
    if (std::getenv(launcher) != nullptr) return ProgressMode::kLines;
  }
  return isatty(STDOUT_FILENO) != 0 ? ProgressMode::kBar : ProgressMode::kLines;
}

RunConsole::RunConsole(bool lead, ProgressMode mode)
    : lead_(lead), progress_(ResolveProgressMode(mode)) {}

void RunConsole::ProgressBar(int64_t step, int64_t total, double loss, double images_per_second,
                             double eta_seconds) const {
  if (!lead_ || progress_ != ProgressMode::kBar) return;
  constexpr int kWidth = 30;
  const int filled = total > 0 ? static_cast<int>(kWidth * step / total) : kWidth;
  std::printf("\r\033[K[%s%s] %lld/%lld | loss %.4f | %.1f img/s | eta %s",
              std::string(filled, '#').c_str(), std::string(kWidth - filled, '.').c_str(),
              static_cast<long long>(step), static_cast<long long>(total), loss, images_per_second,
              FormatDuration(eta_seconds).c_str());
  std::fflush(stdout);
}

CsvLog::CsvLog(const std::string& path, const std::string& header, bool append) : path_(path) {
  bool fresh = !append || !std::filesystem::exists(path);
  if (!fresh && std::filesystem::is_regular_file(path)) {
    // A file of an older version's columns is kept aside rather than appended to.
    std::ifstream existing(path);
    std::string first;
    std::getline(existing, first);
    if (first != header) {
      std::error_code error;
      std::filesystem::rename(path, path + ".old", error);
      if (error) {
        throw FileError(path +
                        ": its columns differ from this version's and it cannot be moved aside "
                        "to " +
                        path + ".old: " + error.message());
      }
      LogWarning(
          "ddpm: %s had other columns (an older version's); kept as %s.old, and a new one starts",
          path.c_str(), path.c_str());
      fresh = true;
    }
  }
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | (fresh ? O_TRUNC : O_APPEND), 0644);
  if (fd_ < 0) {
    throw FileError(ErrnoMessage(path + ": cannot open for writing"));
  }
  if (fresh) Append(header + "\n");
}

CsvLog::~CsvLog() {
  if (fd_ >= 0) ::close(fd_);
}

CsvLog::CsvLog(CsvLog&& other) noexcept : path_(std::move(other.path_)), fd_(other.fd_) {
  other.fd_ = -1;
}

CsvLog& CsvLog::operator=(CsvLog&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    path_ = std::move(other.path_);
    fd_ = other.fd_;
    other.fd_ = -1;
  }
  return *this;
}

void CsvLog::Append(const std::string& text) {
  const off_t before = ::lseek(fd_, 0, SEEK_END);
  std::size_t written = 0;
  while (written < text.size()) {
    const ssize_t got = ::write(fd_, text.data() + written, text.size() - written);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      const int error = got < 0 ? errno : EIO;
      // Take back the part of the row that went out: the file keeps whole rows only.
      const bool restored = before >= 0 && ::ftruncate(fd_, before) == 0;
      throw FileError(ErrnoMessage(path_ + ": cannot append a row", error) +
                      (restored ? "" : " (and the part written could not be removed)"));
    }
    written += static_cast<std::size_t>(got);
  }
}

StepWindow::StepWindow(torch::Device device)
    : pending_(torch::zeros({kStepValues}, torch::TensorOptions(device).dtype(torch::kFloat64))) {}

void StepWindow::Add(const torch::Tensor& values, double allreduce_seconds,
                     double overlap_fraction) {
  pending_.add_(values);
  ++pending_steps_;
  ++steps_;
  allreduce_seconds_ += allreduce_seconds;
  overlap_ += overlap_fraction;
}

std::string StepWindow::ReadPending(int64_t last_step, int rank) {
  if (pending_steps_ == 0) return "";
  const StepValues v = ReadStepValues(pending_);
  pending_.zero_();
  const int64_t first = last_step - pending_steps_ + 1;
  if (!std::isfinite(v.loss)) {
    pending_steps_ = 0;
    return "the loss is not finite (" + std::to_string(v.loss) + ") in " +
           (first == last_step
                ? "step " + std::to_string(first)
                : "steps " + std::to_string(first) + "-" + std::to_string(last_step)) +
           " on rank " + std::to_string(rank);
  }
  values_.loss += v.loss;
  values_.grad_norm += v.grad_norm;
  for (int q = 0; q < kTimestepQuartiles; ++q) {
    values_.quartile_loss_sum[q] += v.quartile_loss_sum[q];
    values_.quartile_count[q] += v.quartile_count[q];
  }
  last_read_loss_ = v.loss / static_cast<double>(pending_steps_);
  last_read_grad_norm_ = v.grad_norm / static_cast<double>(pending_steps_);
  pending_steps_ = 0;
  return "";
}

void StepWindow::DropPending() {
  pending_.zero_();
  pending_steps_ = 0;
}

void StepWindow::Reset() {
  values_ = StepValues{};
  steps_ = 0;
  allreduce_seconds_ = 0;
  overlap_ = 0;
}

}  // namespace ddpm
