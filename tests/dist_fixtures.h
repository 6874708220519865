// The data-parallel equivalence check shared by the threads-as-ranks tests and the mpirun
// tests: W ranks x batch B/W must train the same parameters as one rank x batch B.
#pragma once

#include <torch/torch.h>

#include <memory>
#include <vector>

#include "comm/gradient_buckets.h"
#include "config/batch_plan.h"
#include "config/config.h"
#include "trainer/communicator.h"
#include "trainer/data.h"
#include "trainer/trainer.h"

namespace ddpm {

/// A tiny UNet with dropout 0 (dropout is the one per-rank random stream), global batch 16.
inline Config EquivalenceConfig(int grad_accum) {
  return LoadConfigString(R"(
model: {ch: 16, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], image_size: 16,
        norm_groups: 8, dropout: 0.0}
train: {batch_size: 16, lr: 0.002, warmup_steps: 2, ema_decay: 0.9, seed: 5, grad_clip: 1.0,
        grad_accum: )" + std::to_string(grad_accum) +
                          R"(}
data: {shapes_size: 64}
)");
}

/// Global batch number step of the run's data order, as images in [-1, 1].
inline torch::Tensor GlobalBatch(const Config& config, const ImageDataset& data, int step) {
  EpochSampler sampler(data.size(), config.train.seed,
                       DataCursor{0, int64_t{step} * config.train.batch_size % data.size()});
  std::vector<uint8_t> flips;
  const std::vector<int64_t> indices = sampler.Next(config.train.batch_size, &flips);
  std::vector<uint8_t> bytes = ReadBatch(data, indices, flips);
  const int size = data.image_size();
  return torch::from_blob(bytes.data(), {config.train.batch_size, data.channels(), size, size},
                          torch::kUInt8)
                 .to(torch::kFloat32) /
             127.5 -
         1.0;
}

/// Trains steps steps as rank comm.rank() of comm's world (null: one rank on the whole batch)
/// and returns the flat parameters.
inline torch::Tensor TrainRanks(const Config& config, int steps, Communicator* comm,
                                double bucket_mb = kDefaultBucketMb) {
  const int rank = comm != nullptr ? comm->rank() : 0;
  const int world = comm != nullptr ? comm->world_size() : 1;
  const BatchPlan plan = PlanBatch(config, world);
  Trainer trainer(config, torch::kCPU, rank, plan.micro_batches);
  std::unique_ptr<GradientBuckets> buckets;
  if (comm != nullptr) {
    buckets = std::make_unique<GradientBuckets>(*trainer.model(), trainer.parameters(), *comm,
                                                *comm, bucket_mb);
    trainer.set_data_parallel(buckets.get());
  }
  const std::unique_ptr<ImageDataset> data = MakeDataset(config);
  const DataShard shard = DataShard::Of(plan.global_batch, rank, plan.ranks);
  for (int step = 0; step < steps; ++step) {
    const torch::Tensor batch =
        GlobalBatch(config, *data, step).narrow(0, shard.first, shard.count);
    trainer.Step(batch, shard.first);
  }
  return trainer.parameters().data().clone();
}

/// max |a - b| / max |b|.
inline double RelativeDifference(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>() / b.abs().max().item<double>();
}

}  // namespace ddpm
