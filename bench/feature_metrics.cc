// The costs of the scores beyond FID at the scale, on 1 rank or, under mpirun, across
// ranks: KID (100 subsets of 1000) of 10k samples against 50k reference features; precision,
// recall, density and coverage of 10k samples against 10k reference features (their radii
// included); the memorization report's exact two-nearest search of 10k samples in 50k training
// images, in pixel space (3072 values) and in feature space (2048). Inputs are random (the cost
// does not depend on the values), the same on every rank. Prints one line of key=value pairs,
// as bench/feature_metrics_torch.py does for plain PyTorch.
// usage: [mpirun -np R] ddpm_bench_feature_metrics [--samples 10000] [--train 50000] [--threads T]
#include "eval/feature_metrics.h"

#include <torch/torch.h>

#include <cstdio>
#include <memory>

#include "bench/stats.h"
#include "comm/mpi_communicator.h"
#include "config/flags.h"
#include "trainer/communicator.h"

namespace ddpm::bench {
namespace {

int Run(const Flags& flags, Communicator& comm) {
  const int64_t samples = flags.GetInt("samples"), train = flags.GetInt("train");
  torch::set_num_threads(static_cast<int>(flags.GetInt("threads")));
  torch::manual_seed(0);
  // pool3-like features: non-negative; pixels in [0, 1].
  const torch::Tensor fake = torch::randn({samples, 2048}).relu();
  const torch::Tensor real = torch::randn({train, 2048}).relu() * 1.05;
  const torch::Tensor sample_pixels = torch::rand({samples, 3072});
  const torch::Tensor train_pixels = torch::rand({train, 3072});
  comm.Barrier("start");
  auto start = Clock::now();
  const KidResult kid = KernelInceptionDistance(fake, real, comm);
  const double kid_s = Ms(start) / 1000;
  start = Clock::now();
  const PrdReference reference = MakePrdReference(real.slice(0, 0, samples), comm);
  const PrdResult prd = PrecisionRecallDensityCoverage(reference, fake, comm);
  const double prd_s = Ms(start) / 1000;
  start = Clock::now();
  const NearestTwo pixel = FindNearestTwo(
      sample_pixels,
      [&](int64_t first, int64_t count) { return train_pixels.slice(0, first, first + count); },
      train, comm, 1000);
  const double pixel_s = Ms(start) / 1000;
  start = Clock::now();
  const NearestTwo feature = FindNearestTwo(
      fake, [&](int64_t first, int64_t count) { return real.slice(0, first, first + count); },
      train, comm, 1000);
  const double feature_s = Ms(start) / 1000;
  if (comm.rank() == 0) {
    std::printf(
        "impl=ddpm ranks=%d threads=%lld samples=%lld train=%lld kid_s=%.2f prd_s=%.2f "
        "pixel_search_s=%.2f feature_search_s=%.2f kid=%.6g precision=%.4f recall=%.4f "
        "nearest0=%lld,%lld\n",
        comm.world_size(), static_cast<long long>(flags.GetInt("threads")),
        static_cast<long long>(samples), static_cast<long long>(train), kid_s, prd_s, pixel_s,
        feature_s, kid.mean, prd.precision, prd.recall,
        static_cast<long long>(pixel.index[0][0].item<int64_t>()),
        static_cast<long long>(feature.index[0][0].item<int64_t>()));
  }
  return 0;
}

}  // namespace
}  // namespace ddpm::bench

int main(int argc, char** argv) {
  ddpm::Flags flags("ddpm_bench_feature_metrics",
                    "KID, PRD and the memorization search at 10k samples against 50k.");
  flags.Add("samples", "samples (fake features, sample images)", "10000");
  flags.Add("train", "reference features and training images", "50000");
  flags.Add("threads", "torch threads per rank", "2");
  return ddpm::RunMain(flags, argc, argv, [&] {
    // One process, or one rank of an MPI job when mpirun started it.
    std::unique_ptr<ddpm::MpiRuntime> mpi;
    std::unique_ptr<ddpm::Communicator> comm;
    if (ddpm::LaunchedByMpi()) {
      mpi = std::make_unique<ddpm::MpiRuntime>(&argc, &argv);
      comm = std::make_unique<ddpm::MpiCommunicator>(mpi->placement());
    } else {
      comm = std::make_unique<ddpm::SoloCommunicator>();
    }
    return ddpm::bench::Run(flags, *comm);
  });
}
