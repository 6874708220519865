// The GPU path (ctest label gpu): one training step is deterministic on CUDA, bf16 autocast
// stays close to fp32 there, a captured CUDA-graph step equals the eager step, and
// channels_last trains like contiguous. Skipped, saying so, where no CUDA device is visible.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "config/config.h"
#include "trainer/data.h"
#include "trainer/trainer.h"

namespace ddpm {
namespace {

Config Tiny() {
  return LoadConfigString(R"(
model: {ch: 32, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], image_size: 16,
        norm_groups: 8, dropout: 0.1}
train: {batch_size: 16, lr: 0.001, warmup_steps: 10, seed: 3, device: cuda}
)");
}

torch::Tensor ShapesBatch() {
  ShapesDataset data(16, 16, 0);
  torch::Tensor images = torch::empty({16, 3, 16, 16}, torch::kUInt8);
  for (int64_t i = 0; i < 16; ++i) data.Read(i, images[i].data_ptr<uint8_t>());
  return images.to(torch::kFloat32) / 127.5 - 1;
}

class Gpu : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) {
      GTEST_SKIP() << "no CUDA device visible to this LibTorch: the GPU tests run on a GPU "
                      "machine (build against a CUDA LibTorch and run ctest -L gpu)";
    }
    // cuDNN may otherwise pick convolution algorithms that sum in a varying order.
    at::globalContext().setDeterministicCuDNN(true);
    at::globalContext().setBenchmarkCuDNN(false);
  }
};

// Runs steps of a fresh trainer on batch, returning each step's loss and the final weights.
// Trainers run one after another: each seeds the device's shared dropout generator.
std::pair<std::vector<double>, std::vector<torch::Tensor>> Train(const Config& config, int steps,
                                                                 const torch::Tensor& batch,
                                                                 bool* captured = nullptr) {
  Trainer trainer(config, torch::kCUDA);
  std::vector<double> losses;
  for (int i = 0; i < steps; ++i) losses.push_back(trainer.Step(batch).loss());
  if (captured != nullptr) *captured = trainer.graph_captured();
  std::vector<torch::Tensor> weights;
  for (const auto& p : trainer.model()->parameters())
    weights.push_back(p.detach().cpu().contiguous());
  for (const auto& p : trainer.ema_model()->parameters())
    weights.push_back(p.detach().cpu().contiguous());
  return {losses, weights};
}

TEST_F(Gpu, OneStepIsDeterministic) {
  const Config config = Tiny();
  const torch::Tensor batch = ShapesBatch();
  const auto [loss_a, weights_a] = Train(config, 1, batch);
  const auto [loss_b, weights_b] = Train(config, 1, batch);
  EXPECT_EQ(loss_a[0], loss_b[0]);
  for (size_t i = 0; i < weights_a.size(); ++i) {
    EXPECT_TRUE(torch::equal(weights_a[i], weights_b[i])) << "tensor " << i;
  }
}

TEST_F(Gpu, CudaGraphStepEqualsEagerStep) {
  // Three eager warm-up steps, the capture (which replays once), then two replays: with
  // dropout on, so the graph must advance the dropout generator as the eager steps do.
  Config config = Tiny();
  const torch::Tensor batch = ShapesBatch();
  const int steps = 6;
  const auto [eager_loss, eager_weights] = Train(config, steps, batch);
  config.train.cuda_graphs = true;
  bool captured = false;
  const auto [graph_loss, graph_weights] = Train(config, steps, batch, &captured);
  EXPECT_TRUE(captured);
  for (int i = 0; i < steps; ++i) {
    EXPECT_NEAR(graph_loss[i], eager_loss[i], 1e-6 * eager_loss[i]) << "step " << i + 1;
  }
  for (size_t i = 0; i < eager_weights.size(); ++i) {
    EXPECT_TRUE(torch::allclose(graph_weights[i], eager_weights[i], 1e-5, 1e-7)) << "tensor " << i;
  }
}

TEST_F(Gpu, Bf16ChannelsLastGraphStepTrains) {
  // The fast path all together (bf16, channels_last, a CUDA graph): its loss stays within
  // bf16's rounding of the fp32 eager run's over the same steps.
  Config config = Tiny();
  config.model.dropout = 0;
  const torch::Tensor batch = ShapesBatch();
  const auto [fp32_loss, fp32_weights] = Train(config, 6, batch);
  config.train.precision = Precision::kBf16;
  config.train.channels_last = true;
  config.train.cuda_graphs = true;
  bool captured = false;
  const auto [fast_loss, fast_weights] = Train(config, 6, batch, &captured);
  EXPECT_TRUE(captured);
  for (int i = 0; i < 6; ++i) {
    EXPECT_NEAR(fast_loss[i], fp32_loss[i], 0.03 * fp32_loss[i]) << "step " << i + 1;
  }
}

TEST_F(Gpu, Bf16LossIsCloseToFp32) {
  // The UNet's output conv starts at zero, so the first step's loss is the same in both; the
  // second step's differs by bf16's rounding only.
  Config config = Tiny();
  config.model.dropout = 0;
  Trainer fp32(config, torch::kCUDA);
  config.train.precision = Precision::kBf16;
  Trainer bf16(config, torch::kCUDA);
  const torch::Tensor batch = ShapesBatch();
  fp32.Step(batch);
  bf16.Step(batch);
  const StepStats a = fp32.Step(batch), b = bf16.Step(batch);
  EXPECT_NE(a.loss(), b.loss());
  EXPECT_NEAR(b.loss(), a.loss(), 0.03 * a.loss());
  EXPECT_NEAR(b.grad_norm(), a.grad_norm(), 0.1 * a.grad_norm());
}

}  // namespace
}  // namespace ddpm
