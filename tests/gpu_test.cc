// The GPU path (ctest label gpu): one training step is deterministic on CUDA, and bf16 autocast
// stays close to fp32 there. Skipped, saying so, where no CUDA device is visible.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "trainer/config.h"
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
  }
};

TEST_F(Gpu, OneStepIsDeterministic) {
  const Config config = Tiny();
  Trainer a(config, torch::kCUDA), b(config, torch::kCUDA);
  const torch::Tensor batch = ShapesBatch();
  const StepStats sa = a.Step(batch), sb = b.Step(batch);
  EXPECT_EQ(sa.loss, sb.loss);
  const auto pa = a.model()->parameters(), pb = b.model()->parameters();
  for (size_t i = 0; i < pa.size(); ++i) EXPECT_TRUE(torch::equal(pa[i], pb[i])) << "parameter " << i;
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
  EXPECT_NE(a.loss, b.loss);
  EXPECT_NEAR(b.loss, a.loss, 0.03 * a.loss);
  EXPECT_NEAR(b.grad_norm, a.grad_norm, 0.1 * a.grad_norm);
}

}  // namespace
}  // namespace ddpm
