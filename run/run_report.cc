#include "run/run_report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "base/text.h"

namespace ddpm {
namespace {

constexpr char kMetricsHeader[] =
    "step,loss,grad_norm,lr,images_per_second,elapsed_seconds,allreduce_seconds,"
    "overlap_fraction,loss_q0,loss_q1,loss_q2,loss_q3";
constexpr char kEvalHeader[] =
    "step,fid,inception_score,inception_score_std,num_samples,sampler,sampling_steps,"
    "eval_seconds,regularized,inception_sha256,reference_sha256,nll_bits_per_dim,"
    "nll_std_error,nll_images,nll_timesteps,nll_data,is_logits,guidance,kid,kid_std,"
    "kid_subset_size,precision,recall,density,coverage,prd_reference_count";

// A field of eval.csv: empty for what an evaluation did not measure (CsvLog quotes it).
template <typename T>
std::string Field(bool measured, const T& value) {
  if (!measured) return "";
  std::ostringstream out;
  out << value;
  return out.str();
}

}  // namespace

RunReport::RunReport(const Config& config, const TrainOptions& options, const RunConsole& console,
                     const FaultInjection& fault, torch::Device device, int world)
    : config_(config),
      options_(options),
      console_(console),
      fault_(fault),
      world_(world),
      window_(device) {}

void RunReport::OpenMetrics(bool resumed) {
  if (console_.lead())
    metrics_csv_ = CsvLog(options_.run_dir + "/metrics.csv", kMetricsHeader, resumed);
}

void RunReport::OpenEval(bool resumed) {
  if (console_.lead()) eval_csv_ = CsvLog(options_.run_dir + "/eval.csv", kEvalHeader, resumed);
}

void RunReport::Start(int64_t first_step) {
  first_step_ = first_step;
  start_ = window_start_ = Clock::now();
}

double RunReport::elapsed() const { return SecondsSince(start_); }

void RunReport::NoteSampler(bool warm, int64_t step) {
  if (warm == sampler_warm_) return;
  sampler_warm_ = warm;
  if (sampler_warm_) {
    console_.Say(
        "ddpm: timestep sampler: every timestep has its last %d losses at step %lld; t is "
        "drawn in proportion to sqrt(E[L_t^2]) from here\n",
        TimestepSampler::kHistory, static_cast<long long>(step));
  }
}

void RunReport::Bar(int64_t step, double loss) const {
  const int64_t total = config_.train.steps;
  console_.ProgressBar(step, total, loss, last_rate_,
                       SecondsSince(start_) / steps_trained_ * (total - step));
}

void RunReport::MeasureWindow(int64_t step, int64_t global_batch) {
  log_elapsed_ = SecondsSince(start_);
  log_eta_ = log_elapsed_ / static_cast<double>(std::max<int64_t>(steps_trained_, 1)) *
             static_cast<double>(config_.train.steps - step);
  last_rate_ = window_.steps() * global_batch / std::max(SecondsSince(window_start_), 1e-9);
}

void RunReport::Log(int64_t step, double loss, double lr,
                    const std::array<double, kTimestepQuartiles>& loss_by_quartile,
                    const RunCounters& counters, const std::function<bool()>& may_write) {
  const int64_t total = config_.train.steps;
  std::string comm_text;
  if (world_ > 1) {
    char text[96];
    std::snprintf(text, sizeof(text), " | all-reduce %.1f ms, %.0f%% hidden",
                  1000 * window_.mean_allreduce_seconds(), 100 * window_.mean_overlap());
    comm_text = text;
  }
  console_.Progress(
      "step %lld/%lld | loss %.4f | grad %.3f | lr %.2e | %.1f img/s%s | elapsed %s | eta %s\n",
      static_cast<long long>(step), static_cast<long long>(total), loss, window_.mean_grad_norm(),
      lr, last_rate_, comm_text.c_str(), FormatDuration(log_elapsed_).c_str(),
      FormatDuration(log_eta_).c_str());
  if (console_.lead() && options_.on_log) {
    LogMetrics log;
    log.step = step;
    log.total_steps = total;
    log.loss = loss;
    log.grad_norm = window_.mean_grad_norm();
    log.lr = lr;
    log.images_per_second = last_rate_;
    log.elapsed_seconds = log_elapsed_;
    log.eta_seconds = log_eta_;
    log.loss_by_quartile = loss_by_quartile;
    log.rollbacks = counters.rollbacks;
    log.checkpoint_failures = counters.checkpoint_failures;
    log.last_incident = last_incident_;
    last_log_ = log;
    options_.on_log(log);
  }
  // A superseded attempt never adds to the current attempt's metrics.csv.
  if (console_.lead() && may_write()) {
    std::array<std::string, kTimestepQuartiles> quartiles;
    for (int q = 0; q < kTimestepQuartiles; ++q) {
      if (std::isnan(loss_by_quartile[q])) continue;  // no sample fell in this quarter
      std::ostringstream field;
      field << loss_by_quartile[q];
      quartiles[q] = field.str();
    }
    Tolerate("metrics.csv row", step, [&] {
      metrics_csv_.Row(step, loss, window_.mean_grad_norm(), lr, last_rate_, log_elapsed_,
                       window_.mean_allreduce_seconds(), window_.mean_overlap(), quartiles[0],
                       quartiles[1], quartiles[2], quartiles[3]);
    });
  }
  window_.Reset();
  window_start_ = Clock::now();
}

void RunReport::EvalRow(const EvalReport& report) {
  Tolerate("eval.csv row", report.step, [&] {
    const bool f = report.has_fid(), n = report.has_nll, k = report.has_kid, p = report.has_prd;
    eval_csv_.Row(report.step, Field(f, report.fid), Field(f, report.inception_score),
                  Field(f, report.inception_score_std), Field(f, report.num_samples),
                  Field(f, report.sampler), Field(f, report.sampling_steps), report.seconds,
                  Field(f, report.regularized), Field(f, report.inception_sha256),
                  Field(f, report.reference_sha256), Field(n, report.nll_bits_per_dim),
                  Field(n, report.nll_std_error), Field(n, report.nll_images),
                  Field(n, report.nll_timesteps), Field(n, report.nll_data),
                  Field(f, report.is_logits), Field(f && report.guided, report.guidance),
                  Field(k, report.kid), Field(k, report.kid_std), Field(k, report.kid_subset_size),
                  Field(p, report.precision), Field(p, report.recall), Field(p, report.density),
                  Field(p, report.coverage), Field(p, report.prd_reference_count));
  });
}

void RunReport::Incident(const std::string& text, bool report_now, int64_t step,
                         const RunCounters& counters) {
  last_incident_ = text;
  if (!report_now || !console_.lead() || !options_.on_log) return;
  LogMetrics log = last_log_;
  log.step = step;
  log.total_steps = config_.train.steps;
  log.rollbacks = counters.rollbacks;
  log.checkpoint_failures = counters.checkpoint_failures;
  log.last_incident = last_incident_;
  options_.on_log(log);
}

void RunReport::ExcludeFromTraining(Clock::duration spent) {
  start_ += spent;
  window_start_ += spent;
}

void RunReport::RestartWindow() {
  window_.DropPending();
  window_.Reset();
  window_start_ = Clock::now();
}

}  // namespace ddpm
