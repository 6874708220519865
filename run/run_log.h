// What a run reports as it trains: rank 0's lines on stdout (a progress bar on a terminal,
// plain lines in a log), the CSV files of the run directory, and the window of step values
// that each log line sums up.
#pragma once

#include <torch/torch.h>

#include <array>
#include <cstdint>
#include <cstdio>
#include <string>

#include "base/csv.h"
#include "base/log.h"
#include "config/config.h"
#include "run/run.h"
#include "trainer/trainer.h"

namespace ddpm {

/// Rank 0's voice: its info lines go to the logger; other ranks say nothing (their warnings
/// and errors go to the logger themselves). With a progress bar, a line first clears the bar
/// it replaces.
class RunConsole {
 public:
  RunConsole(bool lead, ProgressMode mode);
  bool lead() const { return lead_; }
  /// kBar, kLines or kOff, as resolved for this stdout.
  ProgressMode progress() const { return progress_; }
  /// One printf-style line at info level, through the logger (the caller ends it with a
  /// newline). In bar mode it first clears the bar it replaces.
  template <typename... Args>
  void Say(const char* format, Args... args) const {
    if (!lead_ || !LogEnabled(LogLevel::kInfo)) return;
    if (progress_ == ProgressMode::kBar) std::printf("\r\033[K");
    Logf(LogLevel::kInfo, format, args...);
  }
  /// A progress message: said unless progress is off.
  template <typename... Args>
  void Progress(const char* format, Args... args) const {
    if (progress_ != ProgressMode::kOff) Say(format, args...);
  }
  /// Redraws the one-line progress bar (in bar mode only).
  void ProgressBar(int64_t step, int64_t total, double loss, double images_per_second,
                   double eta_seconds) const;

 private:
  bool lead_;
  ProgressMode progress_;
};

/// A CSV file of the run directory, written by rank 0 a row at a time with one write each, so
/// that a killed run keeps every row it logged and a failed write (a full disk) leaves no part
/// of a row behind. Other ranks hold a closed one.
class CsvLog {
 public:
  CsvLog() = default;
  /// Appends to path when `append` and it exists with the same header (a resumed run);
  /// otherwise starts it anew with the header line (a file with another header, an older
  /// version's, is moved to path.old first). Throws FileError naming path when it cannot.
  CsvLog(const std::string& path, const std::string& header, bool append);
  ~CsvLog();
  CsvLog(CsvLog&& other) noexcept;
  CsvLog& operator=(CsvLog&& other) noexcept;
  CsvLog(const CsvLog&) = delete;
  CsvLog& operator=(const CsvLog&) = delete;

  /// Writes one row, each field as an ostream writes it and quoted as RFC 4180 asks (CsvRow).
  /// Throws FileError naming the file and the error when the row could not be written whole;
  /// the file is then as before.
  template <typename... Fields>
  void Row(const Fields&... fields) {
    if (fd_ < 0) return;
    CsvRow row;
    (row.Streamed(fields), ...);
    Append(row.Line());
  }
  const std::string& path() const { return path_; }

 private:
  void Append(const std::string& text);

  std::string path_;
  int fd_ = -1;
};

/// The steps' values (loss, grad norm, per-quartile sums and counts) as they add up: on the
/// device between reads, so that no step waits for the GPU, and on the host over the log
/// window once read.
class StepWindow {
 public:
  explicit StepWindow(torch::Device device);
  /// Adds one step's StepStats::values (on the device) and its all-reduce costs.
  void Add(const torch::Tensor& values, double allreduce_seconds, double overlap_fraction);
  /// Reads the values added since the last read into the window (waits for the device). A loss
  /// that is not finite is kept out of the window and returned in words, naming the steps up to
  /// last_step and the rank; "" otherwise.
  std::string ReadPending(int64_t last_step, int rank);
  /// Forgets the values not yet read (a rollback discards the steps they came from).
  void DropPending();
  /// Steps in the window.
  int64_t steps() const { return steps_; }
  /// Means over the window's steps.
  double mean_loss() const { return values_.loss / static_cast<double>(steps_); }
  double mean_grad_norm() const { return values_.grad_norm / static_cast<double>(steps_); }
  double mean_allreduce_seconds() const { return allreduce_seconds_ / steps_; }
  double mean_overlap() const { return overlap_ / steps_; }
  const StepValues& values() const { return values_; }
  /// Mean loss and gradient norm of the steps the last ReadPending read.
  double last_read_loss() const { return last_read_loss_; }
  double last_read_grad_norm() const { return last_read_grad_norm_; }
  /// Empties the window (after a log line).
  void Reset();

 private:
  torch::Tensor pending_;
  int64_t pending_steps_ = 0;
  StepValues values_{};
  int64_t steps_ = 0;
  double allreduce_seconds_ = 0;
  double overlap_ = 0;
  double last_read_loss_ = 0;
  double last_read_grad_norm_ = 0;
};

}  // namespace ddpm
