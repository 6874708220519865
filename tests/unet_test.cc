// The UNet: parameter counts from the architecture's closed form, output shapes for
// non-default configs, the authors' initialization, and the timestep embedding.
#include "trainer/unet.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "trainer/flops.h"

namespace ddpm {
namespace {

// Parameters of the UNet described in DESIGN.md, counted layer by layer from the paper's
// architecture rather than from the module.
int64_t ExpectedParameters(const ModelConfig& m) {
  auto conv = [](int64_t in, int64_t out, int64_t k) { return in * out * k * k + out; };
  auto norm = [](int64_t ch) { return 2 * ch; };
  const int64_t temb = 4 * m.ch;
  auto attn = [&](int64_t ch) { return norm(ch) + conv(ch, 3 * ch, 1) + conv(ch, ch, 1); };
  auto res = [&](int64_t in, int64_t out, bool with_attn) {
    int64_t n = norm(in) + conv(in, out, 3) + (temb * out + out) + norm(out) + conv(out, out, 3);
    if (in != out) n += conv(in, out, 1);
    if (with_attn) n += attn(out);
    return n;
  };
  auto attends = [&](int r) {
    for (int a : m.attn_resolutions) {
      if (a == r) return true;
    }
    return false;
  };
  int64_t total = (m.ch * temb + temb) + (temb * temb + temb) + conv(m.in_channels, m.ch, 3);
  std::vector<int64_t> skips = {m.ch};
  int64_t cur = m.ch;
  int r = m.image_size;
  const int levels = static_cast<int>(m.ch_mult.size());
  for (int level = 0; level < levels; ++level) {
    for (int b = 0; b < m.num_res_blocks; ++b) {
      total += res(cur, m.ch * m.ch_mult[level], attends(r));
      cur = m.ch * m.ch_mult[level];
      skips.push_back(cur);
    }
    if (level != levels - 1) {
      total += conv(cur, cur, 3);
      skips.push_back(cur);
      r /= 2;
    }
  }
  total += res(cur, cur, true) + res(cur, cur, false);
  for (int level = levels - 1; level >= 0; --level) {
    for (int b = 0; b < m.num_res_blocks + 1; ++b) {
      total += res(cur + skips.back(), m.ch * m.ch_mult[level], attends(r));
      skips.pop_back();
      cur = m.ch * m.ch_mult[level];
    }
    if (level != 0) {
      total += conv(cur, cur, 3);
      r *= 2;
    }
  }
  return total + norm(cur) + conv(cur, m.in_channels, 3);
}

TEST(UNet, ThePapersCifar10ModelHas35746307Parameters) {
  const ModelConfig paper;  // the defaults are the paper's CIFAR-10 model
  EXPECT_EQ(ExpectedParameters(paper), 35746307) << "the closed form itself";
  UNet model(paper);
  EXPECT_EQ(CountParameters(*model), 35746307);
}

TEST(UNet, NonDefaultConfigsHaveTheRightShapesAndCounts) {
  struct Case {
    std::vector<int> ch_mult;
    int num_res_blocks;
    std::vector<int> attn;
    int image_size;
    int in_channels;
  };
  for (const Case& c : {Case{{1, 2}, 1, {8}, 16, 3}, Case{{1, 2, 4}, 2, {}, 32, 1},
                        Case{{1, 1, 2, 2}, 1, {4, 16}, 32, 4}, Case{{2}, 1, {8}, 8, 3}}) {
    ModelConfig m;
    m.ch = 32;
    m.norm_groups = 8;
    m.ch_mult = c.ch_mult;
    m.num_res_blocks = c.num_res_blocks;
    m.attn_resolutions = c.attn;
    m.image_size = c.image_size;
    m.in_channels = c.in_channels;
    UNet model(m);
    EXPECT_EQ(CountParameters(*model), ExpectedParameters(m));
    const torch::Tensor x = torch::randn({2, c.in_channels, c.image_size, c.image_size});
    const torch::Tensor out = model->forward(x, torch::tensor({0, 999}, torch::kLong));
    EXPECT_EQ(out.sizes(), x.sizes());
  }
}

TEST(UNet, InitializedLikeTheAuthors) {
  ModelConfig m;
  m.ch = 32;
  m.norm_groups = 8;
  m.ch_mult = {1, 2};
  m.attn_resolutions = {16};
  m.image_size = 32;
  UNet model(m, /*seed=*/1);
  for (const auto& item : model->named_parameters()) {
    const std::string& name = item.key();
    const torch::Tensor& p = item.value();
    const bool zero_scale = name.find("conv2.weight") != std::string::npos ||
                            name.find("proj_out.weight") != std::string::npos ||
                            name == "conv_out.weight";
    if (name.size() >= 5 && name.compare(name.size() - 5, 5, ".bias") == 0) {
      EXPECT_EQ(p.abs().max().item<double>(), 0.0) << name;
    } else if (name.find("norm") != std::string::npos) {
      EXPECT_TRUE(torch::equal(p, torch::ones_like(p))) << name;
    } else {
      // variance_scaling(fan_avg, uniform): U(-b, b) with b = sqrt(3 scale / fan_avg).
      const int64_t receptive = p.dim() > 2 ? p.size(2) * p.size(3) : 1;
      const double fan_avg = (p.size(0) + p.size(1)) * receptive / 2.0;
      const double bound = std::sqrt(3.0 * (zero_scale ? 1e-10 : 1.0) / fan_avg);
      EXPECT_LE(p.abs().max().item<double>(), bound * (1 + 1e-6)) << name;
      EXPECT_GT(p.abs().max().item<double>(), bound * 0.9) << name;
    }
  }
  // The output conv starts near zero, so the first eps prediction is near zero.
  const torch::Tensor out = model->forward(torch::randn({2, 3, 32, 32}), torch::tensor({5, 500}));
  EXPECT_LT(out.abs().max().item<double>(), 1e-3);
}

TEST(UNet, SameSeedSameWeights) {
  ModelConfig m;
  m.ch = 32;
  m.norm_groups = 8;
  m.ch_mult = {1, 2};
  m.image_size = 16;
  UNet a(m, 3), b(m, 3), c(m, 4);
  const auto pa = a->parameters(), pb = b->parameters(), pc = c->parameters();
  bool all_equal = true, any_differs = false;
  for (std::size_t i = 0; i < pa.size(); ++i) {
    all_equal = all_equal && torch::equal(pa[i], pb[i]);
    any_differs = any_differs || !torch::equal(pa[i], pc[i]);
  }
  EXPECT_TRUE(all_equal);
  EXPECT_TRUE(any_differs);
}

TEST(UNet, TimestepEmbeddingIsTheAuthorsSinusoid) {
  const torch::Tensor t = torch::tensor({0, 7, 999}, torch::kLong);
  const torch::Tensor emb = TimestepEmbedding(t, 8);
  ASSERT_EQ(emb.sizes(), (std::vector<int64_t>{3, 8}));
  for (int row = 0; row < 3; ++row) {
    const double time = t[row].item<double>();
    for (int i = 0; i < 4; ++i) {
      const double freq = std::exp(-std::log(10000.0) * i / 3.0);
      EXPECT_NEAR(emb[row][i].item<double>(), std::sin(time * freq), 1e-4);
      EXPECT_NEAR(emb[row][4 + i].item<double>(), std::cos(time * freq), 1e-4);
    }
  }
}

}  // namespace
}  // namespace ddpm

