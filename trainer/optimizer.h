// The optimizer of Ho et al. over one flat parameter buffer: flat parameters and gradients,
// Adam with linear warmup, gradient-norm clipping and the EMA of the weights.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "config/config.h"

namespace ddpm {

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

  /// Moves module's parameters (already on their device) into the flat buffer. With
  /// channels_last, each 4-D parameter's slice holds it in NHWC order (its view has
  /// channels-last strides), as convolutions in channels_last want their weights.
  FlatParameters(torch::nn::Module& module, bool with_grad, bool channels_last = false);
  /// The flat parameters.
  const torch::Tensor& data() const { return data_; }
  /// The flat gradients (undefined unless with_grad).
  const torch::Tensor& grad() const { return grad_; }
  const std::vector<Slot>& slots() const { return slots_; }
  /// The view of slot's parameter in a same-layout flat tensor, with the parameter's strides.
  torch::Tensor SlotView(const torch::Tensor& flat, const Slot& slot) const;
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
  bool channels_last_ = false;
};

class Ema;

/// Adam (Kingma & Ba), the arithmetic of torch.optim.Adam, over one flat buffer: a handful of
/// kernels per step whatever the number of parameters. The step's learning rate and bias
/// corrections live in a device tensor, so that Apply() can be captured in a CUDA graph.
class FlatAdam {
 public:
  FlatAdam(torch::Tensor params, torch::Tensor grads, double beta1, double beta2, double eps);
  /// Counts one more update and stages its learning rate and bias corrections on the device
  /// (asynchronously from pinned memory on a GPU).
  void Prepare(double lr);
  /// The update Prepare staged. Uses the gradient buffer as scratch: the gradients are spent
  /// afterwards (the next step zeroes them anyway).
  void Apply();
  /// On the CPU, the update Prepare staged fused with the gradient's scaling by grad_scale
  /// (the clip coefficient) and, when ema is given, its update: one pass over memory. The same
  /// float arithmetic as Apply() then Ema::Update(), within rounding; gradients untouched.
  void ApplyFusedCpu(double grad_scale, Ema* ema);
  /// Prepare(lr), then Apply().
  void Step(double lr);
  /// Updates taken so far.
  int64_t steps() const { return steps_; }
  torch::Tensor& exp_avg() { return exp_avg_; }
  torch::Tensor& exp_avg_sq() { return exp_avg_sq_; }
  void set_steps(int64_t steps) { steps_ = steps; }

 private:
  torch::Tensor params_, grads_, exp_avg_, exp_avg_sq_, scratch_;
  /// [2] fp32 on the device: -lr / bias_correction1, sqrt(bias_correction2); and on the host.
  torch::Tensor scalars_;
  double step_size_ = 0, sqrt_bias_correction2_ = 1;
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
  torch::Tensor& target() { return target_; }
  double decay() const { return decay_; }

 private:
  torch::Tensor source_;
  torch::Tensor target_;
  double decay_;
};

/// EDM2's power-function EMAs of flat weights (Karras et al. 2024, Eq. 4), one profile per
/// relative standard deviation: update number t moves profile k by
///   profile_k = beta_t profile_k + (1 - beta_t) source,  beta_t = (1 - 1/t)^(gamma_k + 1).
/// The per-update weights live in a device tensor, so that Update() can be captured in a CUDA
/// graph. Any floating dtype (tests run it in float64).
class PowerEma {
 public:
  /// Profiles of source's layout, dtype and device, one per sigma_rel, starting as source's
  /// copy; throws std::invalid_argument naming a sigma_rel outside (0, MaxPhemaSigmaRel()].
  PowerEma(torch::Tensor source, std::vector<double> sigma_rels);
  /// Stages the weights 1 - beta of update number update (1-based) on the device
  /// (asynchronously from pinned memory on a GPU).
  void Prepare(int64_t update);
  /// Moves every profile by the weights Prepare staged. Call after the optimizer step.
  void Update();
  const std::vector<double>& sigma_rels() const { return sigma_rels_; }
  /// The profiles, in sigma_rels' order (flat, like source).
  std::vector<torch::Tensor>& profiles() { return profiles_; }
  const std::vector<torch::Tensor>& profiles() const { return profiles_; }

 private:
  torch::Tensor source_;
  std::vector<double> sigma_rels_;
  std::vector<double> gammas_;
  std::vector<torch::Tensor> profiles_;
  /// [K] on the device, source's dtype: 1 - beta of the staged update for each profile.
  torch::Tensor weights_;
};

/// The factor that clipping to max_norm multiplies a gradient of global norm `norm` by, as
/// torch.nn.utils.clip_grad_norm_ computes it: min(1, max_norm / (norm + 1e-6)); 1 when
/// max_norm <= 0 (no clipping).
double ClipCoefficient(double norm, double max_norm);

/// Clips the flat gradient to global norm max_norm (when max_norm > 0) as
/// torch.nn.utils.clip_grad_norm_ does, on the device without waiting for it; returns the
/// norm before clipping as a 0-dim tensor.
torch::Tensor ClipGradNorm(torch::Tensor& grad, double max_norm);

}  // namespace ddpm
