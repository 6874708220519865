// ddpm_bench_dist: under `mpirun -np W`, times data-parallel train steps (global batch split
// over W ranks) with the bucketed gradient all-reduce, and the raw MPI all-reduce bandwidth of a
// gradient-sized buffer. Rank 0 prints one key=value line.
#include <torch/torch.h>

#include <cstdio>
#include <vector>

#include "bench/stats.h"
#include "comm/gradient_buckets.h"
#include "comm/mpi_communicator.h"
#include "config/batch_plan.h"
#include "config/config.h"
#include "config/flags.h"
#include "trainer/trainer.h"

using ddpm::bench::Clock;
using ddpm::bench::Ms;
using ddpm::bench::Quantile;

int main(int argc, char** argv) {
  ddpm::Flags flags("ddpm_bench_dist",
                    "Times data-parallel train steps and the gradient all-reduce under mpirun.");
  flags.Add("config", "YAML config (model, diffusion and train sections are used)", "");
  flags.Add("batch", "global images per train step, split over the ranks", "16");
  flags.Add("steps", "timed train steps", "10");
  flags.Add("warmup", "untimed train steps first", "2");
  flags.Add("threads", "torch intra-op threads per rank", "1");
  flags.Add("bucket-mb", "gradient bucket size in MiB", "25");
  flags.Add("allreduce-mb", "size of the raw all-reduce timed (0: the model's gradient)", "0");
  flags.Add("allreduce-reps", "timed raw all-reduces", "5");
  return ddpm::RunMain(flags, argc, argv, [&] {
    if (!ddpm::LaunchedByMpi()) throw ddpm::FlagError("ddpm_bench_dist: run me under mpirun");
    ddpm::Config config = flags.Get("config").empty() ? ddpm::LoadConfigString("")
                                                      : ddpm::LoadConfigFile(flags.Get("config"));
    ddpm::MpiRuntime mpi(&argc, &argv);
    const ddpm::MpiPlacement placement = mpi.placement();
    const int world = placement.world_size, rank = placement.rank;
    const int batch = static_cast<int>(flags.GetInt("batch"));
    ddpm::SetConfigKey(config, "train.batch_size", std::to_string(batch), "ddpm_bench_dist flags");
    ddpm::SetConfigKey(config, "train.grad_accum", "1", "ddpm_bench_dist flags");
    const int per_rank = ddpm::PlanBatch(config, world).rank_batch();
    torch::set_num_threads(static_cast<int>(flags.GetInt("threads")));
    std::vector<double> step_ms, allreduce_ms, overlap, exposed_ms;
    double algbw_gbs = 0, busbw_gbs = 0, raw_ms = 0, raw_mb = 0;
    int buckets = 0;
    long long params = 0;
    {
      ddpm::MpiCommunicator comm(placement);
      ddpm::Trainer trainer(config, torch::kCPU, rank);
      params = static_cast<long long>(ddpm::CountParameters(*trainer.model()));
      ddpm::GradientBuckets sync(*trainer.model(), trainer.parameters(), comm, comm,
                                 flags.GetDouble("bucket-mb"));
      trainer.set_data_parallel(&sync);
      buckets = static_cast<int>(sync.buckets().size());
      const auto& m = config.model;
      torch::manual_seed(rank);
      const torch::Tensor images =
          torch::rand({per_rank, m.in_channels, m.image_size, m.image_size}) * 2 - 1;
      for (int64_t i = 0; i < flags.GetInt("warmup"); ++i) trainer.Step(images, rank * per_rank);
      for (int64_t i = 0; i < flags.GetInt("steps"); ++i) {
        comm.Barrier("barrier before a timed step");
        const auto start = Clock::now();
        trainer.Step(images, rank * per_rank);
        step_ms.push_back(Ms(start));
        allreduce_ms.push_back(1000 * sync.last_stats().allreduce_seconds);
        overlap.push_back(sync.last_stats().overlap_fraction);
        exposed_ms.push_back(1000 * sync.last_stats().exposed_seconds);
      }

      // The raw all-reduce of one buffer, as nccl-tests reports it: algorithm bandwidth is
      // bytes / time; bus bandwidth scales it by 2 (W - 1) / W, the bytes each rank moves.
      raw_mb = flags.GetDouble("allreduce-mb");
      const int64_t elements = raw_mb > 0 ? static_cast<int64_t>(raw_mb * (1 << 20) / 4)
                                          : trainer.parameters().grad().numel();
      raw_mb = elements * 4.0 / (1 << 20);
      torch::Tensor buffer = torch::ones({elements});
      comm.AllReduce(buffer, ddpm::ReduceOp::kSum, "warm-up all-reduce");
      std::vector<double> reps;
      for (int64_t i = 0; i < flags.GetInt("allreduce-reps"); ++i) {
        comm.Barrier("barrier before a timed all-reduce");
        const auto start = Clock::now();
        comm.AllReduce(buffer, ddpm::ReduceOp::kSum, "timed all-reduce");
        reps.push_back(Ms(start));
      }
      raw_ms = Quantile(reps, 0.5);
      // One rank moves nothing: no bandwidth to speak of.
      algbw_gbs = world > 1 ? elements * 4.0 / (raw_ms / 1000) / 1e9 : 0;
      busbw_gbs = algbw_gbs * 2.0 * (world - 1) / world;
    }
    if (rank == 0) {
      const double median = Quantile(step_ms, 0.5);
      std::printf(
          "impl=cpp_dist ranks=%d params=%lld global_batch=%d per_rank_batch=%d threads=%lld "
          "buckets=%d train_ms_median=%.2f train_ms_p10=%.2f train_ms_p90=%.2f "
          "images_per_second=%.1f allreduce_ms_median=%.2f overlap_median=%.2f "
          "exposed_ms_median=%.2f "
          "raw_allreduce_mb=%.1f raw_allreduce_ms=%.2f algbw_gb_s=%.3f busbw_gb_s=%.3f\n",
          world, params, batch, per_rank, static_cast<long long>(flags.GetInt("threads")), buckets,
          median, Quantile(step_ms, 0.1), Quantile(step_ms, 0.9), batch * 1000.0 / median,
          Quantile(allreduce_ms, 0.5), Quantile(overlap, 0.5), Quantile(exposed_ms, 0.5), raw_mb,
          raw_ms, algbw_gbs, busbw_gbs);
    }
    return 0;
  });
}