namespace ddpm {
namespace {

TEST(Flops, CountsConvolutionsAndMatrixProductsByTheirClosedForms) {
  // Each expected value is 2 * (multiply-adds), written out from the shapes.
  torch::NoGradGuard no_grad;
  const torch::Tensor x = torch::randn({2, 3, 16, 16});
  const torch::Tensor w = torch::randn({8, 3, 3, 3});
  EXPECT_EQ(CountFlops([&] { torch::conv2d(x, w, {}, 1, torch::IntArrayRef{1}); }),
            2.0 * 2 * 8 * 16 * 16 * 3 * 9);
  // Stride 2, no padding: (16 - 3) / 2 + 1 = 7 outputs per side.
  EXPECT_EQ(CountFlops([&] { torch::conv2d(x, w, {}, 2, torch::IntArrayRef{0}); }),
            2.0 * 2 * 8 * 7 * 7 * 3 * 9);
  // Grouped: 2 groups of 4 input channels each.
  const torch::Tensor xg = torch::randn({1, 8, 5, 5}), wg = torch::randn({6, 4, 1, 1});
  EXPECT_EQ(CountFlops([&] { torch::conv2d(xg, wg, {}, 1, torch::IntArrayRef{0}, 1, 2); }),
            2.0 * 6 * 25 * 4);
  torch::nn::Linear linear(5, 7);
  const torch::Tensor rows = torch::randn({4, 5});
  EXPECT_EQ(CountFlops([&] { linear->forward(rows); }), 2.0 * 4 * 5 * 7);
  const torch::Tensor a = torch::randn({2, 3, 4}), b = torch::randn({2, 4, 5});
  EXPECT_EQ(CountFlops([&] { torch::bmm(a, b); }), 2.0 * 2 * 3 * 4 * 5);
  EXPECT_EQ(CountFlops([&] { torch::relu(x); }), 0.0) << "elementwise ops are not counted";
}

}  // namespace
}  // namespace ddpm
