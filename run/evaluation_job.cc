#include "run/evaluation_job.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "base/errors.h"
#include "base/fence.h"
#include "base/file_io.h"
#include "base/text.h"
#include "config/checkpoint_selection.h"
#include "eval/checkpoint_sweep.h"
#include "eval/evaluation.h"
#include "eval/memorization.h"
#include "run/lead_or_all.h"
#include "run/run_log.h"
#include "run/sampling.h"
#include "trainer/checkpoint.h"
#include "trainer/communicator.h"
#include "trainer/data.h"
#include "trainer/device.h"
#include "trainer/diffusion.h"
#include "trainer/image_io.h"
#include "trainer/tensor_io.h"
#include "trainer/trainer.h"
#include "trainer/unet.h"

namespace ddpm {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// Every rank gets rank 0's values.
std::vector<int64_t> BroadcastSteps(Communicator& comm, std::vector<int64_t> values,
                                    const std::string& what) {
  if (comm.world_size() == 1) return values;
  torch::Tensor count = torch::tensor({static_cast<int64_t>(values.size())}, torch::kLong);
  comm.Broadcast(count, 0, "broadcast of the number of " + what);
  torch::Tensor data = torch::zeros({count.item<int64_t>()}, torch::kLong);
  if (comm.rank() == 0) {
    std::copy(values.begin(), values.end(), data.data_ptr<int64_t>());
  }
  if (data.numel() > 0) comm.Broadcast(data, 0, "broadcast of the " + what);
  return {data.data_ptr<int64_t>(), data.data_ptr<int64_t>() + data.numel()};
}

std::vector<int64_t> ReadPlan(const std::string& path) {
  std::vector<int64_t> steps;
  std::ifstream in(path);
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    if (line.empty()) continue;
    try {
      size_t used = 0;
      steps.push_back(std::stoll(line, &used));
      if (used != line.size()) throw std::invalid_argument("trailing text");
    } catch (const std::exception&) {
      throw FormatError(path + ": line " + std::to_string(number) + " is not a checkpoint step: '" +
                        line + "'");
    }
  }
  if (steps.empty()) throw FormatError(path + ": lists no checkpoint step");
  return steps;
}

// One rank's part of an evaluation job, in named steps: the plan, then each checkpoint's
// samples, scores, memorization report and recorded row.
class EvaluationJob {
 public:
  EvaluationJob(const Config& config, const EvaluationJobOptions& options,
                const DistributedContext& dist);
  EvaluationJobResult Run();

 private:
  int rank() const { return comm_.rank(); }
  int world() const { return comm_.world_size(); }
  /// The fence first, then the plan (chosen once) and what earlier attempts finished.
  void TakeFenceAndPlan();
  void Announce() const;
  /// Every rank reads step's EMA weights itself (the checkpoint directory is shared).
  void LoadWeights(int64_t step);
  /// Samples and scores the k-th planned checkpoint, reusing an earlier attempt's samples;
  /// false when the job was asked to stop.
  bool EvaluateCheckpoint(std::size_t k, EvalReport& report, int64_t& reused);
  /// The memorization report of step's kept samples, and its shares in report.
  void ReportMemorization(int64_t step, EvalReport& report);
  /// Rank 0 adds report to sweep.csv, sweep.png and best.txt; every rank learns if it failed.
  void Record(EvalReport& report);
  void SayResult(const EvalReport& report, int64_t reused) const;
  std::string ImagesDir(int64_t step) const { return options_.job_dir + "/" + StepName(step); }

  const Config& config_;
  const EvaluationJobOptions& options_;
  SoloCommunicator solo_;
  Communicator& comm_;
  const RunConsole console_;
  const torch::Device device_;
  const RunFence fence_;
  const std::string plan_path_, csv_path_, checkpoints_dir_;
  std::vector<int64_t> planned_;
  std::set<int64_t> finished_;
  std::vector<EvalReport> reports_;
  std::unique_ptr<RunEvaluator> evaluator_;
  std::unique_ptr<ImageDataset> memorization_train_;
  std::unique_ptr<GaussianDiffusion> diffusion_;
  UNet model_{nullptr};
  Clock::time_point start_;
  int64_t sampled_ = 0;  // by this attempt, all ranks (about), for images/s
  int64_t checkpoints_done_ = 0;
};

EvaluationJob::EvaluationJob(const Config& config, const EvaluationJobOptions& options,
                             const DistributedContext& dist)
    : config_(config),
      options_(options),
      comm_(dist.comm != nullptr ? *dist.comm : solo_),
      console_(comm_.rank() == 0, options.progress),
      device_(dist.device.empty() ? ResolveDevice(config.train) : dist.device),
      fence_(options.job_dir),
      plan_path_(options.job_dir + "/plan.txt"),
      csv_path_(options.job_dir + "/sweep.csv"),
      checkpoints_dir_(options.source_run_dir + "/checkpoints") {
  comm_.set_timeout(config.dist.timeout());
  ConfigureThreads(config.train, dist.local_ranks);
}

