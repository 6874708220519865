// ddpm_nll: the variational bound (NLL) of a trained model on a dataset in bits/dim, with the
// term of every timestep as CSV and a PNG plot. Thin main over eval/likelihood.h. Under
// mpirun every rank takes its share of the batches (on GPU local_rank when the device is
// CUDA), the float64 sums are all-reduced, and rank 0 reports and writes the files.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "config/flags.h"
#include "eval/likelihood.h"
#include "tools/tool_world.h"
#include "tools/trained_model.h"
#include "trainer/communicator.h"
#include "trainer/data.h"
#include "trainer/diffusion.h"
#include "trainer/image_io.h"

namespace {

// The images: cifar10:PATH is CIFAR-10's test split (the paper's NLL), cifar10-train:PATH the
// training split, folder:PATH every PNG and JPEG, shapes:N N built-in shapes drawn with a seed
// that training never uses.
std::unique_ptr<ddpm::ImageDataset> OpenSplit(const std::string& spec, const ddpm::Config& config) {
  const std::size_t colon = spec.find(':');
  const std::string kind = spec.substr(0, colon);
  const std::string arg = colon == std::string::npos ? "" : spec.substr(colon + 1);
  if (!arg.empty()) {
    if (kind == "cifar10")
      return std::make_unique<ddpm::Cifar10Dataset>(arg, ddpm::CifarSplit::kTest);
    if (kind == "cifar10-train") {
      return std::make_unique<ddpm::Cifar10Dataset>(arg, ddpm::CifarSplit::kTrain);
    }
    if (kind == "folder") {
      return std::make_unique<ddpm::ImageFolderDataset>(arg, config.model.image_size,
                                                        config.model.in_channels);
    }
    if (kind == "shapes") {
      return std::make_unique<ddpm::ShapesDataset>(std::stoll(arg), config.model.image_size,
                                                   ddpm::kHeldOutShapesSeed);
    }
  }
  throw ddpm::FlagError("--data '" + spec +
                        "' is not cifar10:PATH, cifar10-train:PATH, folder:PATH or shapes:N");
}

// Measures and reports the bound as rank comm.rank() of comm's world.
int Measure(const ddpm::Flags& flags, ddpm::ToolWorld& world) {
  ddpm::Communicator& comm = world.comm();
  if (flags.Get("data").empty()) throw ddpm::FlagError("ddpm_nll: --data is required");
  std::vector<std::pair<std::string, std::string>> overrides;
  if (flags.Given("variance")) overrides.emplace_back("sample.variance", flags.Get("variance"));
  ddpm::TrainedModel trained = ddpm::LoadTrainedModel(flags, overrides, "ddpm_nll");
  world.Place(trained);
  const auto data = OpenSplit(flags.Get("data"), trained.config);
  ddpm::BoundOptions options;
  options.num_images = flags.GetInt("num");
  options.num_timesteps = static_cast<int>(flags.GetInt("timesteps"));
  options.variance = trained.config.sample.variance;
  options.seed = static_cast<uint64_t>(flags.GetInt("seed"));
  options.batch_size = static_cast<int>(flags.GetInt("batch"));
  const ddpm::GaussianDiffusion diffusion(trained.config.diffusion, trained.device);
  const bool lead = comm.rank() == 0;
  const auto start = std::chrono::steady_clock::now();
  auto last_print = start;
  const auto seconds = [](auto from) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - from).count();
  };
  if (lead) {
    std::printf("ddpm_nll: %s on %s, %d rank(s)\n", trained.origin.c_str(),
                data->Describe().c_str(), comm.world_size());
  }
  const ddpm::BoundReport report = ddpm::MeasureBound(
      diffusion, trained.model, *data, options, comm, trained.device,
      [&](int64_t done, int64_t share) {
        if (!lead || (seconds(last_print) < 2.0 && done < share)) return;
        last_print = std::chrono::steady_clock::now();
        const double elapsed = seconds(start), rate = done / std::max(elapsed, 1e-9);
        std::printf(
            "ddpm_nll: rank 0: %lld/%lld image-timesteps (%.1f/s), elapsed %.0fs, eta %.0fs\n",
            static_cast<long long>(done), static_cast<long long>(share), rate, elapsed,
            (share - done) / std::max(rate, 1e-9));
        std::fflush(stdout);
      });
  if (!lead) return 0;
  const std::string out = flags.Get("out");
  ddpm::MakeDirectories(out);
  ddpm::WriteBoundCsv(report, out + "/nll_terms.csv");
  ddpm::WriteBoundPlot(report, out + "/nll_terms.png");
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
      report.total_mean, report.total_std_error, static_cast<long long>(report.images),
      comm.world_size(), report.prior_mean, report.term_means[0], report.timesteps_in_all - 1, kl,
      how.c_str(), out.c_str(), out.c_str(), seconds(start));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  ddpm::Flags flags("ddpm_nll",
                    "Computes the variational bound (the NLL of Ho et al., Table 1) of a trained "
                    "model's EMA weights on a dataset, in bits/dim; under mpirun, across the "
                    "ranks.");
  ddpm::AddTrainedModelFlags(flags);
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
  return ddpm::RunMain(flags, argc, argv, [&] {
    ddpm::ToolWorld world(&argc, &argv);
    return world.Run("ddpm_nll", [&] { return Measure(flags, world); });
  });
}
