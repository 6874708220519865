// One optimizer step of DDPM training: loss, backward, clip, Adam with warmup, EMA.
#pragma once

#include <torch/torch.h>

#include <array>
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
  /// For each quarter of [0, T) (q0..q3): the sum of this rank's per-sample losses whose
  /// timestep fell in it, and how many samples did.
  std::array<double, kTimestepQuartiles> quartile_loss_sum{};
  std::array<double, kTimestepQuartiles> quartile_count{};
};

/// Linear warmup of Ho et al.: update number k (1-based) uses lr * min(k / warmup_steps, 1).
double WarmupLearningRate(const TrainConfig& config, int64_t update);

/// A module's parameters re-homed into one contiguous buffer, each parameter a view of its
/// slice; optionally gradients likewise, which autograd then accumulates into in place. The
/// optimizer, EMA, clipping and zeroing each touch one tensor instead of one per parameter.
class FlatParameters {
 public:
  /// Where one parameter lives in the flat buffer.
  struct Slot {
    std::string name;
    int64_t offset;
    int64_t numel;
    std::vector<int64_t> shape;
  };

  /// Moves module's parameters (already on their device) into the flat buffer.
  FlatParameters(torch::nn::Module& module, bool with_grad);
  /// The flat parameters.
  const torch::Tensor& data() const { return data_; }
  /// The flat gradients (undefined unless with_grad).
  const torch::Tensor& grad() const { return grad_; }
  const std::vector<Slot>& slots() const { return slots_; }
  /// A same-layout flat tensor split into named views, one per parameter: no copies, on
  /// flat's device.
  std::map<std::string, torch::Tensor> Views(const torch::Tensor& flat) const;
  /// Copies named tensors into a same-layout flat tensor; names and shapes must match.
  void Flatten(const std::map<std::string, torch::Tensor>& named, const std::string& prefix,
               torch::Tensor& flat, const std::string& origin) const;

 private:
  torch::Tensor data_;
  torch::Tensor grad_;
  std::vector<Slot> slots_;
};

/// Adam (Kingma & Ba), the arithmetic of torch.optim.Adam, over one flat buffer.
class FlatAdam {
 public:
  FlatAdam(torch::Tensor params, torch::Tensor grads, double beta1, double beta2, double eps);
  /// One update with learning rate lr. Uses the gradient buffer as scratch: the gradients are
  /// spent afterwards (the next step zeroes them anyway), which saves a parameter-sized buffer.
  void Step(double lr);
  /// Updates taken so far.
  int64_t steps() const { return steps_; }
  torch::Tensor& exp_avg() { return exp_avg_; }
  torch::Tensor& exp_avg_sq() { return exp_avg_sq_; }
  void set_steps(int64_t steps) { steps_ = steps; }

 private:
  torch::Tensor params_, grads_, exp_avg_, exp_avg_sq_;
  double beta1_, beta2_, eps_;
  int64_t steps_ = 0;
};

/// Exponential moving average of flat weights: ema = decay ema + (1 - decay) param.
class Ema {
 public:
  /// Averages source into target, starting from source's current values.
  Ema(torch::Tensor source, torch::Tensor target, double decay);
  /// Moves the average one step towards the source. Call after the optimizer step.
  void Update();

 private:
  torch::Tensor source_;
  torch::Tensor target_;
  double decay_;
};

/// Clips the flat gradient to global norm max_norm (when max_norm > 0) as
/// torch.nn.utils.clip_grad_norm_ does; returns the norm before clipping.
double ClipGradNorm(torch::Tensor& grad, double max_norm);

/// What the last step's gradient exchange cost.
struct CommStats {
  /// Seconds spent in all-reduces, summed over the buckets.
  double allreduce_seconds = 0;
  /// Share of allreduce_seconds that ran while backward was still computing.
  double overlap_fraction = 0;
  /// Seconds the step waited for all-reduces after its backward had ended: what it cost.
  double exposed_seconds = 0;
};

