#include "trainer/trainer.h"

#include <ATen/autocast_mode.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <stdexcept>

#include "trainer/checkpoint.h"
#include "trainer/data.h"

namespace ddpm {

namespace {

// bf16 autocast on the device for the scope's lifetime (nothing when disabled). LibTorch 2.4
// replaced the per-device functions with ones that take the device type.
class AutocastScope {
 public:
  AutocastScope(c10::DeviceType device, bool enabled) : device_(device), enabled_(enabled) {
    if (!enabled_) return;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
    was_enabled_ = at::autocast::is_autocast_enabled(device_);
    was_dtype_ = at::autocast::get_autocast_dtype(device_);
    at::autocast::set_autocast_dtype(device_, at::kBFloat16);
    at::autocast::set_autocast_enabled(device_, true);
#else
    if (device_ == c10::DeviceType::CUDA) {
      was_enabled_ = at::autocast::is_enabled();
      was_dtype_ = at::autocast::get_autocast_gpu_dtype();
      at::autocast::set_autocast_gpu_dtype(at::kBFloat16);
      at::autocast::set_enabled(true);
    } else {
      was_enabled_ = at::autocast::is_cpu_enabled();
      was_dtype_ = at::autocast::get_autocast_cpu_dtype();
      at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
      at::autocast::set_cpu_enabled(true);
    }
#endif
    at::autocast::increment_nesting();
  }
  ~AutocastScope() {
    if (!enabled_) return;
    // The casts of the weights are cached within the outermost scope only.
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
    at::autocast::set_autocast_enabled(device_, was_enabled_);
    at::autocast::set_autocast_dtype(device_, was_dtype_);
#else
    if (device_ == c10::DeviceType::CUDA) {
      at::autocast::set_enabled(was_enabled_);
      at::autocast::set_autocast_gpu_dtype(was_dtype_);
    } else {
      at::autocast::set_cpu_enabled(was_enabled_);
      at::autocast::set_autocast_cpu_dtype(was_dtype_);
    }
#endif
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  c10::DeviceType device_;
  bool enabled_;
  bool was_enabled_ = false;
  at::ScalarType was_dtype_ = at::kBFloat16;
};

// The seed of a stream of its own for (seed, a, b): SplitMix64's mix of a weighted sum; salt
// keeps the different uses apart.
uint64_t StreamSeed(uint64_t seed, uint64_t a, uint64_t b, uint64_t salt) {
  return SplitMix64::Mix(seed * 0x9e3779b97f4a7c15ULL + a * 0xbf58476d1ce4e5b9ULL +
                         b * 0x94d049bb133111ebULL + salt);
}

}  // namespace

double WarmupLearningRate(const TrainConfig& config, int64_t update) {
  if (config.warmup_steps <= 0) return config.lr;
  return config.lr * std::min(1.0, static_cast<double>(update) / config.warmup_steps);
}

FlatParameters::FlatParameters(torch::nn::Module& module, bool with_grad) {
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
    torch::Tensor view = data_.narrow(0, slots_[i].offset, slots_[i].numel).view(p.sizes());
    view.copy_(p);
    p.set_data(view);
    if (with_grad) {
      p.mutable_grad() = grad_.narrow(0, slots_[i].offset, slots_[i].numel).view(p.sizes());
    }
  }
}

std::map<std::string, torch::Tensor> FlatParameters::Views(const torch::Tensor& flat) const {
  std::map<std::string, torch::Tensor> out;
  const torch::Tensor detached = flat.detach();
  for (const Slot& slot : slots_) {
    out[slot.name] = detached.narrow(0, slot.offset, slot.numel).view(slot.shape);
  }
  return out;
}

void FlatParameters::Flatten(const std::map<std::string, torch::Tensor>& named,
                             const std::string& prefix, torch::Tensor& flat,
                             const std::string& origin) const {
  torch::NoGradGuard no_grad;
  for (const Slot& slot : slots_) {
    const auto it = named.find(prefix + slot.name);
    if (it == named.end()) {
      throw std::runtime_error(origin + ": missing tensor '" + prefix + slot.name + "'");
    }
    if (it->second.sizes().vec() != slot.shape) {
      throw std::runtime_error(origin + ": tensor '" + prefix + slot.name + "' has shape " +
                               c10::str(it->second.sizes()) + ", the model expects " +
                               c10::str(slot.shape));
    }
    flat.narrow(0, slot.offset, slot.numel).copy_(it->second.reshape({-1}));
  }
}

FlatAdam::FlatAdam(torch::Tensor params, torch::Tensor grads, double beta1, double beta2,
                   double eps)
    : params_(std::move(params)),
      grads_(std::move(grads)),
      exp_avg_(torch::zeros_like(params_)),
      exp_avg_sq_(torch::zeros_like(params_)),
      beta1_(beta1),
      beta2_(beta2),
      eps_(eps) {}

void FlatAdam::Step(double lr) {
  torch::NoGradGuard no_grad;
  ++steps_;
  const double bias_correction1 = 1.0 - std::pow(beta1_, static_cast<double>(steps_));
  const double bias_correction2 = 1.0 - std::pow(beta2_, static_cast<double>(steps_));
  exp_avg_.mul_(beta1_).add_(grads_, 1.0 - beta1_);
  exp_avg_sq_.mul_(beta2_).addcmul_(grads_, grads_, 1.0 - beta2_);
  // denom = sqrt(v) / sqrt(bias_correction2) + eps, written over the spent gradients.
  torch::Tensor& denom = grads_;
  torch::sqrt_out(denom, exp_avg_sq_).div_(std::sqrt(bias_correction2)).add_(eps_);
  params_.addcdiv_(exp_avg_, denom, -lr / bias_correction1);
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

double ClipGradNorm(torch::Tensor& grad, double max_norm) {
  torch::NoGradGuard no_grad;
  const double norm = grad.norm().item<double>();
  if (max_norm > 0) {
    const double coef = max_norm / (norm + 1e-6);
    if (coef < 1.0) grad.mul_(coef);
  }
  return norm;
}

Trainer::Trainer(const Config& config, torch::Device device, int rank)
    : config_(config),
      device_(device),
      model_(config.model, config.train.seed),
      ema_model_(config.model, config.train.seed),
      diffusion_(config.diffusion, device) {
  // fp32 on a GPU: TF32 tensor cores for matmuls and convolutions (as PyTorch's default for
  // convolutions); bf16 autocast covers the forward otherwise.
  if (device.is_cuda() && config.train.precision == Precision::kFp32) {
    at::globalContext().setAllowTF32CuBLAS(true);
    at::globalContext().setAllowTF32CuDNN(true);
  }
  // Dropout draws from the device's default generator: seed it too, so that a run depends on
  // its config alone (LoadState restores it on resume).
  {
    torch::Generator dropout_generator = at::globalContext().defaultGenerator(device);
    std::lock_guard<std::mutex> lock(dropout_generator.mutex());
    dropout_generator.set_current_seed(config.train.seed * 1000003ULL + 29ULL + rank);
  }
  model_->to(device);
  ema_model_->to(device);
  ema_model_->eval();
  for (auto& p : ema_model_->parameters()) p.set_requires_grad(false);
  params_ = std::make_unique<FlatParameters>(*model_, /*with_grad=*/true);
  ema_params_ = std::make_unique<FlatParameters>(*ema_model_, /*with_grad=*/false);
  optimizer_ = std::make_unique<FlatAdam>(params_->data(), params_->grad(), config.train.adam_beta1,
                                          config.train.adam_beta2, config.train.adam_eps);
  ema_ = std::make_unique<Ema>(params_->data(), ema_params_->data(), config.train.ema_decay);
}

std::pair<torch::Tensor, torch::Tensor> Trainer::DrawTimestepsAndNoise(
    int64_t step, int64_t first_position, int64_t count, torch::IntArrayRef shape) const {
  std::vector<int64_t> noise_shape = {count};
  noise_shape.insert(noise_shape.end(), shape.begin(), shape.end());
  torch::Tensor t = torch::empty({count}, torch::kLong);
  torch::Tensor noise = torch::empty(noise_shape, torch::kFloat32);
  for (int64_t i = 0; i < count; ++i) {
    // One independent CPU stream per sample, drawn in place: randint is random_, randn normal_.
    torch::Generator generator = at::detail::createCPUGenerator(
        StreamSeed(config_.train.seed, static_cast<uint64_t>(step),
                   static_cast<uint64_t>(first_position + i), 0x2545f491ULL));
    t.narrow(0, i, 1).random_(0, config_.diffusion.timesteps, generator);
    noise[i].normal_(0.0, 1.0, generator);
  }
  return {t.to(device_, /*non_blocking=*/true), noise.to(device_, /*non_blocking=*/true)};
}

StepStats Trainer::Step(const torch::Tensor& batch, int64_t first_position) {
  const int accum = config_.train.grad_accum;
  TORCH_CHECK(batch.size(0) % accum == 0, "batch of ", batch.size(0),
              " images does not split into train.grad_accum = ", accum, " micro-batches");
  model_->train();
  StepStats stats;
  stats.lr = WarmupLearningRate(config_.train, step_ + 1);
  params_->grad().zero_();
  const torch::Tensor images = batch.to(device_, /*non_blocking=*/true);
  // The forward under bf16 autocast when asked; its output, and so the loss, back in fp32.
  const bool bf16 = config_.train.precision == Precision::kBf16;
  const Denoiser denoiser = [this, bf16](const torch::Tensor& x, const torch::Tensor& t) {
    AutocastScope autocast(device_.type(), bf16);
    return model_->forward(x, t).to(torch::kFloat32);
  };
  const auto micro_batches = images.chunk(accum, 0);
  torch::Tensor loss_sum = torch::zeros({}, images.options());
  // Per quarter of [0, T): the sum of the samples' losses, and how many there were.
  const auto float64 = images.options().dtype(torch::kFloat64);
  torch::Tensor quartile_loss = torch::zeros({kTimestepQuartiles}, float64);
  torch::Tensor quartile_count = torch::zeros({kTimestepQuartiles}, float64);
  int64_t position = first_position;
  for (std::size_t m = 0; m < micro_batches.size(); ++m) {
    const torch::Tensor& micro = micro_batches[m];
    const auto [t, noise] =
        DrawTimestepsAndNoise(step_, position, micro.size(0), micro.sizes().slice(1));
    position += micro.size(0);
    const DiffusionLoss out = diffusion_.TrainingLoss(denoiser, micro, t, noise);
    if (sync_ != nullptr) sync_->BeginBackward(m + 1 == micro_batches.size());
    (out.loss / accum).backward();
    loss_sum += out.loss.detach();
    const torch::Tensor quartile =
        (t * kTimestepQuartiles).div(diffusion_.timesteps(), "floor").clamp_max(kTimestepQuartiles - 1);
    quartile_loss.index_add_(0, quartile, out.per_sample.to(torch::kFloat64));
    quartile_count.index_add_(0, quartile, torch::ones({t.size(0)}, float64));
  }
  if (sync_ != nullptr) sync_->FinishBackward();
  torch::Tensor grad = params_->grad();
  stats.grad_norm = ClipGradNorm(grad, config_.train.grad_clip);
  optimizer_->Step(stats.lr);
  ema_->Update();
  ++step_;
  // One copy from the device for the loss and the quartiles.
  const torch::Tensor host =
      torch::cat({loss_sum.to(torch::kFloat64).reshape({1}), quartile_loss, quartile_count}).cpu();
  const double* values = host.data_ptr<double>();
  stats.loss = values[0] / accum;
  for (int q = 0; q < kTimestepQuartiles; ++q) {
    stats.quartile_loss_sum[q] = values[1 + q];
    stats.quartile_count[q] = values[1 + kTimestepQuartiles + q];
  }
  return stats;
}

namespace {

// Generator is a shared handle: the copy locks and reads the same generator.
torch::Tensor GeneratorState(torch::Generator generator) {
  std::lock_guard<std::mutex> lock(generator.mutex());
  return generator.get_state();
}

void SetGeneratorState(torch::Generator& generator, const torch::Tensor& state) {
  std::lock_guard<std::mutex> lock(generator.mutex());
  generator.set_state(state);
}

}  // namespace

std::map<std::string, torch::Tensor> Trainer::StateViews() const {
  std::map<std::string, torch::Tensor> state;
  auto add = [&](const std::string& prefix, const torch::Tensor& flat) {
    for (auto& [name, tensor] : params_->Views(flat)) state[prefix + name] = tensor;
  };
  add("model/", params_->data());
  add("ema/", ema_params_->data());
  add("adam/exp_avg/", optimizer_->exp_avg());
  add("adam/exp_avg_sq/", optimizer_->exp_avg_sq());
  state["adam/steps"] = Int64Tensor(optimizer_->steps());
  state["step"] = Int64Tensor(step_);
  // The device's default generator: dropout draws from it. Timesteps and noise need no state.
  state["rng/default"] = GeneratorState(at::globalContext().defaultGenerator(device_));
  return state;
}

std::map<std::string, torch::Tensor> Trainer::State() const {
  std::map<std::string, torch::Tensor> state = StateViews();
  for (auto& [name, tensor] : state) tensor = tensor.to(torch::kCPU).clone();
  return state;
}

void Trainer::LoadState(const std::map<std::string, torch::Tensor>& state,
                        const std::string& origin) {
  torch::NoGradGuard no_grad;
  torch::Tensor flat = params_->data();
  params_->Flatten(state, "model/", flat, origin);
  flat = ema_params_->data();
  ema_params_->Flatten(state, "ema/", flat, origin);
  params_->Flatten(state, "adam/exp_avg/", optimizer_->exp_avg(), origin);
  params_->Flatten(state, "adam/exp_avg_sq/", optimizer_->exp_avg_sq(), origin);
  optimizer_->set_steps(RequireTensor(state, "adam/steps", origin).item<int64_t>());
  step_ = RequireTensor(state, "step", origin).item<int64_t>();
  torch::Generator default_generator = at::globalContext().defaultGenerator(device_);
  SetGeneratorState(default_generator, RequireTensor(state, "rng/default", origin));
}

torch::Tensor DerivedGeneratorState(torch::Device device, uint64_t seed, int rank, int64_t step) {
  return GeneratorState(MakeGenerator(
      device,
      StreamSeed(seed, static_cast<uint64_t>(rank), static_cast<uint64_t>(step), 0x3c6ef372ULL)));
}

std::map<std::string, torch::Tensor> StateForRank(
    const std::map<std::string, torch::Tensor>& checkpoint, int rank, torch::Device device,
    uint64_t seed, const std::string& origin) {
  std::map<std::string, torch::Tensor> state = checkpoint;
  const auto own = checkpoint.find("rng/default/" + std::to_string(rank));
  if (own != checkpoint.end()) {
    state["rng/default"] = own->second;
  } else {
    const int64_t step = RequireTensor(checkpoint, "step", origin).item<int64_t>();
    state["rng/default"] = DerivedGeneratorState(device, seed, rank, step);
  }
  return state;
}

std::map<std::string, torch::Tensor> WeightsFromState(
    const std::map<std::string, torch::Tensor>& state, const std::string& which) {
  const std::string prefix = which + "/";
  std::map<std::string, torch::Tensor> out;
  for (const auto& [name, tensor] : state) {
    if (name.rfind(prefix, 0) == 0) out[name.substr(prefix.size())] = tensor;
  }
  return out;
}

Denoiser EvalDenoiser(UNet& model) {
  model->eval();
  return [model](const torch::Tensor& x, const torch::Tensor& t) mutable {
    return model->forward(x, t);
  };
}

std::map<std::string, torch::Tensor> StateDict(const torch::nn::Module& module) {
  std::map<std::string, torch::Tensor> out;
  // Copies, always: a parameter may be a view of a flat buffer, and pickling a view would
  // write the whole buffer.
  for (const auto& item : module.named_parameters()) {
    out[item.key()] = item.value().detach().to(torch::kCPU).clone();
  }
  for (const auto& item : module.named_buffers()) {
    out[item.key()] = item.value().detach().to(torch::kCPU).clone();
  }
  return out;
}

void SaveTensors(const std::map<std::string, torch::Tensor>& tensors, const std::string& path) {
  const std::vector<char> bytes = PickleTensors(tensors);
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.flush();
    if (!out) throw std::runtime_error(tmp + ": cannot write tensors");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    throw std::runtime_error(path + ": cannot rename " + tmp + " into place");
  }
}

std::map<std::string, torch::Tensor> LoadTensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open tensor file");
  return UnpickleTensors(
      std::vector<char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>()),
      path);
}

void LoadStateDict(torch::nn::Module& module, const std::map<std::string, torch::Tensor>& tensors,
                   const std::string& origin) {
  torch::NoGradGuard no_grad;
  std::size_t expected = 0;
  auto copy = [&](const std::string& name, torch::Tensor& target) {
    const auto it = tensors.find(name);
    if (it == tensors.end()) throw std::runtime_error(origin + ": missing tensor '" + name + "'");
    if (it->second.sizes() != target.sizes()) {
      throw std::runtime_error(origin + ": tensor '" + name + "' has shape " +
                               c10::str(it->second.sizes()) + ", the model expects " +
                               c10::str(target.sizes()));
    }
    target.copy_(it->second);
    ++expected;
  };
  for (auto& item : module.named_parameters()) copy(item.key(), item.value());
  for (auto& item : module.named_buffers()) copy(item.key(), item.value());
  if (expected != tensors.size()) {
    for (const auto& [name, tensor] : tensors) {
      if (!module.named_parameters().contains(name) && !module.named_buffers().contains(name)) {
        throw std::runtime_error(origin + ": unexpected tensor '" + name + "'");
      }
    }
  }
}

}  // namespace ddpm
