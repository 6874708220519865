#include "trainer/optimizer.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "trainer/fused_adam.h"
#include "trainer/power_ema.h"
#include "trainer/tensor_io.h"

namespace ddpm {

double WarmupLearningRate(const TrainConfig& config, int64_t update) {
  if (config.warmup_steps <= 0) return config.lr;
  return config.lr * std::min(1.0, static_cast<double>(update) / config.warmup_steps);
}

FlatParameters::FlatParameters(torch::nn::Module& module, bool with_grad, bool channels_last)
    : channels_last_(channels_last) {
  torch::NoGradGuard no_grad;
  const auto named = module.named_parameters();
  TORCH_CHECK(named.size() > 0, "FlatParameters: the module has no parameters");
  int64_t total = 0;
  for (const auto& item : named) {
    const torch::Tensor& p = item.value();
    slots_.push_back(Slot{item.key(), total, p.numel(), p.sizes().vec()});
    total += p.numel();
  }
  const auto options = named[0].value().options();
  data_ = torch::empty({total}, options);
  if (with_grad) grad_ = torch::zeros({total}, options);
  for (std::size_t i = 0; i < slots_.size(); ++i) {
    torch::Tensor p = named[i].value();
    torch::Tensor view = SlotView(data_, slots_[i]);
    view.copy_(p);
    p.set_data(view);
    if (with_grad) p.mutable_grad() = SlotView(grad_, slots_[i]);
  }
}

torch::Tensor FlatParameters::SlotView(const torch::Tensor& flat, const Slot& slot) const {
  const torch::Tensor slice = flat.narrow(0, slot.offset, slot.numel);
  if (!channels_last_ || slot.shape.size() != 4) return slice.view(slot.shape);
  // NHWC order in memory, NCHW sizes: the strides of torch::MemoryFormat::ChannelsLast.
  const auto& s = slot.shape;
  return slice.view({s[0], s[2], s[3], s[1]}).permute({0, 3, 1, 2});
}

std::map<std::string, torch::Tensor> FlatParameters::Views(const torch::Tensor& flat) const {
  std::map<std::string, torch::Tensor> out;
  const torch::Tensor detached = flat.detach();
  for (const Slot& slot : slots_) out[slot.name] = SlotView(detached, slot);
  return out;
}

void FlatParameters::Flatten(const std::map<std::string, torch::Tensor>& named,
                             const std::string& prefix, torch::Tensor& flat,
                             const std::string& origin) const {
  torch::NoGradGuard no_grad;
  for (const Slot& slot : slots_) {
    const auto it = named.find(prefix + slot.name);
    if (it == named.end()) {
      throw WeightsError(origin + ": missing tensor '" + prefix + slot.name + "'");
    }
    if (it->second.sizes().vec() != slot.shape) {
      throw WeightsError(origin + ": tensor '" + prefix + slot.name + "' has shape " +
                         c10::str(it->second.sizes()) + ", the model expects " +
                         c10::str(slot.shape));
    }
    SlotView(flat, slot).copy_(it->second);
  }
}

FlatAdam::FlatAdam(torch::Tensor params, torch::Tensor grads, double beta1, double beta2,
                   double eps)
    : params_(std::move(params)),
      grads_(std::move(grads)),
      exp_avg_(torch::zeros_like(params_)),
      exp_avg_sq_(torch::zeros_like(params_)),
      scalars_(torch::zeros({2}, params_.options().dtype(torch::kFloat32))),
      beta1_(beta1),
      beta2_(beta2),
      eps_(eps) {}

void FlatAdam::Prepare(double lr) {
  ++steps_;
  const double bias_correction1 = 1.0 - std::pow(beta1_, static_cast<double>(steps_));
  const double bias_correction2 = 1.0 - std::pow(beta2_, static_cast<double>(steps_));
  const bool pinned = scalars_.is_cuda();
  torch::Tensor host =
      torch::empty({2}, torch::TensorOptions(torch::kFloat32).pinned_memory(pinned));
  step_size_ = -lr / bias_correction1;
  sqrt_bias_correction2_ = std::sqrt(bias_correction2);
  host[0] = step_size_;
  host[1] = sqrt_bias_correction2_;
  // From a fresh pinned block each step: the caching host allocator keeps it until the copy
  // has run, so the host never waits here.
  scalars_.copy_(host, /*non_blocking=*/pinned);
}

void FlatAdam::Apply() {
  torch::NoGradGuard no_grad;
  exp_avg_.mul_(beta1_).add_(grads_, 1.0 - beta1_);
  exp_avg_sq_.mul_(beta2_).addcmul_(grads_, grads_, 1.0 - beta2_);
  // denom = sqrt(v) / sqrt(bias_correction2) + eps, written over the spent gradients.
  torch::Tensor& denom = grads_;
  torch::sqrt_out(denom, exp_avg_sq_).div_(scalars_[1]).add_(eps_);
  // param += (-lr / bias_correction1) * m / denom, evaluated in addcdiv_'s order (value times
  // m, then the division), so that the result is torch.optim.Adam's to the bit; the value is a
  // device tensor where addcdiv_ would want a host scalar.
  if (!scratch_.defined()) scratch_ = torch::empty_like(params_);
  torch::mul_out(scratch_, exp_avg_, scalars_[0]);
  params_.add_(scratch_.div_(denom));
}

void FlatAdam::ApplyFusedCpu(double grad_scale, Ema* ema) {
  TORCH_CHECK(params_.is_cpu() && params_.scalar_type() == torch::kFloat32 &&
                  params_.is_contiguous() && grads_.is_contiguous(),
              "FlatAdam::ApplyFusedCpu: needs contiguous float32 CPU buffers");
  float* param = params_.data_ptr<float>();
  const float* grad = grads_.data_ptr<float>();
  float* m = exp_avg_.data_ptr<float>();
  float* v = exp_avg_sq_.data_ptr<float>();
  float* average = nullptr;
  if (ema != nullptr) {
    TORCH_CHECK(ema->target().is_contiguous() && ema->target().numel() == params_.numel(),
                "FlatAdam::ApplyFusedCpu: the EMA's buffer does not match the parameters");
    average = ema->target().data_ptr<float>();
  }
  // One pass over memory instead of about twelve; the arithmetic of the tensor path above.
  FusedAdamConstants c;
  c.grad_scale = static_cast<float>(grad_scale);
  c.beta1 = static_cast<float>(beta1_);
  c.beta2 = static_cast<float>(beta2_);
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1_);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2_);
  c.step_size = static_cast<float>(step_size_);
  c.sqrt_bias_correction2 = static_cast<float>(sqrt_bias_correction2_);
  c.eps = static_cast<float>(eps_);
  c.decay = ema != nullptr ? static_cast<float>(ema->decay()) : 0.0f;
  c.one_minus_decay = ema != nullptr ? static_cast<float>(1.0 - ema->decay()) : 0.0f;
  at::parallel_for(0, params_.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    FusedAdamUpdate(begin, end, param, grad, m, v, average, c);
  });
}

