// The MPI backend under `mpirun -np 2`: collectives, W ranks x B/W == 1 rank x B, and identical
// parameters on every rank (checked by all-gathering a checksum).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "comm/mpi_communicator.h"
#include "eval/fid.h"
#include "tests/dist_fixtures.h"

namespace ddpm {
namespace {

MpiCommunicator* g_comm = nullptr;

TEST(Mpi, Collectives) {
  MpiCommunicator& comm = *g_comm;
  const int rank = comm.rank(), world = comm.world_size();
  torch::Tensor x = torch::full({5}, float(rank + 1));
  comm.AllReduce(x, ReduceOp::kSum, "sum");
  EXPECT_TRUE(torch::equal(x, torch::full({5}, float(world * (world + 1) / 2))));
  torch::Tensor y = torch::full({3}, double(rank));
  comm.AllReduce(y, ReduceOp::kAverage, "average");
  EXPECT_TRUE(torch::allclose(y, torch::full({3}, (world - 1) / 2.0)));
  const torch::Tensor gathered =
      comm.AllGather(torch::tensor({int64_t(rank), int64_t(7)}), "gather");
  ASSERT_EQ(gathered.size(0), world);
  for (int r = 0; r < world; ++r) EXPECT_EQ(gathered[r][0].item<int64_t>(), r);
  torch::Tensor b = torch::full({4}, uint8_t(rank + 10), torch::kUInt8);
  comm.Broadcast(b, world - 1, "broadcast");
  EXPECT_TRUE(torch::equal(b, torch::full({4}, uint8_t(world - 1 + 10), torch::kUInt8)));
  comm.Barrier("barrier");
  std::string error;
  try {
    comm.AllReduce(torch::zeros({2}, torch::kInt32), ReduceOp::kSum, "int32 sum");
  } catch (const CommError& e) {
    error = e.what();
  }
  EXPECT_NE(error.find("int32 sum: the MPI backend does not handle"), std::string::npos) << error;
}

TEST(Mpi, FidAndIsStatisticsSummedOverRanksEqualOneProcess) {
  // Every rank holds the same 37 samples; each adds only its share (rows r, r + W, ...), as
  // evaluation does, then the sums are all-reduced; one process adds them all.
  MpiCommunicator& comm = *g_comm;
  const int rank = comm.rank(), world = comm.world_size();
  torch::manual_seed(5);
  const torch::Tensor features = torch::randn({37, 16}, torch::kFloat64);
  const torch::Tensor logits = torch::randn({37, 30}, torch::kFloat64) * 2;
  FeatureMoments whole(16), share(16);
  ScoreMoments whole_score(37, 30), share_score(37, 30);
  whole.Add(features);
  whole_score.Add(logits, 0);
  for (int64_t i = rank; i < 37; i += world) {
    share.Add(features.slice(0, i, i + 1));
    share_score.Add(logits.slice(0, i, i + 1), i);
  }
  comm.AllReduce(share.packed(), ReduceOp::kSum, "FID moments");
  comm.AllReduce(share_score.packed(), ReduceOp::kSum, "IS moments");
  EXPECT_EQ(share.count(), 37);
  EXPECT_TRUE(torch::allclose(share.Mean(), whole.Mean(), 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(share.Covariance(), whole.Covariance(), 1e-12, 1e-12));
  EXPECT_NEAR(share_score.Score().first, whole_score.Score().first, 1e-12);
  EXPECT_NEAR(share_score.Score().second, whole_score.Score().second, 1e-12);
}

TEST(Mpi, RanksMatchOneRankWithTheWholeBatchAndEachOther) {
  MpiCommunicator& comm = *g_comm;
  ASSERT_EQ(16 % comm.world_size(), 0);
  for (int accum : {1, 2}) {
    const Config config = EquivalenceConfig(accum);
    // The reference, computed by every rank alone on the whole global batch.
    const torch::Tensor reference = TrainRanks(config, 10, nullptr);
    const torch::Tensor mine = TrainRanks(config, 10, &comm, 0.05);
    const double difference = RelativeDifference(mine, reference);
    std::printf("rank %d, grad_accum %d: max |2 ranks - 1 rank| / max |1 rank| = %.3g\n",
                comm.rank(), accum, difference);
    EXPECT_LT(difference, 1e-5) << "rank " << comm.rank() << ", grad_accum " << accum;
    // A float64 checksum of the parameters, the same bits on every rank.
    const torch::Tensor checksum =
        (mine.to(torch::kFloat64) * torch::arange(1, mine.numel() + 1, torch::kFloat64)).sum();
    const torch::Tensor all = comm.AllGather(checksum.reshape({1}), "checksum");
    for (int r = 1; r < comm.world_size(); ++r) {
      EXPECT_EQ(all[r].item<double>(), all[0].item<double>())
          << "rank " << r << " differs from rank 0, grad_accum " << accum;
    }
  }
}

}  // namespace
}  // namespace ddpm

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (!ddpm::LaunchedByMpi()) {
    std::fprintf(stderr, "ddpm_mpi_tests: run me under mpirun -np 2 (ctest does)\n");
    return 1;
  }
  int code = 0;
  {
    ddpm::MpiRuntime mpi(&argc, &argv);
    {
      ddpm::MpiCommunicator comm(mpi.placement());
      comm.set_timeout(std::chrono::seconds(120));
      ddpm::g_comm = &comm;
      code = RUN_ALL_TESTS();
      torch::Tensor failed = torch::tensor({int64_t(code != 0)});
      comm.AllReduce(failed, ddpm::ReduceOp::kSum, "failures");
      if (failed.item<int64_t>() != 0 && code == 0) {
        std::fprintf(stderr, "ddpm_mpi_tests: another rank failed\n");
        code = 1;
      }
      ddpm::g_comm = nullptr;
    }
  }
  return code;
}
