#include "tools/nll.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>

#include "base/file_io.h"
#include "base/log.h"
#include "base/text.h"
#include "eval/likelihood.h"
#include "trainer/data.h"
#include "trainer/diffusion.h"

namespace ddpm {
namespace {

std::unique_ptr<ImageDataset> OpenSplit(const std::string& spec, const Config& config) {
  const std::size_t colon = spec.find(':');
  const std::string kind = spec.substr(0, colon);
  const std::string arg = colon == std::string::npos ? "" : spec.substr(colon + 1);
  if (!arg.empty()) {
    if (kind == "cifar10") return std::make_unique<Cifar10Dataset>(arg, CifarSplit::kTest);
    if (kind == "cifar10-train") return std::make_unique<Cifar10Dataset>(arg, CifarSplit::kTrain);
    if (kind == "folder") {
      return std::make_unique<ImageFolderDataset>(arg, config.model.image_size,
                                                  config.model.in_channels);
    }
    if (kind == "shapes") {
      return std::make_unique<ShapesDataset>(std::stoll(arg), config.model.image_size,
                                             kHeldOutShapesSeed);
    }
  }
  throw FlagError("--data '" + spec +
                  "' is not cifar10:PATH, cifar10-train:PATH, folder:PATH or shapes:N");
}

// The report's lines: the bound with its standard error and its terms.
void PrintBound(const BoundReport& report, int world, const std::string& out, double seconds) {
  double kl = 0;
  for (std::size_t i = 1; i < report.timesteps.size(); ++i) {
    kl += report.weights[i] * report.term_means[i];
  }
  const std::string how =
      report.full()
          ? "all " + std::to_string(report.timesteps_in_all) + " timesteps"
          : "an unbiased stratified estimate from " + std::to_string(report.timesteps.size()) +
                " of " + std::to_string(report.timesteps_in_all) + " timesteps (t = 0 exact)";
  std::printf(
      "bits/dim %.4f +- %.4f (standard error over %lld images, %d rank(s))\n"
      "  prior L_T %.6f, decoder L_0 %.6f, KL terms L_1..L_%d %.6f\n"
      "  %s\n"
      "ddpm_nll: wrote %s/nll_terms.csv and %s/nll_terms.png in %.1fs\n",
      report.total_mean, report.total_std_error, static_cast<long long>(report.images), world,
      report.prior_mean, report.term_means[0], report.timesteps_in_all - 1, kl, how.c_str(),
      out.c_str(), out.c_str(), seconds);
  std::fflush(stdout);
}

}  // namespace

void AddNllFlags(Flags& flags) {
  AddTrainedModelFlags(flags);
  flags.Add("data", "cifar10:PATH (the test split), cifar10-train:PATH, folder:PATH or shapes:N",
            "");
  flags.Add("num", "images, from the first (0: all)", "0");
  flags.Add("timesteps",
            "0: all T terms per image (the paper's bound); K: t = 0 and an unbiased stratified "
            "estimate from K - 1 more",
            "0");
  flags.Add("variance", "p's variance where the model does not learn it (default: the config's)",
            "");
  flags.Add("seed", "seeds the strata and the noise", "0");
  flags.Add("batch", "images per forward pass (the result depends on it, not on the ranks)", "64");
  flags.Add("out", "folder for nll_terms.csv and nll_terms.png", "nll");
}

NllJob NllJobFromFlags(const Flags& flags) {
  NllJob job;
  job.data = flags.GetRequired("data");
  job.num_images = flags.GetInt("num");
  job.num_timesteps = static_cast<int>(flags.GetInt("timesteps"));
  job.seed = static_cast<uint64_t>(flags.GetInt("seed"));
  job.batch_size = static_cast<int>(flags.GetInt("batch"));
  job.out = flags.Get("out");
  if (flags.Given("variance")) job.overrides.emplace_back("sample.variance", flags.Get("variance"));
  return job;
}

int RunNllJob(const NllJob& job, TrainedModel& trained, Communicator& comm) {
  const auto data = OpenSplit(job.data, trained.config);
  BoundOptions options;
  options.num_images = job.num_images;
  options.num_timesteps = job.num_timesteps;
  options.variance = trained.config.sample.variance;
  options.seed = job.seed;
  options.batch_size = job.batch_size;
  const GaussianDiffusion diffusion(trained.config.diffusion, trained.device);
  const bool lead = comm.rank() == 0;
  const auto start = std::chrono::steady_clock::now();
  auto last_print = start;
  if (lead) {
    LogInfo("ddpm_nll: %s on %s, %d rank(s)", trained.origin.c_str(), data->Describe().c_str(),
            comm.world_size());
  }
  const BoundReport report = MeasureBound(
      diffusion, trained.model, *data, options, comm, trained.device,
      [&](int64_t done, int64_t share) {
        if (!lead || (SecondsSince(last_print) < 2.0 && done < share)) return;
        last_print = std::chrono::steady_clock::now();
        const double elapsed = SecondsSince(start), rate = done / std::max(elapsed, 1e-9);
        LogInfo("ddpm_nll: rank 0: %lld/%lld image-timesteps (%.1f/s), elapsed %.0fs, eta %.0fs",
                static_cast<long long>(done), static_cast<long long>(share), rate, elapsed,
                (share - done) / std::max(rate, 1e-9));
      });
  if (!lead) return 0;
  MakeDirectories(job.out);
  WriteBoundCsv(report, job.out + "/nll_terms.csv");
  WriteBoundPlot(report, job.out + "/nll_terms.png");
  PrintBound(report, comm.world_size(), job.out, SecondsSince(start));
  return 0;
}

}  // namespace ddpm
