// FID's costs on this machine: Inception feature extraction (pool3 and logits) in images/s, and
// one Frechet distance at dimension 2048. Prints one line of key=value pairs, as
// bench/fid_torch.py does for the Python side (bench/fid.sh alternates them).
// usage: ddpm_bench_fid [--batch N] [--batches K] [--threads T]
#include "eval/fid.h"

#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench/stats.h"
#include "config/flags.h"
#include "eval/inception.h"

namespace ddpm::bench {
namespace {

int Run(const Flags& flags) {
  const int batch = static_cast<int>(flags.GetInt("batch"));
  const int batches = static_cast<int>(flags.GetInt("batches"));
  torch::set_num_threads(static_cast<int>(flags.GetInt("threads")));
  torch::manual_seed(0);
  // The speed does not depend on the weights' values: the network as constructed.
  FidInception model;
  model->eval();
  torch::NoGradGuard no_grad;
  const torch::Tensor images = torch::rand({batch, 3, 32, 32}) * 2 - 1;
  model->forward(images.slice(0, 0, 2));  // warm-up
  std::vector<double> batch_ms;
  for (int b = 0; b < batches; ++b) {
    const auto start = Clock::now();
    const InceptionOutput out = model->forward(images);
    batch_ms.push_back(Ms(start));
  }
  // FID at 2048 of two sets of statistics from 4096 random features each.
  const torch::Tensor a = torch::randn({4096, 2048}, torch::kFloat64);
  const torch::Tensor b = torch::randn({4096, 2048}, torch::kFloat64) * 1.1 + 0.1;
  FeatureMoments ma(2048), mb(2048);
  ma.Add(a);
  mb.Add(b);
  const torch::Tensor mu1 = ma.Mean(), s1 = ma.Covariance(), mu2 = mb.Mean(), s2 = mb.Covariance();
  std::vector<double> fid_ms;
  double fid = 0;
  for (int round = 0; round < 3; ++round) {
    const auto start = Clock::now();
    fid = FrechetDistance(mu1, s1, mu2, s2).fid;
    fid_ms.push_back(Ms(start));
  }
  std::printf(
      "impl=cpp batch=%d threads=%d images_per_second=%.2f batch_ms_median=%.1f "
      "fid2048_ms_median=%.1f fid=%.6f\n",
      batch, torch::get_num_threads(), batch * 1000.0 / Quantile(batch_ms, 0.5),
      Quantile(batch_ms, 0.5), Quantile(fid_ms, 0.5), fid);
  return 0;
}

}  // namespace
}  // namespace ddpm::bench

int main(int argc, char** argv) {
  ddpm::Flags flags("ddpm_bench_fid",
                    "Times Inception feature extraction and one Frechet distance at 2048.");
  flags.Add("batch", "images per Inception forward pass", "25");
  flags.Add("batches", "timed forward passes", "3");
  flags.Add("threads", "torch threads", "2");
  return ddpm::RunMain(flags, argc, argv, [&] { return ddpm::bench::Run(flags); });
}
