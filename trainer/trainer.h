// One optimizer step of DDPM training: loss, backward, clip, Adam with warmup, EMA.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "trainer/config.h"
#include "trainer/diffusion.h"
#include "trainer/unet.h"

namespace ddpm {

/// What one optimizer step measured.
struct StepStats {
  /// Mean training loss over the step's micro-batches.
  double loss = 0;
  /// Global gradient norm before clipping.
  double grad_norm = 0;
  /// Learning rate the step used.
  double lr = 0;
};

/// Linear warmup of Ho et al.: update number k (1-based) uses lr * min(k / warmup_steps, 1).
double WarmupLearningRate(const TrainConfig& config, int64_t update);

/// Exponential moving average of a model's parameters: ema = decay ema + (1 - decay) param.
class Ema {
 public:
  /// Averages into target, starting from source's current values.
  Ema(torch::nn::Module& source, torch::nn::Module& target, double decay);
  /// Moves every averaged parameter one step towards the source. Call after the optimizer step.
  void Update();

 private:
  std::vector<torch::Tensor> source_;
  std::vector<torch::Tensor> target_;
  double decay_;
};

/// The model, its EMA copy, the diffusion, Adam and the step counter of one training process.
class Trainer {
 public:
  /// Builds the model on device, seeded from config.train.seed; rank picks the noise stream.
  Trainer(const Config& config, torch::Device device, int rank = 0);

  /// One optimizer step on a batch of images in [-1, 1], split into grad_accum micro-batches.
  StepStats Step(const torch::Tensor& batch);

  UNet& model() { return model_; }
  UNet& ema_model() { return ema_model_; }
  const GaussianDiffusion& diffusion() const { return diffusion_; }
  torch::optim::Adam& optimizer() { return *optimizer_; }
  /// Optimizer steps taken so far.
  int64_t step() const { return step_; }
  torch::Device device() const { return device_; }

 private:
  Config config_;
  torch::Device device_;
  UNet model_;
  UNet ema_model_;
  GaussianDiffusion diffusion_;
  std::unique_ptr<torch::optim::Adam> optimizer_;
  std::unique_ptr<Ema> ema_;
  std::vector<torch::Tensor> parameters_;
  torch::Generator generator_;
  int64_t step_ = 0;
};

/// A Denoiser that runs module in eval mode (no dropout).
Denoiser EvalDenoiser(UNet& model);

/// The named parameters and buffers of module, detached on the CPU.
std::map<std::string, torch::Tensor> StateDict(const torch::nn::Module& module);
/// Writes named tensors as a pickled dict that Python reads with torch.load.
void SaveTensors(const std::map<std::string, torch::Tensor>& tensors, const std::string& path);
/// Reads a dict of tensors written by SaveTensors or by Python's torch.save.
std::map<std::string, torch::Tensor> LoadTensors(const std::string& path);
/// Copies tensors into module's parameters and buffers; names and shapes must match exactly.
void LoadStateDict(torch::nn::Module& module, const std::map<std::string, torch::Tensor>& tensors,
                   const std::string& origin);

}  // namespace ddpm