void FlatAdam::Step(double lr) {
  Prepare(lr);
  Apply();
}

Ema::Ema(torch::Tensor source, torch::Tensor target, double decay)
    : source_(std::move(source)), target_(std::move(target)), decay_(decay) {
  TORCH_CHECK(source_.sizes() == target_.sizes(), "EMA: source and target differ in size");
  torch::NoGradGuard no_grad;
  target_.copy_(source_);
}

void Ema::Update() {
  torch::NoGradGuard no_grad;
  target_.mul_(decay_).add_(source_, 1.0 - decay_);
}

PowerEma::PowerEma(torch::Tensor source, std::vector<double> sigma_rels)
    : source_(std::move(source)), sigma_rels_(std::move(sigma_rels)) {
  torch::NoGradGuard no_grad;
  for (double sigma_rel : sigma_rels_) {
    gammas_.push_back(PowerEmaExponent(sigma_rel));
    profiles_.push_back(source_.detach().clone());
  }
  weights_ = torch::zeros({static_cast<int64_t>(sigma_rels_.size())}, source_.options());
}

void PowerEma::Prepare(int64_t update) {
  TORCH_CHECK(update >= 1, "PowerEma: updates count from 1, got ", update);
  const bool pinned = weights_.is_cuda();
  torch::Tensor host = torch::empty(
      {weights_.size(0)}, torch::TensorOptions(weights_.scalar_type()).pinned_memory(pinned));
  // Written through the pointer: no tensor op per profile in the step.
  AT_DISPATCH_FLOATING_TYPES(host.scalar_type(), "PowerEma::Prepare", [&] {
    scalar_t* weight = host.data_ptr<scalar_t>();
    for (std::size_t k = 0; k < gammas_.size(); ++k) {
      weight[k] = static_cast<scalar_t>(1.0 - PowerEmaBeta(gammas_[k], update));
    }
  });
  // A fresh pinned block each update, as FlatAdam::Prepare: the host never waits here.
  weights_.copy_(host, /*non_blocking=*/pinned);
}

void PowerEma::Update() {
  torch::NoGradGuard no_grad;
  for (std::size_t k = 0; k < profiles_.size(); ++k) {
    profiles_[k].lerp_(source_, weights_[static_cast<int64_t>(k)]);
  }
}

double ClipCoefficient(double norm, double max_norm) {
  return max_norm > 0 ? std::min(1.0, max_norm / (norm + 1e-6)) : 1.0;
}

torch::Tensor ClipGradNorm(torch::Tensor& grad, double max_norm) {
  torch::NoGradGuard no_grad;
  torch::Tensor norm = grad.norm();
  if (max_norm > 0) {
    // Multiplying by a coefficient clamped to 1 leaves unclipped gradients exact, and needs no
    // host-side comparison (torch.nn.utils.clip_grad_norm_ does the same).
    grad.mul_((max_norm / (norm + 1e-6)).clamp_max(1.0));
  }
  return norm;
}

}  // namespace ddpm
