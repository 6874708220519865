// Data parallelism with threads acting as ranks (LocalGroup): bucket planning, the bucketed
// all-reduce and its edge cases, data shards, and W ranks x B/W == 1 rank x B.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <functional>
#include <numeric>
#include <set>
#include <thread>

#include "comm/gradient_buckets.h"
#include "tests/dist_fixtures.h"
#include "tests/on_ranks.h"
#include "trainer/checkpoint.h"
#include "trainer/communicator.h"
#include "trainer/data.h"

namespace ddpm {
namespace {

std::vector<FlatParameters::Slot> Slots(const std::vector<int64_t>& sizes) {
  std::vector<FlatParameters::Slot> slots;
  int64_t offset = 0;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    slots.push_back({"p" + std::to_string(i), offset, sizes[i], {sizes[i]}});
    offset += sizes[i];
  }
  return slots;
}

TEST(Buckets, PlannedInReverseOrderAndContiguous) {
  // float32 parameters of 10, 20, 30, 40 elements; buckets of at least 200 bytes (50 floats).
  const auto buckets = PlanBuckets(Slots({10, 20, 30, 40}), 4, 200);
  ASSERT_EQ(buckets.size(), 2u);
  // Walking backwards: 40 + 30 = 70 >= 50 closes the first bucket; 20 + 10 is what is left.
  EXPECT_EQ(buckets[0].slots, (std::vector<int>{3, 2}));
  EXPECT_EQ(buckets[0].begin, 30);
  EXPECT_EQ(buckets[0].end, 100);
  EXPECT_EQ(buckets[1].slots, (std::vector<int>{1, 0}));
  EXPECT_EQ(buckets[1].begin, 0);
  EXPECT_EQ(buckets[1].end, 30);
}

TEST(Buckets, ParameterLargerThanABucketGetsItsOwn) {
  // Buckets of 40 bytes (10 floats): the 1000-element parameter alone overflows one.
  const auto buckets = PlanBuckets(Slots({4, 1000, 3, 3, 6}), 4, 40);
  ASSERT_EQ(buckets.size(), 3u);
  EXPECT_EQ(buckets[0].slots, (std::vector<int>{4, 3, 2}));
  EXPECT_EQ(buckets[1].slots, (std::vector<int>{1}));
  EXPECT_EQ(buckets[1].end - buckets[1].begin, 1000);
  EXPECT_EQ(buckets[2].slots, (std::vector<int>{0}));
}

// Three layers; rank r uses the middle one only when use_middle(r) is true.
struct Net : torch::nn::Module {
  Net() {
    first = register_parameter("first", torch::arange(6, torch::kFloat32).reshape({2, 3}) / 10);
    middle = register_parameter("middle", torch::full({3, 3}, 0.5));
    last = register_parameter("last", torch::linspace(-1, 1, 300).reshape({3, 100}));
  }
  torch::Tensor forward(const torch::Tensor& x, bool use_middle) {
    torch::Tensor h = torch::tanh(x.matmul(first));
    if (use_middle) h = h.matmul(middle);
    return h.matmul(last).square().mean();
  }
  torch::Tensor first, middle, last;
};

// Each rank's input: rank-dependent, so the gradients differ between ranks.
torch::Tensor Input(int rank) { return torch::linspace(-1, 1, 8).reshape({4, 2}) * (rank + 1); }

TEST(Buckets, AverageEveryBucketIncludingUnusedParametersAndOversizedOnes) {
  const int world = 2;
  auto uses_middle = [](int rank) { return rank == 0; };
  // Expected: each rank's gradient computed alone, averaged here.
  std::vector<torch::Tensor> alone;
  for (int r = 0; r < world; ++r) {
    Net net;
    FlatParameters flat(net, true);
    net.forward(Input(r), uses_middle(r)).backward();
    alone.push_back(flat.grad().clone());
  }
  const torch::Tensor expected = (alone[0] + alone[1]) / 2;

  for (double bucket_mb : {25.0, 40.0 / (1 << 20)}) {  // one bucket; many, "last" oversized
    LocalGroup group(world);
    std::vector<torch::Tensor> got(world);
    std::vector<int> bucket_count(world);
    OnRanks(world, [&](int r) {
      Net net;
      FlatParameters flat(net, true);
      GradientBuckets buckets(net, flat, group.rank(r), group.rank(r), bucket_mb);
      buckets.BeginBackward(true);
      net.forward(Input(r), uses_middle(r)).backward();
      buckets.FinishBackward();
      got[r] = flat.grad().clone();
      bucket_count[r] = static_cast<int>(buckets.buckets().size());
    });
    for (int r = 0; r < world; ++r) {
      EXPECT_TRUE(torch::allclose(got[r], expected, 1e-6, 1e-7))
          << "rank " << r << ", bucket_mb " << bucket_mb;
    }
    // 40-byte buckets: "last" (300 floats) alone, then "middle" and "first" together.
    EXPECT_EQ(bucket_count[0], bucket_mb > 1 ? 1 : 2);
  }
}

TEST(Buckets, AccumulationReducesOnlyTheLastMicroBatch) {
  // Two micro-batches per rank: the sum of both backward passes, then averaged over ranks.
  const int world = 2;
  std::vector<torch::Tensor> alone;
  for (int r = 0; r < world; ++r) {
    Net net;
    FlatParameters flat(net, true);
    net.forward(Input(r), true).backward();
    net.forward(Input(r) * 0.5, true).backward();
    alone.push_back(flat.grad().clone());
  }
  const torch::Tensor expected = (alone[0] + alone[1]) / 2;
  LocalGroup group(world);
  std::vector<torch::Tensor> got(world);
  OnRanks(world, [&](int r) {
    Net net;
    FlatParameters flat(net, true);
    GradientBuckets buckets(net, flat, group.rank(r), group.rank(r), 25.0);
    buckets.BeginBackward(false);
    net.forward(Input(r), true).backward();
    buckets.BeginBackward(true);
    net.forward(Input(r) * 0.5, true).backward();
    buckets.FinishBackward();
    got[r] = flat.grad().clone();
  });
  for (int r = 0; r < world; ++r) {
    EXPECT_TRUE(torch::allclose(got[r], expected, 1e-6, 1e-7)) << "rank " << r;
  }
}

TEST(Shards, DisjointAndCoverTheEpoch) {
  // 96 images whose bytes are their own index; a global batch of 12 over 1, 2, 3 and 4 ranks.
  class Indexed : public ImageDataset {
   public:
    int64_t size() const override { return 96; }
    int image_size() const override { return 1; }
    int channels() const override { return 1; }
    void Read(int64_t index, uint8_t* chw) const override { chw[0] = uint8_t(index); }
    std::string Describe() const override { return "indexed"; }
  } data;
  std::vector<uint8_t> single;
  {
    BatchLoader loader(data, DataShard::Of(12, 0, 1), false, 4, DataCursor{}, 2);
    for (int step = 0; step < 8; ++step) {
      const LoadedBatch batch = loader.Next();
      single.insert(single.end(), batch.pixels.begin(), batch.pixels.end());
    }
  }
  std::set<uint8_t> all(single.begin(), single.end());
  EXPECT_EQ(all.size(), 96u) << "one rank sees every image once per epoch";
  for (int world : {2, 3, 4}) {
    std::vector<std::vector<uint8_t>> seen(world);
    std::vector<std::unique_ptr<BatchLoader>> loaders;
    for (int r = 0; r < world; ++r) {
      loaders.push_back(std::make_unique<BatchLoader>(data, DataShard::Of(12, r, world), false, 4,
                                                      DataCursor{}, 2));
    }
    std::vector<uint8_t> interleaved;
    for (int step = 0; step < 8; ++step) {
      for (int r = 0; r < world; ++r) {
        const LoadedBatch batch = loaders[r]->Next();
        EXPECT_EQ(batch.count, 12 / world);
        seen[r].insert(seen[r].end(), batch.pixels.begin(), batch.pixels.end());
        interleaved.insert(interleaved.end(), batch.pixels.begin(), batch.pixels.end());
      }
    }
    std::set<uint8_t> covered;
    for (int r = 0; r < world; ++r) {
      for (uint8_t index : seen[r]) {
        EXPECT_TRUE(covered.insert(index).second)
            << "image " << int(index) << " twice, world " << world;
      }
    }
    EXPECT_EQ(covered.size(), 96u) << "world " << world;
    // Rank slices of each step, put side by side, are the one-rank order.
    EXPECT_EQ(interleaved, single) << "world " << world;
  }
  EXPECT_THROW(DataShard::Of(12, 0, 5), std::invalid_argument);
}

TEST(Shards, FlipsDoNotDependOnTheWorldSize) {
  ShapesDataset data(64, 16, 2);
  std::vector<uint8_t> one;
  {
    BatchLoader loader(data, DataShard::Of(16, 0, 1), true, 7, DataCursor{}, 1);
    one = loader.Next().pixels;
  }
  std::vector<uint8_t> two;
  for (int r = 0; r < 2; ++r) {
    BatchLoader loader(data, DataShard::Of(16, r, 2), true, 7, DataCursor{}, 1);
    const auto pixels = loader.Next().pixels;
    two.insert(two.end(), pixels.begin(), pixels.end());
  }
  EXPECT_EQ(one, two);
}

TEST(Equivalence, TwoThreadRanksMatchOneRankWithTheWholeBatch) {
  for (int accum : {1, 2}) {
    const Config config = EquivalenceConfig(accum);
    const torch::Tensor reference = TrainRanks(config, 10, nullptr);
    LocalGroup group(2);
    std::vector<torch::Tensor> ranks(2);
    // Small buckets, so that several all-reduces overlap backward.
    OnRanks(2, [&](int r) { ranks[r] = TrainRanks(config, 10, &group.rank(r), 0.05); });
    EXPECT_TRUE(torch::equal(ranks[0], ranks[1])) << "ranks diverged, grad_accum " << accum;
    const double difference = RelativeDifference(ranks[0], reference);
    std::printf("grad_accum %d: max |2 ranks - 1 rank| / max |1 rank| = %.3g\n", accum, difference);
    EXPECT_LT(difference, 1e-5) << "grad_accum " << accum;
    // Training moved the parameters, so the comparison is not vacuous.
    EXPECT_GT(RelativeDifference(Trainer(config, torch::kCPU).parameters().data(), reference),
              1e-3);
  }
}

TEST(ImportanceSampling, TwoRanksDrawTheSameTimestepsAsOne) {
  // train.timestep_sampler: loss_second_moment with T = 4: every timestep has its 10 losses
  // after a few steps of 16, and the draws then follow the history. Each rank's history is
  // fed the whole global batch's losses, so the ranks' histories are one and the timesteps of
  // 2 ranks, side by side, are those of 1 rank.
  Config config = EquivalenceConfig(1);
  config.diffusion.timesteps = 4;
  config.train.timestep_sampler = TimestepSamplerKind::kLossSecondMoment;
  const int steps = 10;
  auto train = [&](Communicator* comm, std::vector<std::vector<int64_t>>& drawn,
                   std::vector<double>& history, int& warm_at) {
    const int rank = comm != nullptr ? comm->rank() : 0;
    const int world = comm != nullptr ? comm->world_size() : 1;
    Trainer trainer(config, torch::kCPU, rank);
    std::unique_ptr<GradientBuckets> buckets;
    if (comm != nullptr) {
      buckets = std::make_unique<GradientBuckets>(*trainer.model(), trainer.parameters(), *comm,
                                                  *comm, kDefaultBucketMb);
      trainer.set_data_parallel(buckets.get());
    }
    const std::unique_ptr<ImageDataset> data = MakeDataset(config);
    const DataShard shard = DataShard::Of(16, rank, world);
    warm_at = -1;
    for (int step = 0; step < steps; ++step) {
      const torch::Tensor batch =
          GlobalBatch(config, *data, step).narrow(0, shard.first, shard.count);
      if (warm_at < 0 && trainer.timestep_sampler().loss_aware()) warm_at = step;
      drawn.push_back(
          trainer.DrawTimestepsAndNoise(step, shard.first, shard.count, batch.sizes().slice(1))
              .host_t);
      trainer.Step(batch, shard.first);
    }
    history = trainer.timestep_sampler().history();
  };
  std::vector<std::vector<int64_t>> one;
  std::vector<double> one_history;
  int one_warm = 0;
  train(nullptr, one, one_history, one_warm);
  ASSERT_GE(one_warm, 1);
  ASSERT_LT(one_warm, steps - 2) << "the last steps draw from the losses";

  LocalGroup group(2);
  std::vector<std::vector<std::vector<int64_t>>> two(2);
  std::vector<std::vector<double>> two_history(2);
  std::vector<int> two_warm(2);
  OnRanks(2, [&](int r) { train(&group.rank(r), two[r], two_history[r], two_warm[r]); });
  EXPECT_EQ(two_history[0], two_history[1]) << "the ranks keep one history";
  EXPECT_EQ(two_warm[0], one_warm);
  for (int step = 0; step < steps; ++step) {
    std::vector<int64_t> side_by_side = two[0][step];
    side_by_side.insert(side_by_side.end(), two[1][step].begin(), two[1][step].end());
    EXPECT_EQ(side_by_side, one[step]) << "step " << step;
  }
  // The histories hold the same losses up to the all-reduced gradients' rounding.
  ASSERT_EQ(two_history[0].size(), one_history.size());
  for (std::size_t i = 0; i < one_history.size(); ++i) {
    EXPECT_NEAR(two_history[0][i], one_history[i], 1e-4 * std::abs(one_history[i]) + 1e-6);
  }
}

TEST(Resharding, TwoRankCheckpointLoadsIntoOneAndThreeRanks) {
  // Two thread-ranks train 3 steps and checkpoint together, each writing its shard.
  Config config = EquivalenceConfig(1);
  config.model.dropout = 0.1;  // so the dropout streams differ per rank
  const std::string dir =
      (std::filesystem::temp_directory_path() / ("ddpm_reshard_" + std::to_string(getpid())))
          .string();
  std::filesystem::remove_all(dir);
  LocalGroup group(2);
  std::vector<std::map<std::string, torch::Tensor>> trained(2);
  OnRanks(2, [&](int r) {
    Trainer trainer(config, torch::kCPU, r);
    GradientBuckets buckets(*trainer.model(), trainer.parameters(), group.rank(r), group.rank(r),
                            0.05);
    trainer.set_data_parallel(&buckets);
    const std::unique_ptr<ImageDataset> data = MakeDataset(config);
    const DataShard shard = DataShard::Of(config.train.batch_size, r, 2);
    for (int step = 0; step < 3; ++step) {
      trainer.Step(GlobalBatch(config, *data, step).narrow(0, shard.first, shard.count),
                   shard.first);
    }
    trained[r] = trainer.State();
    std::map<std::string, torch::Tensor> replicated = trainer.StateViews();
    const std::map<std::string, torch::Tensor> own = {
        {"rng/default", replicated.at("rng/default")}};
    replicated.erase("rng/default");
    CheckpointWriter writer(dir, r, 2, 3, 60);
    writer.Save(trainer.step(), replicated, own);
    writer.Wait();
  });
  const std::string path = dir + "/step_000000003";
  const auto checkpoint = ReadCheckpoint(path);
  // Thread-ranks share the process's default generator, so each rank's dropout stream is
  // checked in what StateForRank hands the rank, not in a live generator.
  for (int world : {1, 3}) {
    std::vector<std::map<std::string, torch::Tensor>> loaded(world);
    std::vector<torch::Tensor> rngs(world);
    OnRanks(world, [&](int r) {
      Trainer trainer(config, torch::kCPU, r);
      const auto state = StateForRank(checkpoint, r, torch::kCPU, config.train.seed, path);
      rngs[r] = state.at("rng/default");
      trainer.LoadState(state, path);
      loaded[r] = trainer.State();
    });
    for (int r = 0; r < world; ++r) {
      int compared = 0;
      for (const auto& [name, tensor] : trained[0]) {
        if (name == "rng/default") continue;
        EXPECT_TRUE(torch::equal(loaded[r].at(name), tensor))
            << name << " differs on rank " << r << " of " << world;
        ++compared;
      }
      EXPECT_GT(compared, 4 * 20) << "weights, EMA and both Adam moments of every parameter";
      if (r < 2) {
        EXPECT_TRUE(torch::equal(rngs[r], checkpoint.at("rng/default/" + std::to_string(r))))
            << "rank " << r << " continues its own dropout stream";
      } else {
        EXPECT_FALSE(torch::equal(rngs[r], checkpoint.at("rng/default/0")));
        EXPECT_FALSE(torch::equal(rngs[r], checkpoint.at("rng/default/1")));
        EXPECT_TRUE(
            torch::equal(rngs[r], DerivedGeneratorState(torch::kCPU, config.train.seed, r, 3)))
            << "a new rank's stream comes from (seed, rank, step)";
      }
    }
  }
  std::filesystem::remove_all(dir);
}

TEST(Communicator, LocalGroupCollectives) {
  LocalGroup group(3);
  std::vector<torch::Tensor> sums(3), gathered(3), broadcast(3);
  OnRanks(3, [&](int r) {
    Communicator& comm = group.rank(r);
    torch::Tensor x = torch::full({4}, double(r + 1));
    comm.AllReduce(x, ReduceOp::kAverage, "average");
    sums[r] = x;
    gathered[r] = comm.AllGather(torch::tensor({int64_t(r * 10)}), "gather");
    torch::Tensor b = torch::full({2}, double(r));
    comm.Broadcast(b, 2, "broadcast");
    broadcast[r] = b;
    comm.Barrier("barrier");
  });
  for (int r = 0; r < 3; ++r) {
    EXPECT_TRUE(torch::equal(sums[r], torch::full({4}, 2.0)));  // (1 + 2 + 3) / 3
    EXPECT_TRUE(
        torch::equal(gathered[r], torch::tensor({{int64_t{0}}, {int64_t{10}}, {int64_t{20}}})));
    EXPECT_TRUE(torch::equal(broadcast[r], torch::full({2}, 2.0)));
  }
}

TEST(Communicator, MismatchedCollectivesAndTimeoutsAreReported) {
  LocalGroup group(2);
  group.rank(0).set_timeout(std::chrono::milliseconds(200));
  std::string error;
  try {
    group.rank(0).Barrier("barrier nobody else joins");
  } catch (const CommError& e) {
    error = e.what();
  }
  EXPECT_NE(error.find("rank 0: barrier nobody else joins did not complete"), std::string::npos)
      << error;
}

}  // namespace
}  // namespace ddpm
