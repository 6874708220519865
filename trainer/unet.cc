#include "trainer/unet.h"

#include <cmath>
#include <string>

#include "trainer/tensor_io.h"

namespace ddpm {
namespace {

namespace nn = torch::nn;
namespace F = torch::nn::functional;

// The authors' initializer: variance_scaling(scale, mode='fan_avg', distribution='uniform')
// for weights, zeros for biases. Their init_scale=0 layers use scale 1e-10, i.e. near zero.
void InitFanAvg(const torch::Tensor& weight, const torch::Tensor& bias, double scale,
                torch::Generator& generator) {
  torch::NoGradGuard no_grad;
  const int64_t receptive = weight.dim() > 2 ? weight[0][0].numel() : 1;
  const double fan_in = static_cast<double>(weight.size(1) * receptive);
  const double fan_out = static_cast<double>(weight.size(0) * receptive);
  const double bound = std::sqrt(3.0 * scale / ((fan_in + fan_out) / 2.0));
  weight.uniform_(-bound, bound, generator);
  if (bias.defined()) bias.zero_();
}

constexpr double kZeroInitScale = 1e-10;

nn::Conv2d Conv(int in, int out, int kernel, int stride, int padding, double scale,
                torch::Generator& generator) {
  nn::Conv2d conv(nn::Conv2dOptions(in, out, kernel).stride(stride).padding(padding));
  InitFanAvg(conv->weight, conv->bias, scale, generator);
  return conv;
}

nn::Linear Dense(int in, int out, torch::Generator& generator) {
  nn::Linear dense(nn::LinearOptions(in, out));
  InitFanAvg(dense->weight, dense->bias, 1.0, generator);
  return dense;
}

nn::GroupNorm Norm(int groups, int channels) {
  return nn::GroupNorm(nn::GroupNormOptions(groups, channels).eps(1e-6));
}

// GroupNorm in its parameters' precision (fp32): under bf16 autocast the input arrives in bf16,
// and CPU autocast (LibTorch 1.13) does not list group_norm among the fp32 ops as CUDA's does.
torch::Tensor Normalize(nn::GroupNorm& norm, const torch::Tensor& x) {
  return norm(x.to(norm->weight.scalar_type()));
}

}  // namespace

torch::Tensor TimestepEmbedding(const torch::Tensor& t, int dim) {
  const int half = dim / 2;
  const double scale = -std::log(10000.0) / (half - 1);
  const auto options = torch::TensorOptions().dtype(torch::kFloat32).device(t.device());
  const torch::Tensor freqs = torch::exp(torch::arange(half, options) * scale);
  const torch::Tensor args = t.to(torch::kFloat32).unsqueeze(1) * freqs.unsqueeze(0);
  return torch::cat({torch::sin(args), torch::cos(args)}, 1);
}

void CheckLearnSigma(const ModelConfig& model, const std::map<std::string, torch::Tensor>& weights,
                     const std::string& origin) {
  const auto it = weights.find("conv_out.weight");
  if (it == weights.end() || it->second.dim() < 1) return;  // LoadStateDict names what is missing
  const int64_t channels = it->second.size(0);
  const bool learned = channels == 2 * model.in_channels;
  if (learned != model.learn_sigma && (learned || channels == model.in_channels)) {
    throw WeightsError(
        origin + ": the weights have " + std::to_string(channels) +
        " output channels, a model with learn_sigma: " + (learned ? "true" : "false") +
        "; the config says model.learn_sigma: " + (model.learn_sigma ? "true" : "false"));
  }
}

void CheckNumClasses(const ModelConfig& model, const std::map<std::string, torch::Tensor>& weights,
                     const std::string& origin) {
  const auto it = weights.find("class_embed.weight");
  const int trained =
      it == weights.end() || it->second.dim() < 1 ? 0 : static_cast<int>(it->second.size(0)) - 1;
  if (trained != model.num_classes) {
    const auto describe = [](int classes) {
      return classes == 0 ? std::string("0 (unconditional)") : std::to_string(classes);
    };
    throw WeightsError(origin + ": the weights are of a model with model.num_classes " +
                       describe(trained) + "; the config says model.num_classes " +
                       describe(model.num_classes));
  }
}

int64_t CountParameters(const torch::nn::Module& module) {
  int64_t count = 0;
  for (const auto& p : module.parameters()) count += p.numel();
  return count;
}

AttnBlockImpl::AttnBlockImpl(int channels, int groups, torch::Generator& generator) {
  norm_ = register_module("norm", Norm(groups, channels));
  // q, k and v in one 1x1 conv: one GEMM instead of three, the same parameter count.
  qkv_ = register_module("qkv", Conv(channels, 3 * channels, 1, 1, 0, 1.0, generator));
  proj_out_ =
      register_module("proj_out", Conv(channels, channels, 1, 1, 0, kZeroInitScale, generator));
}

torch::Tensor AttnBlockImpl::forward(const torch::Tensor& x) {
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const auto qkv =
      qkv_(Normalize(norm_, x)).reshape({batch, 3, channels, height * width}).unbind(1);
  const torch::Tensor& q = qkv[0];
  const torch::Tensor& k = qkv[1];
  const torch::Tensor& v = qkv[2];
  // w[b, i, j] = softmax_j(q_i . k_j / sqrt(C)); out[b, :, i] = sum_j w[b, i, j] v[b, :, j].
  const torch::Tensor weights =
      torch::softmax(torch::bmm(q.transpose(1, 2), k) * (1.0 / std::sqrt(double(channels))), -1);
  const torch::Tensor out =
      torch::bmm(v, weights.transpose(1, 2)).reshape({batch, channels, height, width});
  return x + proj_out_(out);
}

ResBlockImpl::ResBlockImpl(int in_channels, int out_channels, int temb_channels, double dropout,
                           int groups, bool with_attention, torch::Generator& generator) {
  norm1_ = register_module("norm1", Norm(groups, in_channels));
  conv1_ = register_module("conv1", Conv(in_channels, out_channels, 3, 1, 1, 1.0, generator));
  temb_proj_ = register_module("temb_proj", Dense(temb_channels, out_channels, generator));
  norm2_ = register_module("norm2", Norm(groups, out_channels));
  dropout_ = register_module("dropout", nn::Dropout(nn::DropoutOptions(dropout)));
  conv2_ = register_module("conv2",
                           Conv(out_channels, out_channels, 3, 1, 1, kZeroInitScale, generator));
  if (in_channels != out_channels) {
    nin_shortcut_ =
        register_module("nin_shortcut", Conv(in_channels, out_channels, 1, 1, 0, 1.0, generator));
  }
  if (with_attention) attn_ = register_module("attn", AttnBlock(out_channels, groups, generator));
}

torch::Tensor ResBlockImpl::forward(const torch::Tensor& x, const torch::Tensor& temb) {
  torch::Tensor h = conv1_(torch::silu(Normalize(norm1_, x)));
  h = h + temb_proj_(torch::silu(temb)).unsqueeze(-1).unsqueeze(-1);
  h = conv2_(dropout_(torch::silu(Normalize(norm2_, h))));
  h = (nin_shortcut_ ? nin_shortcut_(x) : x) + h;
  return attn_ ? attn_(h) : h;
}

UNetImpl::UNetImpl(const ModelConfig& config, uint64_t seed) : config_(config) {
  torch::Generator generator = at::detail::createCPUGenerator(seed);
  const int ch = config.ch;
  const int temb_ch = 4 * ch;
  const int groups = config.norm_groups;
  const int levels = static_cast<int>(config.ch_mult.size());
  auto attends = [&](int res) {
    for (int r : config.attn_resolutions) {
      if (r == res) return true;
    }
    return false;
  };

  temb_dense0_ = register_module("temb_dense0", Dense(ch, temb_ch, generator));
  temb_dense1_ = register_module("temb_dense1", Dense(temb_ch, temb_ch, generator));
  conv_in_ = register_module("conv_in", Conv(config.in_channels, ch, 3, 1, 1, 1.0, generator));

  std::vector<int> skip_channels = {ch};
  int cur = ch;
  int res = config.image_size;
  down_.resize(levels);
  for (int level = 0; level < levels; ++level) {
    const int out = ch * config.ch_mult[level];
    for (int block = 0; block < config.num_res_blocks; ++block) {
      down_[level].push_back(register_module(
          "down_" + std::to_string(level) + "_" + std::to_string(block),
          ResBlock(cur, out, temb_ch, config.dropout, groups, attends(res), generator)));
      cur = out;
      skip_channels.push_back(cur);
    }
    if (level != levels - 1) {
      // A stride-2 3x3 conv; the forward pads like TensorFlow's SAME (bottom and right only).
      downsample_.push_back(register_module("down_" + std::to_string(level) + "_ds",
                                            Conv(cur, cur, 3, 2, 0, 1.0, generator)));
      skip_channels.push_back(cur);
      res /= 2;
    }
  }

  // The middle: res block, attention (inside mid_block1), res block.
  mid_block1_ = register_module(
      "mid_block1", ResBlock(cur, cur, temb_ch, config.dropout, groups, true, generator));
  mid_block2_ = register_module(
      "mid_block2", ResBlock(cur, cur, temb_ch, config.dropout, groups, false, generator));

  up_.resize(levels);
  for (int level = levels - 1; level >= 0; --level) {
    const int out = ch * config.ch_mult[level];
    for (int block = 0; block < config.num_res_blocks + 1; ++block) {
      const int skip = skip_channels.back();
      skip_channels.pop_back();
      up_[level].push_back(register_module(
          "up_" + std::to_string(level) + "_" + std::to_string(block),
          ResBlock(cur + skip, out, temb_ch, config.dropout, groups, attends(res), generator)));
      cur = out;
    }
    if (level != 0) {
      upsample_.push_back(register_module("up_" + std::to_string(level) + "_us",
                                          Conv(cur, cur, 3, 1, 1, 1.0, generator)));
      res *= 2;
    }
  }

  norm_out_ = register_module("norm_out", Norm(groups, cur));
  conv_out_ =
      register_module("conv_out", Conv(cur, config.in_channels * (config.learn_sigma ? 2 : 1), 3, 1,
                                       1, kZeroInitScale, generator));
  if (config.num_classes > 0) {
    // Registered last, so that an unconditional model's parameters keep their order. N(0, 1)
    // rows, as torch.nn.Embedding and guided-diffusion's label_emb start.
    class_embed_ =
        register_module("class_embed", torch::nn::Embedding(config.num_classes + 1, temb_ch));
    torch::NoGradGuard no_grad;
    class_embed_->weight.copy_(at::normal(0.0, 1.0, class_embed_->weight.sizes(), generator));
  }
}

torch::Tensor UNetImpl::forward(const torch::Tensor& x, const torch::Tensor& t,
                                const torch::Tensor& y) {
  // The embedding is computed in float32 and takes the images' type (float64 in golden tests).
  torch::Tensor temb = TimestepEmbedding(t, config_.ch).to(x.scalar_type());
  temb = temb_dense1_(torch::silu(temb_dense0_(temb)));
  if (class_embed_) {
    // Dhariwal & Nichol's label embedding, added to the timestep's; no labels: "no class".
    const torch::Tensor labels =
        y.defined() ? y
                    : torch::full({x.size(0)}, config_.num_classes,
                                  torch::TensorOptions().dtype(torch::kLong).device(x.device()));
    temb = temb + class_embed_(labels).to(temb.scalar_type());
  } else {
    TORCH_CHECK(!y.defined(), "labels given to an unconditional UNet (model.num_classes: 0)");
  }

  const int levels = static_cast<int>(config_.ch_mult.size());
  std::vector<torch::Tensor> hs = {conv_in_(x)};
  for (int level = 0; level < levels; ++level) {
    for (auto& block : down_[level]) hs.push_back(block(hs.back(), temb));
    if (level != levels - 1) {
      hs.push_back(downsample_[level](F::pad(hs.back(), F::PadFuncOptions({0, 1, 0, 1}))));
    }
  }

  torch::Tensor h = mid_block1_(hs.back(), temb);
  h = mid_block2_(h, temb);

  int upsample_index = 0;
  for (int level = levels - 1; level >= 0; --level) {
    for (auto& block : up_[level]) {
      h = block(torch::cat({h, hs.back()}, 1), temb);
      hs.pop_back();
    }
    if (level != 0) {
      h = upsample_[upsample_index++](
          F::interpolate(h, F::InterpolateFuncOptions()
                                .scale_factor(std::vector<double>{2.0, 2.0})
                                .mode(torch::kNearest)));
    }
  }
  return conv_out_(torch::silu(Normalize(norm_out_, h)));
}

}  // namespace ddpm
