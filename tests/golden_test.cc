// Golden parity with the plain-PyTorch reference (tests/reference/ddpm_ref.py): the same
// weights and inputs give the same UNet output, loss, and gradient of every parameter.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "test_env.h"
#include "trainer/diffusion.h"
#include "trainer/tensor_io.h"
#include "trainer/trainer.h"
#include "trainer/unet.h"

namespace ddpm {
namespace {

int RunCommand(const std::string& command) { return std::system(command.c_str()); }

TEST(Golden, UNetOutputLossAndGradientsMatchPyTorch) {
  const std::string python = DDPM_REFERENCE_PYTHON;
  if (RunCommand(python + " -c 'import torch' > /dev/null 2>&1") != 0) {
    GTEST_SKIP() << "golden parity needs " << python
                 << " with torch (Debian: apt-get install python3-torch); it cannot run here";
  }
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("ddpm_golden_" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);

  // Every block type: res blocks with and without shortcut, attention, down- and upsampling.
  ModelConfig m;
  m.ch = 32;
  m.ch_mult = {1, 2};
  m.num_res_blocks = 1;
  m.attn_resolutions = {8};
  m.image_size = 16;
  m.norm_groups = 8;
  m.dropout = 0.1;
  UNet model(m, /*seed=*/5);
  model->eval();

  // Random weights everywhere (the authors' near-zero output layers would hide mistakes).
  torch::manual_seed(11);
  {
    torch::NoGradGuard no_grad;
    for (auto& item : model->named_parameters()) {
      torch::Tensor p = item.value();
      if (p.dim() > 1) {
        p.copy_(torch::randn_like(p) * (0.8 / std::sqrt(static_cast<double>(p[0].numel()))));
      } else if (item.key().find("norm") != std::string::npos &&
                 item.key().find(".weight") != std::string::npos) {
        p.copy_(1.0 + 0.1 * torch::randn_like(p));
      } else {
        p.copy_(0.1 * torch::randn_like(p));
      }
    }
  }
  const torch::Tensor x0 = torch::rand({4, 3, 16, 16}) * 2 - 1;
  const torch::Tensor t = torch::tensor({0, 17, 500, 999}, torch::kLong);
  const torch::Tensor noise = torch::randn({4, 3, 16, 16});

  std::map<std::string, torch::Tensor> inputs;
  for (const auto& [name, tensor] : StateDict(*model)) inputs["param." + name] = tensor;
  inputs["x0"] = x0;
  inputs["t"] = t;
  inputs["noise"] = noise;
  const std::string in_path = (dir / "in.pt").string();
  const std::string out_path = (dir / "out.pt").string();
  SaveTensors(inputs, in_path);

  const std::string config_json =
      "{\"ch\": 32, \"ch_mult\": [1, 2], \"num_res_blocks\": 1, \"attn_resolutions\": [8], "
      "\"dropout\": 0.1, \"image_size\": 16, \"in_channels\": 3, \"norm_groups\": 8, "
      "\"timesteps\": 1000}";
  const std::string log_path = (dir / "python.log").string();
  const int rc =
      RunCommand(python + " " + DDPM_SOURCE_DIR + "/tests/reference/golden.py " + in_path + " " +
                 out_path + " '" + config_json + "' > " + log_path + " 2>&1");
  ASSERT_EQ(rc, 0) << "the Python reference failed; see " << log_path;
  const std::map<std::string, torch::Tensor> ref = LoadTensors(out_path);

  EXPECT_EQ(ref.at("num_params").item<int64_t>(), CountParameters(*model));

  DiffusionConfig dc;
  const GaussianDiffusion diffusion(dc);
  const torch::Tensor x_t = diffusion.q_sample(x0, t, noise);
  EXPECT_LT((x_t - ref.at("x_t")).abs().max().item<double>(), 1e-5);

  torch::Tensor out;
  {
    torch::NoGradGuard no_grad;
    out = model->forward(x_t, t);
  }
  ASSERT_EQ(out.sizes(), ref.at("out").sizes());
  EXPECT_GT(out.abs().max().item<double>(), 0.1) << "a non-trivial output";
  EXPECT_LT((out - ref.at("out")).abs().max().item<double>(), 1e-4);

  const Denoiser denoiser = [&](const torch::Tensor& x, const torch::Tensor& tt) {
    return model->forward(x, tt);
  };
  const DiffusionLoss loss = diffusion.TrainingLoss(denoiser, x0, t, noise);
  EXPECT_NEAR(loss.loss.item<double>(), ref.at("loss").item<double>(), 1e-4);
  loss.loss.backward();

  int compared = 0;
  double worst_grad = 0;
  for (const auto& item : model->named_parameters()) {
    const torch::Tensor& grad = item.value().grad();
    const torch::Tensor& expected = ref.at("grad." + item.key());
    ASSERT_TRUE(grad.defined()) << item.key();
    const double diff = (grad - expected).abs().max().item<double>();
    worst_grad = std::max(worst_grad, diff);
    EXPECT_LT(diff, 1e-4) << item.key() << ": max |grad| " << expected.abs().max().item<double>();
    ++compared;
  }
  std::printf(
      "golden: max |output diff| %.3g, |loss diff| %.3g, max |grad diff| %.3g over %d "
      "parameters\n",
      (out - ref.at("out")).abs().max().item<double>(),
      std::abs(loss.loss.item<double>() - ref.at("loss").item<double>()), worst_grad, compared);
  // One of each block type is among them; all of them are compared.
  for (const char* name :
       {"temb_dense0.weight", "conv_in.weight", "down_0_0.conv1.weight",
        "down_0_0.temb_proj.weight", "down_0_ds.weight", "down_1_0.nin_shortcut.weight",
        "down_1_0.attn.qkv.weight", "mid_block1.attn.proj_out.weight", "up_1_us.weight",
        "up_0_1.norm2.weight", "conv_out.weight"}) {
    EXPECT_EQ(ref.count(std::string("grad.") + name), 1u) << name;
  }
  EXPECT_EQ(compared, static_cast<int>(model->parameters().size()));
  std::filesystem::remove_all(dir);
}

TEST(Golden, LearnedVariancesHybridAndVlbLossesAndGradientsMatchPyTorch) {
  const std::string python = DDPM_REFERENCE_PYTHON;
  if (RunCommand(python + " -c 'import torch' > /dev/null 2>&1") != 0) {
    GTEST_SKIP() << "golden parity needs " << python
                 << " with torch (Debian: apt-get install python3-torch); it cannot run here";
  }
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("ddpm_golden_vlb_" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  ModelConfig m;
  m.ch = 32;
  m.ch_mult = {1, 2};
  m.num_res_blocks = 1;
  m.attn_resolutions = {8};
  m.image_size = 16;
  m.norm_groups = 8;
  m.dropout = 0.1;
  m.learn_sigma = true;
  UNet model(m, /*seed=*/6);
  model->eval();
  torch::manual_seed(12);
  {
    // Random weights, small enough that the variance half stays inside (-1, 1) mostly, as
    // trained networks keep it.
    torch::NoGradGuard no_grad;
    for (auto& item : model->named_parameters()) {
      torch::Tensor p = item.value();
      if (p.dim() > 1) {
        p.copy_(torch::randn_like(p) * (0.5 / std::sqrt(static_cast<double>(p[0].numel()))));
      } else {
        p.copy_(0.05 * torch::randn_like(p));
      }
    }
  }
  // In float64 on both sides: the KL term at t = 1 divides by beta-tilde_1 ~ 1e-4, which would
  // magnify the float32 rounding differences of two convolution libraries past any tolerance
  // that still checks the formulas.
  model->to(torch::kFloat64);
  // Images on the 8-bit grid (the decoder's bins), t = 0 (the decoder term) among the steps.
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  const torch::Tensor x0 = torch::round((torch::rand({4, 3, 16, 16}, f64) * 2 - 1) * 127.5) / 127.5;
  const torch::Tensor t = torch::tensor({0, 1, 300, 999}, torch::kLong);
  const torch::Tensor noise = torch::randn({4, 3, 16, 16}, f64);
  std::map<std::string, torch::Tensor> inputs;
  for (const auto& [name, tensor] : StateDict(*model)) inputs["param." + name] = tensor;
  inputs["x0"] = x0;
  inputs["t"] = t;
  inputs["noise"] = noise;
  const std::string in_path = (dir / "in.pt").string();
  const std::string out_path = (dir / "out.pt").string();
  SaveTensors(inputs, in_path);
  const std::string config_json =
      "{\"ch\": 32, \"ch_mult\": [1, 2], \"num_res_blocks\": 1, \"attn_resolutions\": [8], "
      "\"dropout\": 0.1, \"image_size\": 16, \"in_channels\": 3, \"norm_groups\": 8, "
      "\"timesteps\": 1000}";
  const std::string log_path = (dir / "python.log").string();
  ASSERT_EQ(RunCommand(python + " " + DDPM_SOURCE_DIR + "/tests/reference/golden_vlb.py " +
                       in_path + " " + out_path + " '" + config_json + "' > " + log_path + " 2>&1"),
            0)
      << "the Python reference failed; see " << log_path;
  const std::map<std::string, torch::Tensor> ref = LoadTensors(out_path);

  const Denoiser denoiser = [&](const torch::Tensor& x, const torch::Tensor& tt) {
    return model->forward(x, tt);
  };
  for (const LossKind kind : {LossKind::kHybrid, LossKind::kVlb}) {
    SCOPED_TRACE(Name(kind));
    DiffusionConfig dc;
    dc.loss = kind;
    const GaussianDiffusion diffusion(dc);
    model->zero_grad();
    const DiffusionLoss loss = diffusion.TrainingLoss(denoiser, x0, t, noise);
    const double expected_loss = ref.at(std::string("loss_") + Name(kind)).item<double>();
    // Relative to the loss's size (the vlb loss is T L_t). In float64 the two agree to about
    // 1e-14; 1e-9 leaves room for summation order and still catches any formula's slip.
    EXPECT_NEAR(loss.loss.item<double>(), expected_loss,
                1e-9 * std::max(1.0, std::abs(expected_loss)));
    loss.loss.backward();
    double worst = 0;
    for (const auto& item : model->named_parameters()) {
      const torch::Tensor& expected = ref.at(std::string("grad_") + Name(kind) + "." + item.key());
      ASSERT_TRUE(item.value().grad().defined()) << item.key();
      const double scale = std::max(1.0, expected.abs().max().item<double>());
      const double diff = (item.value().grad() - expected).abs().max().item<double>() / scale;
      worst = std::max(worst, diff);
      EXPECT_LT(diff, 1e-9) << item.key() << ": max |grad| " << scale;
    }
    std::printf("golden %s: loss %.6g (reference %.6g), worst relative grad diff %.3g\n",
                Name(kind), loss.loss.item<double>(), expected_loss, worst);
  }
  std::filesystem::remove_all(dir);
}

TEST(Golden, ClassConditionalUNetWithLabelsAndNoClassMatchesPyTorch) {
  const std::string python = DDPM_REFERENCE_PYTHON;
  if (RunCommand(python + " -c 'import torch' > /dev/null 2>&1") != 0) {
    GTEST_SKIP() << "golden parity needs " << python
                 << " with torch (Debian: apt-get install python3-torch); it cannot run here";
  }
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("ddpm_golden_cond_" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  ModelConfig m;
  m.ch = 16;
  m.ch_mult = {1, 2};
  m.num_res_blocks = 1;
  m.attn_resolutions = {8};
  m.image_size = 16;
  m.norm_groups = 8;
  m.num_classes = 3;
  UNet model(m, /*seed=*/7);
  model->eval();
  torch::manual_seed(13);
  {
    torch::NoGradGuard no_grad;
    for (auto& item : model->named_parameters()) {
      torch::Tensor p = item.value();
      p.copy_(p.dim() > 1
                  ? torch::randn_like(p) * (0.8 / std::sqrt(static_cast<double>(p[0].numel())))
                  : 0.1 * torch::randn_like(p));
    }
  }
  // Every label and "no class" (3) among the four samples.
  const torch::Tensor y = torch::tensor({0, 3, 2, 1}, torch::kLong);
  const torch::Tensor x0 = torch::rand({4, 3, 16, 16}) * 2 - 1;
  const torch::Tensor t = torch::tensor({0, 17, 500, 999}, torch::kLong);
  const torch::Tensor noise = torch::randn({4, 3, 16, 16});
  std::map<std::string, torch::Tensor> inputs;
  for (const auto& [name, tensor] : StateDict(*model)) inputs["param." + name] = tensor;
  ASSERT_EQ(inputs.count("param.class_embed.weight"), 1u);
  EXPECT_EQ(inputs.at("param.class_embed.weight").sizes(), (std::vector<int64_t>{4, 64}));
  inputs["x0"] = x0;
  inputs["t"] = t;
  inputs["noise"] = noise;
  inputs["y"] = y;
  const std::string in_path = (dir / "in.pt").string();
  const std::string out_path = (dir / "out.pt").string();
  SaveTensors(inputs, in_path);
  const std::string config_json =
      "{\"ch\": 16, \"ch_mult\": [1, 2], \"num_res_blocks\": 1, \"attn_resolutions\": [8], "
      "\"dropout\": 0.1, \"image_size\": 16, \"in_channels\": 3, \"norm_groups\": 8, "
      "\"num_classes\": 3, \"timesteps\": 1000}";
  const std::string log_path = (dir / "python.log").string();
  ASSERT_EQ(RunCommand(python + " " + DDPM_SOURCE_DIR + "/tests/reference/golden.py " + in_path +
                       " " + out_path + " '" + config_json + "' > " + log_path + " 2>&1"),
            0)
      << "the Python reference failed; see " << log_path;
  const std::map<std::string, torch::Tensor> ref = LoadTensors(out_path);
  EXPECT_EQ(ref.at("num_params").item<int64_t>(), CountParameters(*model));

  const GaussianDiffusion diffusion(DiffusionConfig{});
  const torch::Tensor x_t = diffusion.q_sample(x0, t, noise);
  torch::Tensor out;
  {
    torch::NoGradGuard no_grad;
    out = model->forward(x_t, t, y);
    // No labels at all is "no class" for every sample; the label changes the output.
    const torch::Tensor none = model->forward(x_t, t);
    const torch::Tensor all_null = model->forward(x_t, t, torch::full({4}, 3, torch::kLong));
    EXPECT_TRUE(torch::equal(none, all_null));
    EXPECT_GT((none[0] - out[0]).abs().max().item<double>(), 1e-3);
    EXPECT_TRUE(torch::allclose(none[1], out[1], 0, 1e-6));  // sample 1 is "no class" in y
  }
  EXPECT_LT((out - ref.at("out")).abs().max().item<double>(), 1e-4);
  const Denoiser denoiser = [&](const torch::Tensor& x, const torch::Tensor& tt) {
    return model->forward(x, tt, y);
  };
  const DiffusionLoss loss = diffusion.TrainingLoss(denoiser, x0, t, noise);
  EXPECT_NEAR(loss.loss.item<double>(), ref.at("loss").item<double>(), 1e-4);
  loss.loss.backward();
  int compared = 0;
  for (const auto& item : model->named_parameters()) {
    ASSERT_TRUE(item.value().grad().defined()) << item.key();
    EXPECT_LT((item.value().grad() - ref.at("grad." + item.key())).abs().max().item<double>(), 1e-4)
        << item.key();
    ++compared;
  }
  EXPECT_EQ(compared, static_cast<int>(model->parameters().size()));
  // The rows of labels 0, 2, 1 and "no class" each got a gradient.
  const torch::Tensor row_grads = model->named_parameters()["class_embed.weight"].grad();
  for (int row = 0; row < 4; ++row) EXPECT_GT(row_grads[row].abs().sum().item<double>(), 0) << row;
  std::filesystem::remove_all(dir);
}

TEST(Golden, WeightsOfAnotherNumberOfClassesAreRefusedNamingBoth) {
  ModelConfig conditional;
  conditional.ch = 16;
  conditional.ch_mult = {1};
  conditional.num_res_blocks = 1;
  conditional.attn_resolutions = {};
  conditional.image_size = 8;
  conditional.norm_groups = 8;
  conditional.num_classes = 10;
  ModelConfig unconditional = conditional;
  unconditional.num_classes = 0;
  const auto weights_of = [](const ModelConfig& m) { return StateDict(*UNet(m)); };
  EXPECT_NO_THROW(CheckNumClasses(conditional, weights_of(conditional), "w.pt"));
  EXPECT_NO_THROW(CheckNumClasses(unconditional, weights_of(unconditional), "w.pt"));
  const std::pair<ModelConfig, ModelConfig> cases[] = {{conditional, unconditional},
                                                       {unconditional, conditional}};
  for (const auto& [trained, config] : cases) {
    try {
      CheckNumClasses(config, weights_of(trained), "w.pt");
      ADD_FAILURE() << "loaded weights of " << trained.num_classes << " classes as "
                    << config.num_classes;
    } catch (const std::runtime_error& error) {
      const std::string expected =
          std::string("w.pt: the weights are of a model with model.num_classes ") +
          (trained.num_classes == 0 ? "0 (unconditional)" : "10") +
          "; the config says model.num_classes " +
          (config.num_classes == 0 ? "0 (unconditional)" : "10");
      EXPECT_EQ(error.what(), expected);
    }
  }
}

}  // namespace
}  // namespace ddpm
