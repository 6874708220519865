#include "run/run_evaluations.h"

#include <optional>
#include <sstream>
#include <string>

#include "base/text.h"
#include "eval/evaluation.h"
#include "trainer/data.h"

namespace ddpm {

RunEvaluations::RunEvaluations(const Config& config, const RunConsole& console,
                               const FaultInjection& fault, torch::Device device)
    : config_(config), console_(console), fault_(fault), device_(device) {
  if (config_.eval.every > 0) evaluator_ = std::make_unique<RunEvaluator>(config_, device_);
  if (config_.eval.nll_every > 0) held_out_ = OpenHeldOut(config_);
}

RunEvaluations::~RunEvaluations() = default;

bool RunEvaluations::FidDue(int64_t step) const {
  return evaluator_ && (step % config_.eval.every == 0 || step == config_.train.steps);
}

bool RunEvaluations::NllDue(int64_t step) const {
  return held_out_.data && (step % config_.eval.nll_every == 0 || step == config_.train.steps);
}

EvalReport RunEvaluations::Measure(int64_t step, bool fid, bool nll, Trainer& trainer,
                                   Communicator& comm, EvalSelect select) {
  const auto eval_start = std::chrono::steady_clock::now();
  EvalReport report;
  report.step = step;
  if (fid) MeasureFid(report, trainer, comm);
  if (nll) MeasureNll(report, trainer, comm);
  report.seconds = SecondsSince(eval_start);
  if (const std::optional<double> planted = fault_.PlantedScore(step);
      planted && select != EvalSelect::kNone && SelectedScore(select, report)) {
    console_.Say("ddpm: DDPM_FAULT_EVAL_SCORES: step %lld's %s planted as %s\n",
                 static_cast<long long>(step), Name(select), FormatNumber(*planted).c_str());
    (select == EvalSelect::kFid   ? report.fid
     : select == EvalSelect::kKid ? report.kid
                                  : report.nll_bits_per_dim) = *planted;
  }
  return report;
}

void RunEvaluations::MeasureFid(EvalReport& report, Trainer& trainer, Communicator& comm) {
  const int64_t step = report.step;
  const auto start = std::chrono::steady_clock::now();
  console_.Say("ddpm: evaluating FID and IS of %lld EMA samples at step %lld\n",
               static_cast<long long>(config_.eval.num_samples), static_cast<long long>(step));
  int64_t reported = 0;
  report = evaluator_->Evaluate(
      trainer.diffusion(), trainer.ema_model(), comm, step, [&](int64_t done, int64_t share) {
        if (done * 10 / share > reported * 10 / share || done == share) {
          console_.Progress("ddpm: eval: rank 0 has %lld/%lld of its samples (%.0fs)\n",
                            static_cast<long long>(done), static_cast<long long>(share),
                            SecondsSince(start));
        }
        reported = done;
      });
  console_.Say(
      "ddpm: eval at step %lld: FID %.4f, IS %.4f +- %.4f (%s logits; %lld samples%s, %s %d "
      "steps, %.1fs%s; Inception sha256 %.12s, reference sha256 %.12s)\n",
      static_cast<long long>(step), report.fid, report.inception_score, report.inception_score_std,
      report.is_logits.c_str(), static_cast<long long>(report.num_samples),
      report.guided ? (", class-balanced, guidance " + FormatNumber(report.guidance)).c_str() : "",
      report.sampler.c_str(), report.sampling_steps, SecondsSince(start),
      report.regularized ? "; covariances regularized with eps" : "",
      report.inception_sha256.c_str(), report.reference_sha256.c_str());
  std::istringstream scores(DescribeKidAndPrd(report));
  for (std::string line; std::getline(scores, line);) {
    console_.Say("ddpm: eval at step %lld: %s\n", static_cast<long long>(step), line.c_str());
  }
}

void RunEvaluations::MeasureNll(EvalReport& report, Trainer& trainer, Communicator& comm) {
  const int64_t step = report.step;
  const auto start = std::chrono::steady_clock::now();
  const EvalConfig& e = config_.eval;
  console_.Say("ddpm: evaluating the bound of the EMA model on %lld %s images at step %lld\n",
               static_cast<long long>(e.nll_images), held_out_.description.c_str(),
               static_cast<long long>(step));
  BoundOptions options;
  options.num_images = e.nll_images;
  options.num_timesteps = e.nll_timesteps;
  options.variance = config_.sample.variance;
  options.seed = e.seed;
  options.batch_size = e.batch_size;
  int64_t reported = 0;
  const BoundReport bound = MeasureBound(
      trainer.diffusion(), trainer.ema_model(), *held_out_.data, options, comm, device_,
      [&](int64_t done, int64_t share) {
        if (done * 10 / share > reported * 10 / share || done == share) {
          console_.Progress(
              "ddpm: eval: rank 0 has %lld/%lld of its image-timesteps of the bound (%.0fs)\n",
              static_cast<long long>(done), static_cast<long long>(share), SecondsSince(start));
        }
        reported = done;
      });
  report.has_nll = true;
  report.nll_bits_per_dim = bound.total_mean;
  report.nll_std_error = bound.total_std_error;
  report.nll_images = bound.images;
  report.nll_data = held_out_.description;
  report.nll_timesteps = static_cast<int>(bound.timesteps.size());
  report.nll_timesteps_total = bound.timesteps_in_all;
  console_.Say(
      "ddpm: eval at step %lld: NLL %.4f +- %.4f bits/dim (%lld %s images, %s %d timesteps, "
      "%.1fs)\n",
      static_cast<long long>(step), report.nll_bits_per_dim, report.nll_std_error,
      static_cast<long long>(report.nll_images), report.nll_data.c_str(),
      bound.full() ? "all" : "a stratified estimate from", report.nll_timesteps,
      SecondsSince(start));
}

}  // namespace ddpm
