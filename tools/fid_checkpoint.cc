#include "tools/fid_checkpoint.h"

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "base/log.h"
#include "base/text.h"
#include "config/flags.h"
#include "eval/checkpoint_sweep.h"
#include "eval/evaluation.h"
#include "run/sampling.h"
#include "tools/eval_flags.h"
#include "trainer/diffusion.h"

namespace ddpm {
namespace {

void PrintReport(const EvalReport& report, const TrainedModel& trained, int world, double w,
                 const std::string& reference, double seconds) {
  std::printf(
      "FID %.4f\nIS %.4f +- %.4f (10 splits, %s logits)\nsamples %lld: %s, %s %d steps, "
      "seed %llu, %d rank(s)\nInception sha256 %s\nreference %s sha256 %s\nwall time %s\n%s",
      report.fid, report.inception_score, report.inception_score_std, report.is_logits.c_str(),
      static_cast<long long>(report.num_samples), trained.origin.c_str(), report.sampler.c_str(),
      report.sampling_steps, static_cast<unsigned long long>(report.seed), world,
      report.inception_sha256.c_str(), reference.c_str(), report.reference_sha256.c_str(),
      FormatDuration(seconds).c_str(),
      report.regularized ? "note: the covariances were regularized with eps * I\n" : "");
  std::fputs(DescribeKidAndPrd(report).c_str(), stdout);
  if (report.guided) std::printf("guidance %s\n", FormatNumber(w).c_str());
  std::fflush(stdout);
}

}  // namespace

void AddCheckpointEvalFlags(Flags& flags) {
  AddTrainedModelFlags(flags);
  AddEvalFlags(flags);
  flags.Add("out",
            "with a list of --guidance scales (0,1,2,4), each is evaluated and FID and IS against "
            "w go to OUT.csv and OUT.png",
            "guidance_sweep");
  flags.Add("also-save", "a directory to keep the samples in as PNGs (000000.png onwards)", "");
}

CheckpointEvalOptions CheckpointEvalOptionsFromFlags(const Flags& flags) {
  CheckpointEvalOptions options;
  options.overrides = EvalOverrides(flags, &options.scales);
  if (options.scales.size() > 1 && flags.Given("also-save")) {
    throw FlagError(flags.program() +
                    ": --also-save keeps the samples of one guidance scale; give one "
                    "--guidance, not " +
                    flags.Get("guidance"));
  }
  options.keep_dir = flags.Get("also-save");
  options.out = flags.Get("out");
  options.reference = flags.Get("ref");
  return options;
}

int EvaluateCheckpoint(TrainedModel& trained, Communicator& comm,
                       const CheckpointEvalOptions& options) {
  if (options.scales.size() > 1 && trained.config.model.num_classes == 0) {
    std::string list;
    for (double w : options.scales) list += (list.empty() ? "" : ",") + FormatNumber(w);
    throw FlagError("ddpm_fid checkpoint: --guidance " + list + ": " + trained.origin +
                    " is unconditional (model.num_classes 0); a list of guidance scales needs a "
                    "class-conditional model");
  }
  const bool lead = comm.rank() == 0;
  const Config& config = trained.config;
  const std::vector<double> scales =
      options.scales.empty() ? std::vector<double>{config.eval.guidance} : options.scales;
  RunEvaluator evaluator(config, trained.device);
  const GaussianDiffusion diffusion(config.diffusion, trained.device);
  const auto start = std::chrono::steady_clock::now();
  auto last = start;
  if (lead) {
    LogInfo("ddpm_fid checkpoint: %lld samples of %s (%s %d steps, seed %llu) on %d rank(s)\n",
            static_cast<long long>(config.eval.num_samples), trained.origin.c_str(),
            Name(config.eval.sampler), EvalSamplerSteps(config),
            static_cast<unsigned long long>(config.eval.seed), comm.world_size());
  }
  EvaluateHooks hooks;
  if (!options.keep_dir.empty()) {
    hooks.keep = [&options](const torch::Tensor& images, int64_t first) {
      std::vector<int64_t> indices(images.size(0));
      for (int64_t k = 0; k < images.size(0); ++k) indices[k] = first + k;
      WriteSampleFiles(images, options.keep_dir, indices);
    };
  }
  const auto progress = [&](int64_t done, int64_t share) {
    if (!lead || (SecondsSince(last) < 5.0 && done < share)) return;
    last = std::chrono::steady_clock::now();
    const double elapsed = SecondsSince(start);
    const double rate = done * comm.world_size() / std::max(elapsed, 1e-9);
    LogInfo(
        "ddpm_fid checkpoint: rank 0 has %lld/%lld of its samples; about %.2f samples/s over "
        "the ranks, elapsed %s, eta %s\n",
        static_cast<long long>(done), static_cast<long long>(share), rate,
        FormatDuration(elapsed).c_str(),
        FormatDuration((share - done) * comm.world_size() / std::max(rate, 1e-9)).c_str());
  };
  ParameterSweep sweep{"guidance", "GUIDANCE W", {}, {}};
  for (const double w : scales) {
    evaluator.set_guidance(w);
    const EvalReport report =
        evaluator.Evaluate(diffusion, trained.model, comm, 0, progress, hooks);
    if (!lead) continue;
    PrintReport(report, trained, comm.world_size(), w, options.reference, SecondsSince(start));
    sweep.values.push_back(w);
    sweep.reports.push_back(report);
  }
  if (scales.size() > 1 && lead) {
    WriteParameterSweep(sweep, options.out + ".csv", options.out + ".png");
    LogInfo("ddpm_fid checkpoint: FID and IS against guidance in %s.csv and %s.png\n",
            options.out.c_str(), options.out.c_str());
  }
  return 0;
}

}  // namespace ddpm
