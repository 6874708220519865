#include "run/run_log.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>

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

CsvLog::CsvLog(const std::string& path, const std::string& header, bool append) {
  const bool fresh = !append || !std::filesystem::exists(path);
  out_.open(path, fresh ? std::ios::trunc : std::ios::app);
  if (!out_) throw std::runtime_error(path + ": cannot open for writing");
  if (fresh) {
    out_ << header << "\n";
    out_.flush();
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

void StepWindow::ReadPending(int64_t last_step, int rank) {
  if (pending_steps_ == 0) return;
  const StepValues v = ReadStepValues(pending_);
  pending_.zero_();
  const int64_t first = last_step - pending_steps_ + 1;
  if (!std::isfinite(v.loss)) {
    throw std::runtime_error(
        "training diverged: the loss is not finite (" + std::to_string(v.loss) + ") in " +
        (pending_steps_ == 1 ? "step " + std::to_string(first)
                             : "steps " + std::to_string(first) + "-" + std::to_string(last_step)) +
        " on rank " + std::to_string(rank));
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
}

void StepWindow::Reset() {
  values_ = StepValues{};
  steps_ = 0;
  allreduce_seconds_ = 0;
  overlap_ = 0;
}

}  // namespace ddpm