void EvaluationJob::TakeFenceAndPlan() {
  std::vector<int64_t> done;
  OnLeadOrAll(comm_, "take the job's fence and read its plan", [&] {
    MakeDirectories(options_.job_dir);
    fence_.Began(options_.attempt, 0);
    if (fs::exists(plan_path_)) {
      planned_ = ReadPlan(plan_path_);
    } else {
      const CheckpointSelection selection = CheckpointSelection::Parse(options_.checkpoints);
      planned_ = selection.Select(CheckpointDir(checkpoints_dir_).Steps(),
                                  "run " + options_.source_run + " (" + checkpoints_dir_ + ")");
      std::string text;
      for (int64_t step : planned_) text += std::to_string(step) + "\n";
      fence_.Check(options_.attempt, plan_path_);
      WriteFileAtomically(plan_path_, text);
    }
    reports_ = ReadSweepCsv(csv_path_);
    for (const EvalReport& report : reports_) done.push_back(report.step);
  });
  planned_ = BroadcastSteps(comm_, planned_, "planned checkpoints");
  done = BroadcastSteps(comm_, done, "checkpoints already evaluated");
  finished_ = std::set<int64_t>(done.begin(), done.end());
  checkpoints_done_ = static_cast<int64_t>(finished_.size());
}

void EvaluationJob::Announce() const {
  std::string steps_text;
  for (int64_t step : planned_)
    steps_text += (steps_text.empty() ? "" : ", ") + std::to_string(step);
  console_.Say(
      "ddpm: evaluation job %s: run %s, checkpoints %s (%zu; %zu done before), %lld samples "
      "each, %s %d steps, seed %llu, %s IS logits, on %d rank(s)\n",
      options_.job_dir.c_str(), options_.source_run.c_str(), steps_text.c_str(), planned_.size(),
      finished_.size(), static_cast<long long>(config_.eval.num_samples),
      Name(config_.eval.sampler), EvalSamplerSteps(config_),
      static_cast<unsigned long long>(config_.eval.seed), Name(config_.eval.is_logits), world());
}

void EvaluationJob::LoadWeights(int64_t step) {
  const std::string path = checkpoints_dir_ + "/" + StepName(step);
  if (!fs::exists(path)) {
    throw RunError("checkpoint step " + std::to_string(step) + " of run " + options_.source_run +
                   " is no longer on disk (" + path +
                   "; train.keep_checkpoints removes old ones unless they hold a "
                   "KEEP file)");
  }
  const ModelConfig& m = config_.model;
  const std::map<std::string, torch::Tensor> tensors = ReadCheckpoint(path);
  const std::map<std::string, torch::Tensor> weights = WeightsFromState(tensors, "ema");
  CheckLearnSigma(m, weights, path);
  CheckNumClasses(m, weights, path);
  LoadStateDict(*model_, weights, path);
  model_->to(device_);
  model_->eval();
}

bool EvaluationJob::EvaluateCheckpoint(std::size_t k, EvalReport& report, int64_t& reused) {
  const int64_t step = planned_[k];
  const ModelConfig& m = config_.model;
  const int64_t per_checkpoint = config_.eval.num_samples;
  const int64_t total = per_checkpoint * static_cast<int64_t>(planned_.size());
  const std::string images_dir = ImagesDir(step);
  MakeDirectories(images_dir);
  int64_t drawn = 0, reported = 0;
  EvaluateHooks hooks;
  hooks.reuse = [&](int64_t first, int64_t n) {
    torch::Tensor images = ReadSampleFiles(images_dir, first, n, m.in_channels, m.image_size);
    if (images.defined()) reused += n;
    return images;
  };
  hooks.keep = [&](const torch::Tensor& images, int64_t first) {
    std::vector<int64_t> indices(images.size(0));
    for (int64_t i = 0; i < images.size(0); ++i) indices[i] = first + i;
    WriteSampleFiles(images, images_dir, indices);
    drawn += images.size(0);
  };
  hooks.stop = [&] { return rank() == 0 && options_.poll_stop && options_.poll_stop(); };
  const auto progress = [&](int64_t share_done, int64_t share) {
    if (rank() != 0) return;
    const int64_t job_done = std::min(
        total, checkpoints_done_ * per_checkpoint + share_done * static_cast<int64_t>(world()));
    const double rate = (sampled_ + drawn * world()) / std::max(SecondsSince(start_), 1e-9);
    if (options_.on_progress) options_.on_progress(job_done, total, rate);
    if (share_done * 10 / share > reported * 10 / share || share_done == share) {
      console_.Progress(
          "ddpm: evaluation job: step %lld: rank 0 has %lld/%lld of its samples (%lld "
          "read back from an earlier attempt); the job %lld/%lld images, %.2f images/s, "
          "eta %s\n",
          static_cast<long long>(step), static_cast<long long>(share_done),
          static_cast<long long>(share), static_cast<long long>(reused),
          static_cast<long long>(job_done), static_cast<long long>(total), rate,
          FormatDuration((total - job_done) / std::max(rate, 1e-9)).c_str());
    }
    reported = share_done;
  };
  try {
    report = evaluator_->Evaluate(*diffusion_, model_, comm_, step, progress, hooks);
  } catch (const EvaluationStopped&) {
    return false;
  }
  sampled_ += drawn * world();
  ++checkpoints_done_;
  report.step = step;
  return true;
}

