#include "run/evaluation_job.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "base/fence.h"
#include "base/text.h"
#include "config/checkpoint_selection.h"
#include "eval/checkpoint_sweep.h"
#include "eval/evaluation.h"
#include "eval/memorization.h"
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

// Rank 0 does body; every rank then learns whether it threw, and throws too (rank 0 with its
// own error, the others naming it), so that no rank waits on a collective the others left.
template <typename Body>
void OnLeadOrAll(Communicator& comm, const std::string& what, Body body) {
  int64_t failed = 0;  // 1: fenced, 2: any other error
  std::string message;
  if (comm.rank() == 0) {
    try {
      body();
    } catch (const FencedError& error) {
      failed = 1;
      message = error.what();
    } catch (const std::exception& error) {
      failed = 2;
      message = error.what();
    }
  }
  if (comm.world_size() > 1) {
    torch::Tensor word = torch::tensor({failed}, torch::kLong);
    comm.Broadcast(word, 0, "broadcast of whether rank 0 could " + what);
    failed = word.item<int64_t>();
  }
  if (message.empty()) message = "rank 0 could not " + what;
  if (failed == 1) throw FencedError(message);
  if (failed == 2) throw std::runtime_error(message);
}

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
      throw std::runtime_error(path + ": line " + std::to_string(number) +
                               " is not a checkpoint step: '" + line + "'");
    }
  }
  if (steps.empty()) throw std::runtime_error(path + ": lists no checkpoint step");
  return steps;
}

}  // namespace

