// The UNet of Ho et al. 2020 (Appendix B), built like the authors' diffusion_tf/models/unet.py.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "config/config.h"

namespace ddpm {

/// Single-head self-attention over all pixels, with a residual connection.
class AttnBlockImpl : public torch::nn::Module {
 public:
  AttnBlockImpl(int channels, int groups, torch::Generator& generator);
  torch::Tensor forward(const torch::Tensor& x);

 private:
  torch::nn::GroupNorm norm_{nullptr};
  torch::nn::Conv2d qkv_{nullptr};
  torch::nn::Conv2d proj_out_{nullptr};
};
TORCH_MODULE(AttnBlock);

/// Two 3x3 convs with GroupNorm, SiLU, the timestep embedding and dropout; optionally followed
/// by self-attention.
class ResBlockImpl : public torch::nn::Module {
 public:
  ResBlockImpl(int in_channels, int out_channels, int temb_channels, double dropout, int groups,
               bool with_attention, torch::Generator& generator);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& temb);

 private:
  torch::nn::GroupNorm norm1_{nullptr};
  torch::nn::Conv2d conv1_{nullptr};
  torch::nn::Linear temb_proj_{nullptr};
  torch::nn::GroupNorm norm2_{nullptr};
  torch::nn::Dropout dropout_{nullptr};
  torch::nn::Conv2d conv2_{nullptr};
  torch::nn::Conv2d nin_shortcut_{nullptr};
  AttnBlock attn_{nullptr};
};
TORCH_MODULE(ResBlock);

/// The noise-prediction UNet. Parameter names match tests/reference/ddpm_ref.py.
class UNetImpl : public torch::nn::Module {
 public:
  /// Builds the network and initializes it like the authors' code from seed.
  UNetImpl(const ModelConfig& config, uint64_t seed = 0);
  /// eps_theta(x_t, t) [B,C,H,W] (with learn_sigma [B,2C,H,W], the second half v of the
  /// variance): x [B,C,H,W] in data space, t [B] int64 timesteps. y: [B] int64 labels of a
  /// class-conditional model, each in [0, num_classes] (num_classes: "no class"); undefined:
  /// no class for every sample. An unconditional model takes no labels.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t,
                        const torch::Tensor& y = {});

  const ModelConfig& config() const { return config_; }

 private:
  ModelConfig config_;
  torch::nn::Linear temb_dense0_{nullptr};
  torch::nn::Linear temb_dense1_{nullptr};
  torch::nn::Conv2d conv_in_{nullptr};
  std::vector<std::vector<ResBlock>> down_;
  std::vector<torch::nn::Conv2d> downsample_;
  ResBlock mid_block1_{nullptr};
  ResBlock mid_block2_{nullptr};
  std::vector<std::vector<ResBlock>> up_;
  std::vector<torch::nn::Conv2d> upsample_;
  torch::nn::GroupNorm norm_out_{nullptr};
  torch::nn::Conv2d conv_out_{nullptr};
  /// num_classes + 1 rows (the last: "no class"); null for an unconditional model.
  torch::nn::Embedding class_embed_{nullptr};
};
TORCH_MODULE(UNet);

/// Sinusoidal embedding of timesteps t [B] into [B, dim], as in the authors' code.
torch::Tensor TimestepEmbedding(const torch::Tensor& t, int dim);
/// Number of scalar parameters of a module.
int64_t CountParameters(const torch::nn::Module& module);

/// Throws std::runtime_error naming origin and both settings when weights were trained with
/// learned variances and model does not have them, or the reverse (conv_out's channels).
void CheckLearnSigma(const ModelConfig& model, const std::map<std::string, torch::Tensor>& weights,
                     const std::string& origin);
/// Throws std::runtime_error naming origin and both settings when weights were trained with
/// another model.num_classes than model's (class_embed's rows, or none).
void CheckNumClasses(const ModelConfig& model, const std::map<std::string, torch::Tensor>& weights,
                     const std::string& origin);

}  // namespace ddpm