void EvaluationJob::ReportMemorization(int64_t step, EvalReport& report) {
  const ModelConfig& m = config_.model;
  // The samples as every rank kept them (all written: Evaluate ended in an all-reduce).
  const ImageFolderDataset samples(ImagesDir(step), m.image_size, m.in_channels);
  MemorizationOptions memorization;
  memorization.batch_size = config_.eval.batch_size;
  const std::vector<MemorizationSpace> spaces = MeasureMemorization(
      samples, *memorization_train_, evaluator_->inception(), comm_, device_, memorization);
  report.memorized_pixel = spaces.front().flagged;
  if (spaces.size() > 1) report.memorized_feature = spaces[1].flagged;
  if (rank() == 0) {
    WriteMemorizationReport(spaces, samples, *memorization_train_, memorization.ratio,
                            options_.job_dir + "/memorization/" + StepName(step));
  }
  console_.Say("ddpm: evaluation job: step %lld: memorization against %s: %s",
               static_cast<long long>(step), options_.memorization_train.c_str(),
               DescribeMemorization(spaces, memorization.ratio).c_str());
}

void EvaluationJob::Record(EvalReport& report) {
  OnLeadOrAll(comm_, "record the result of step " + std::to_string(report.step), [&] {
    reports_.push_back(report);
    std::sort(reports_.begin(), reports_.end(),
              [](const EvalReport& a, const EvalReport& b) { return a.step < b.step; });
    fence_.Check(options_.attempt, csv_path_);
    WriteSweepCsv(reports_, csv_path_);
    WriteSweepPlot(reports_, options_.job_dir + "/sweep.png");
    if (const std::optional<BestStatus> best =
            BestOfSweep(reports_, config_.eval.select, checkpoints_dir_)) {
      WriteBestTxt(*best, options_.job_dir + "/best.txt");
      report.best = best;
    }
    // The samples were only kept to resume from; the row is in now.
    std::error_code ignored;
    fs::remove_all(ImagesDir(report.step), ignored);
  });
}

void EvaluationJob::SayResult(const EvalReport& report, int64_t reused) const {
  const auto step = static_cast<long long>(report.step);
  console_.Say(
      "ddpm: evaluation job: step %lld: FID %.4f, IS %.4f +- %.4f (%lld samples, %lld read "
      "back by rank 0, %.0fs)\n",
      step, report.fid, report.inception_score, report.inception_score_std,
      static_cast<long long>(report.num_samples), static_cast<long long>(reused), report.seconds);
  std::istringstream scores(DescribeKidAndPrd(report));
  for (std::string line; std::getline(scores, line);) {
    console_.Say("ddpm: evaluation job: step %lld: %s\n", step, line.c_str());
  }
  if (report.best) {
    console_.Say("ddpm: evaluation job: the best so far: step %lld, %s %.6g (best.txt)\n",
                 static_cast<long long>(report.best->step), report.best->metric.c_str(),
                 report.best->score);
  }
}

EvaluationJobResult EvaluationJob::Run() {
  TakeFenceAndPlan();
  EvaluationJobResult result;
  result.planned = planned_;
  Announce();
  evaluator_ = std::make_unique<RunEvaluator>(config_, device_);
  // The memorization report's training set, opened once (a bad spec fails the job now).
  if (!options_.memorization_train.empty()) {
    memorization_train_ = OpenTrainingSet(options_.memorization_train, config_.model.image_size);
  }
  diffusion_ = std::make_unique<GaussianDiffusion>(config_.diffusion, device_);
  model_ = UNet(config_.model);
  start_ = Clock::now();
  for (std::size_t k = 0; k < planned_.size(); ++k) {
    const int64_t step = planned_[k];
    if (finished_.count(step) != 0) continue;
    LoadWeights(step);
    console_.Say("ddpm: evaluation job: checkpoint step %lld (%zu of %zu)\n",
                 static_cast<long long>(step), k + 1, planned_.size());
    EvalReport report;
    int64_t reused = 0;
    if (!EvaluateCheckpoint(k, report, reused)) {
      result.stopped = true;
      break;
    }
    if (memorization_train_) ReportMemorization(step, report);
    Record(report);
    SayResult(report, reused);
    if (rank() == 0 && options_.on_result) options_.on_result(report);
  }
  if (rank() == 0) result.reports = reports_;
  if (!result.stopped) {
    console_.Say("ddpm: evaluation job: done: %s and sweep.png in %s\n", csv_path_.c_str(),
                 options_.job_dir.c_str());
  }
  return result;
}

}  // namespace

EvaluationJobResult RunEvaluationJob(const Config& config, const EvaluationJobOptions& options,
                                     const DistributedContext& dist) {
  EvaluationJob job(config, options, dist);
  return job.Run();
}

}  // namespace ddpm
