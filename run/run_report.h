// What a training run reports as it trains: the log line of each window of steps with its
// metrics.csv row and on_log report, each evaluation's eval.csv row, the incidents (rollbacks,
// failed checkpoints) reported between log lines, and the clock of training time that rates and
// ETAs are measured on.
#pragma once

#include <torch/torch.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

#include "base/errors.h"
#include "config/config.h"
#include "run/run.h"
#include "run/run_checkpoints.h"
#include "run/run_control.h"
#include "run/run_log.h"

namespace ddpm {

/// The run's incidents over its life, as on_log reports them.
struct RunCounters {
  int64_t rollbacks = 0;
  int64_t checkpoint_failures = 0;
};

/// One rank's reports of a run: every rank keeps the clock and the window of step values, rank 0
/// alone writes and calls the callbacks. Used from the training thread.
class RunReport {
 public:
  using Clock = std::chrono::steady_clock;

  RunReport(const Config& config, const TrainOptions& options, const RunConsole& console,
            const FaultInjection& fault, torch::Device device, int world);

  /// Rank 0: opens metrics.csv, or eval.csv (appending when resumed).
  void OpenMetrics(bool resumed);
  void OpenEval(bool resumed);
  /// Starts the clock of training time; first_step is the step this process starts from.
  void Start(int64_t first_step);
  /// The steps' values that the next log line sums up.
  StepWindow& window() { return window_; }
  /// One more step trained by this process.
  void CountStep() { ++steps_trained_; }
  /// Says once when the timestep sampler turns to drawing from its loss history after step.
  void NoteSampler(bool warm, int64_t step);
  /// Between log lines: redraws the progress bar at step.
  void Bar(int64_t step, double loss) const;
  /// Before the log's collectives at step: the window's rate, the elapsed time and the ETA.
  void MeasureWindow(int64_t step, int64_t global_batch);
  /// The log line of the window that ends at step, rank 0's on_log and its metrics.csv row
  /// (unless may_write says no: a superseded attempt adds no row); then the next window starts.
  void Log(int64_t step, double loss, double lr,
           const std::array<double, kTimestepQuartiles>& loss_by_quartile,
           const RunCounters& counters, const std::function<bool()>& may_write);
  /// Rank 0: the evaluation's eval.csv row; a failed write is a warning.
  void EvalRow(const EvalReport& report);
  /// An incident in words at step: kept for the next on_log, or reported at once.
  void Incident(const std::string& text, bool report_now, int64_t step,
                const RunCounters& counters);
  /// Evaluation is not training: keeps spent out of images/s, elapsed and the ETA.
  void ExcludeFromTraining(Clock::duration spent);
  /// Forgets the window's steps (a rollback discards them) and starts a new window now.
  void RestartWindow();
  /// Seconds of training time since Start.
  double elapsed() const;
  /// Steps this process trained (a rollback does not take them back): the ETA's rate.
  int64_t steps_trained() const { return steps_trained_; }
  /// The step this process started from.
  int64_t first_step() const { return first_step_; }

  /// Runs write (a sample grid, a CSV row) and turns its failure into a warning: those never
  /// take training down. DDPM_FAULT_DISK_FULL makes it fail at the steps it covers.
  template <typename Write>
  void Tolerate(const char* what, int64_t step, Write&& write) const {
    try {
      if (fault_.DiskFull(step)) throw FileError(InjectedDiskFull());
      write();
    } catch (const std::exception& error) {
      console_.Say(
          "ddpm: warning: the %s of step %lld could not be written (%s); training goes on\n", what,
          static_cast<long long>(step), error.what());
    }
  }

 private:
  const Config& config_;
  const TrainOptions& options_;
  const RunConsole& console_;
  const FaultInjection& fault_;
  const int world_;
  CsvLog metrics_csv_;
  CsvLog eval_csv_;
  StepWindow window_;
  LogMetrics last_log_;
  std::string last_incident_;
  Clock::time_point start_, window_start_;
  double last_rate_ = 0;
  double log_elapsed_ = 0;
  double log_eta_ = 0;
  int64_t steps_trained_ = 0;
  int64_t first_step_ = 0;
  /// Whether the loss-aware timestep sampler was drawing from its history after the last step.
  bool sampler_warm_ = false;
};

}  // namespace ddpm