EvaluationJobResult RunEvaluationJob(const Config& config, const EvaluationJobOptions& options,
                                     const DistributedContext& dist) {
  SoloCommunicator solo;
  Communicator& comm = dist.comm != nullptr ? *dist.comm : solo;
  comm.set_timeout(config.dist.timeout());
  const int rank = comm.rank(), world = comm.world_size();
  const RunConsole console(rank == 0, options.progress);
  ConfigureThreads(config.train, dist.local_ranks);
  const torch::Device device(dist.device.empty() ? ResolveDevice(config.train) : dist.device);
  const RunFence fence(options.job_dir);
  const std::string plan_path = options.job_dir + "/plan.txt";
  const std::string csv_path = options.job_dir + "/sweep.csv";
  const std::string checkpoints_dir = options.source_run_dir + "/checkpoints";

  // The fence first, then the plan (chosen once) and what earlier attempts finished.
  std::vector<int64_t> planned, done;
  std::vector<EvalReport> reports;
  OnLeadOrAll(comm, "take the job's fence and read its plan", [&] {
    MakeDirectories(options.job_dir);
    fence.Began(options.attempt, 0);
    if (fs::exists(plan_path)) {
      planned = ReadPlan(plan_path);
    } else {
      const CheckpointSelection selection = CheckpointSelection::Parse(options.checkpoints);
      planned = selection.Select(CheckpointDir(checkpoints_dir).Steps(),
                                 "run " + options.source_run + " (" + checkpoints_dir + ")");
      std::string text;
      for (int64_t step : planned) text += std::to_string(step) + "\n";
      fence.Check(options.attempt, plan_path);
      WriteFileAtomically(plan_path, text);
    }
    reports = ReadSweepCsv(csv_path);
    for (const EvalReport& report : reports) done.push_back(report.step);
  });
  planned = BroadcastSteps(comm, planned, "planned checkpoints");
  done = BroadcastSteps(comm, done, "checkpoints already evaluated");
  const std::set<int64_t> finished(done.begin(), done.end());

  EvaluationJobResult result;
  result.planned = planned;
  const int64_t per_checkpoint = config.eval.num_samples;
  const int64_t total = per_checkpoint * static_cast<int64_t>(planned.size());
  std::string steps_text;
  for (int64_t step : planned)
    steps_text += (steps_text.empty() ? "" : ", ") + std::to_string(step);
  console.Say(
      "ddpm: evaluation job %s: run %s, checkpoints %s (%zu; %zu done before), %lld samples "
      "each, %s %d steps, seed %llu, %s IS logits, on %d rank(s)\n",
      options.job_dir.c_str(), options.source_run.c_str(), steps_text.c_str(), planned.size(),
      finished.size(), static_cast<long long>(per_checkpoint), Name(config.eval.sampler),
      EvalSamplerSteps(config), static_cast<unsigned long long>(config.eval.seed),
      Name(config.eval.is_logits), world);

  RunEvaluator evaluator(config, device);
  // The memorization report's training set, opened once (a bad spec fails the job now).
  std::unique_ptr<ImageDataset> memorization_train;
  if (!options.memorization_train.empty()) {
    memorization_train = OpenTrainingSet(options.memorization_train, config.model.image_size);
  }
  const GaussianDiffusion diffusion(config.diffusion, device);
  UNet model(config.model);
  const ModelConfig& m = config.model;
  const auto start = Clock::now();
  int64_t sampled = 0;  // by this attempt, all ranks (about), for images/s
  int64_t checkpoints_done = static_cast<int64_t>(finished.size());
  for (size_t k = 0; k < planned.size(); ++k) {
    const int64_t step = planned[k];
    if (finished.count(step) != 0) continue;
    // Every rank reads the weights itself (the checkpoint directory is shared, as training's).
    const std::string path = checkpoints_dir + "/" + StepName(step);
    if (!fs::exists(path)) {
      throw std::runtime_error("checkpoint step " + std::to_string(step) + " of run " +
                               options.source_run + " is no longer on disk (" + path +
                               "; train.keep_checkpoints removes old ones unless they hold a "
                               "KEEP file)");
    }
    const std::map<std::string, torch::Tensor> tensors = ReadCheckpoint(path);
    const std::map<std::string, torch::Tensor> weights = WeightsFromState(tensors, "ema");
    CheckLearnSigma(m, weights, path);
    CheckNumClasses(m, weights, path);
    LoadStateDict(*model, weights, path);
    model->to(device);
    model->eval();

    const std::string images_dir = options.job_dir + "/" + StepName(step);
    MakeDirectories(images_dir);
    int64_t reused = 0, drawn = 0, reported = 0;
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
    hooks.stop = [&] { return rank == 0 && options.poll_stop && options.poll_stop(); };
    console.Say("ddpm: evaluation job: checkpoint step %lld (%zu of %zu)\n",
                static_cast<long long>(step), k + 1, planned.size());
    EvalReport report;
    try {
      report = evaluator.Evaluate(
          diffusion, model, comm, step,
          [&](int64_t share_done, int64_t share) {
            if (rank != 0) return;
            const int64_t job_done = std::min(total, checkpoints_done * per_checkpoint +
                                                         share_done * static_cast<int64_t>(world));
            const double rate = (sampled + drawn * world) / std::max(SecondsSince(start), 1e-9);
            if (options.on_progress) options.on_progress(job_done, total, rate);
            if (share_done * 10 / share > reported * 10 / share || share_done == share) {
              console.Progress(
                  "ddpm: evaluation job: step %lld: rank 0 has %lld/%lld of its samples (%lld "
                  "read back from an earlier attempt); the job %lld/%lld images, %.2f images/s, "
                  "eta %s\n",
                  static_cast<long long>(step), static_cast<long long>(share_done),
                  static_cast<long long>(share), static_cast<long long>(reused),
                  static_cast<long long>(job_done), static_cast<long long>(total), rate,
                  FormatDuration((total - job_done) / std::max(rate, 1e-9)).c_str());
            }
            reported = share_done;
          },
          hooks);
    } catch (const EvaluationStopped&) {
      result.stopped = true;
      break;
    }
    sampled += drawn * world;
    ++checkpoints_done;
    report.step = step;
    if (memorization_train) {
      // The samples as every rank kept them (all written: Evaluate ended in an all-reduce).
      const ImageFolderDataset samples(images_dir, m.image_size, m.in_channels);
      MemorizationOptions memorization;
      memorization.batch_size = config.eval.batch_size;
      const std::vector<MemorizationSpace> spaces = MeasureMemorization(
          samples, *memorization_train, evaluator.inception(), comm, device, memorization);
      report.memorized_pixel = spaces.front().flagged;
      if (spaces.size() > 1) report.memorized_feature = spaces[1].flagged;
      if (rank == 0) {
        WriteMemorizationReport(spaces, samples, *memorization_train, memorization.ratio,
                                options.job_dir + "/memorization/" + StepName(step));
      }
      console.Say("ddpm: evaluation job: step %lld: memorization against %s: %s",
                  static_cast<long long>(step), options.memorization_train.c_str(),
                  DescribeMemorization(spaces, memorization.ratio).c_str());
    }
    OnLeadOrAll(comm, "record the result of step " + std::to_string(step), [&] {
      reports.push_back(report);
      std::sort(reports.begin(), reports.end(),
                [](const EvalReport& a, const EvalReport& b) { return a.step < b.step; });
      fence.Check(options.attempt, csv_path);
      WriteSweepCsv(reports, csv_path);
      WriteSweepPlot(reports, options.job_dir + "/sweep.png");
      if (const std::optional<BestStatus> best =
              BestOfSweep(reports, config.eval.select, checkpoints_dir)) {
        WriteBestTxt(*best, options.job_dir + "/best.txt");
        report.best = best;
      }
      // The samples were only kept to resume from; the row is in now.
      std::error_code ignored;
      fs::remove_all(images_dir, ignored);
    });
    console.Say(
        "ddpm: evaluation job: step %lld: FID %.4f, IS %.4f +- %.4f (%lld samples, %lld read "
        "back by rank 0, %.0fs)\n",
        static_cast<long long>(step), report.fid, report.inception_score,
        report.inception_score_std, static_cast<long long>(report.num_samples),
        static_cast<long long>(reused), report.seconds);
    std::istringstream scores(DescribeKidAndPrd(report));
    for (std::string line; std::getline(scores, line);) {
      console.Say("ddpm: evaluation job: step %lld: %s\n", static_cast<long long>(step),
                  line.c_str());
    }
    if (report.best) {
      console.Say("ddpm: evaluation job: the best so far: step %lld, %s %.6g (best.txt)\n",
                  static_cast<long long>(report.best->step), report.best->metric.c_str(),
                  report.best->score);
    }
    if (rank == 0 && options.on_result) options.on_result(report);
  }
  if (rank == 0) {
    result.reports = reports;
  } else {
    result.reports.clear();
  }
  if (!result.stopped) {
    console.Say("ddpm: evaluation job: done: %s and sweep.png in %s\n", csv_path.c_str(),
                options.job_dir.c_str());
  }
  return result;
}

}  // namespace ddpm