/// Averages gradients across data-parallel ranks during backward; Trainer::Step drives it.
class GradientSync {
 public:
  virtual ~GradientSync() = default;
  /// Called before each micro-batch's backward. sync is true on the step's last micro-batch,
  /// whose backward completes the gradients that must be averaged.
  virtual void BeginBackward(bool sync) = 0;
  /// Called after the last backward; returns once the flat gradient holds the average over
  /// ranks.
  virtual void FinishBackward() = 0;
  /// The previous step's exchange.
  virtual CommStats last_stats() const = 0;
};

/// The model, its EMA copy, the diffusion, Adam and the step counter of one training process.
class Trainer {
 public:
  /// Builds the model on device, seeded from config.train.seed; rank seeds dropout's stream.
  Trainer(const Config& config, torch::Device device, int rank = 0);

  /// One optimizer step on a batch of images in [-1, 1], split into grad_accum micro-batches.
  /// The batch holds positions [first_position, first_position + B) of the step's global batch;
  /// each sample's timestep and noise are drawn from (seed, step, position), so they do not
  /// depend on how the global batch is split across ranks and micro-batches.
  StepStats Step(const torch::Tensor& batch, int64_t first_position = 0);
  /// Makes Step average gradients through sync (null: a world of one). Not owned.
  void set_gradient_sync(GradientSync* sync) { sync_ = sync; }
  /// The timesteps [count] and noise [count, ...shape] that Step draws for the samples at
  /// positions [first_position, first_position + count) of global step `step` (0-based).
  std::pair<torch::Tensor, torch::Tensor> DrawTimestepsAndNoise(int64_t step,
                                                                int64_t first_position,
                                                                int64_t count,
                                                                torch::IntArrayRef shape) const;

  UNet& model() { return model_; }
  UNet& ema_model() { return ema_model_; }
  const GaussianDiffusion& diffusion() const { return diffusion_; }
  /// Optimizer steps taken so far.
  int64_t step() const { return step_; }
  torch::Device device() const { return device_; }
  const FlatParameters& parameters() const { return *params_; }

  /// Everything a bitwise-exact resume needs: weights, EMA, Adam moments, step and this rank's
  /// dropout RNG state ("rng/default"), as CPU copies.
  std::map<std::string, torch::Tensor> State() const;
  /// The same names as State(), but weights, EMA and moments are views of the live buffers on
  /// the device: valid until the next Step. What a checkpoint copies its slice from.
  std::map<std::string, torch::Tensor> StateViews() const;
  /// Restores State(); throws naming origin if a tensor is missing or has the wrong shape.
  void LoadState(const std::map<std::string, torch::Tensor>& state, const std::string& origin);

 private:
  Config config_;
  torch::Device device_;
  UNet model_;
  UNet ema_model_;
  GaussianDiffusion diffusion_;
  std::unique_ptr<FlatParameters> params_;
  std::unique_ptr<FlatParameters> ema_params_;
  std::unique_ptr<FlatAdam> optimizer_;
  std::unique_ptr<Ema> ema_;
  GradientSync* sync_ = nullptr;
  int64_t step_ = 0;
};

/// The state of a CPU or CUDA generator on device seeded from (seed, rank, step): the dropout
/// stream of a rank that a checkpoint's world did not have.
torch::Tensor DerivedGeneratorState(torch::Device device, uint64_t seed, int rank, int64_t step);
/// What rank loads from a checkpoint that ReadCheckpoint read: the replicated state, and as
/// "rng/default" the rank's own dropout stream ("rng/default/<rank>"), or, for a rank the
/// writing world did not have, one derived from (seed, rank, step).
std::map<std::string, torch::Tensor> StateForRank(
    const std::map<std::string, torch::Tensor>& checkpoint, int rank, torch::Device device,
    uint64_t seed, const std::string& origin);
/// The model's weights ("model") or the EMA's ("ema") from a State(), under the UNet's names.
std::map<std::string, torch::Tensor> WeightsFromState(
    const std::map<std::string, torch::Tensor>& state, const std::string& which);

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
