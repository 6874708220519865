#include "trainer/trainer.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <stdexcept>

namespace ddpm {

double WarmupLearningRate(const TrainConfig& config, int64_t update) {
  if (config.warmup_steps <= 0) return config.lr;
  return config.lr * std::min(1.0, static_cast<double>(update) / config.warmup_steps);
}

Ema::Ema(torch::nn::Module& source, torch::nn::Module& target, double decay)
    : source_(source.parameters()), target_(target.parameters()), decay_(decay) {
  TORCH_CHECK(source_.size() == target_.size(), "EMA: source and target differ in structure");
  torch::NoGradGuard no_grad;
  for (std::size_t i = 0; i < source_.size(); ++i) target_[i].copy_(source_[i]);
}

void Ema::Update() {
  torch::NoGradGuard no_grad;
  torch::_foreach_mul_(target_, decay_);
  torch::_foreach_add_(target_, source_, 1.0 - decay_);
}

Trainer::Trainer(const Config& config, torch::Device device, int rank)
    : config_(config),
      device_(device),
      model_(config.model, config.train.seed),
      ema_model_(config.model, config.train.seed),
      diffusion_(config.diffusion, device),
      // Timesteps and noise come from a stream of their own per rank.
      generator_(MakeGenerator(device, config.train.seed * 1000003ULL + 17ULL + rank)) {
  model_->to(device);
  ema_model_->to(device);
  ema_model_->eval();
  for (auto& p : ema_model_->parameters()) p.set_requires_grad(false);
  parameters_ = model_->parameters();
  optimizer_ = std::make_unique<torch::optim::Adam>(
      parameters_, torch::optim::AdamOptions(config.train.lr)
                       .betas({config.train.adam_beta1, config.train.adam_beta2})
                       .eps(config.train.adam_eps));
  ema_ = std::make_unique<Ema>(*model_, *ema_model_, config.train.ema_decay);
}

StepStats Trainer::Step(const torch::Tensor& batch) {
  const int accum = config_.train.grad_accum;
  TORCH_CHECK(batch.size(0) % accum == 0, "batch of ", batch.size(0),
              " images does not split into train.grad_accum = ", accum, " micro-batches");
  model_->train();
  const double lr = WarmupLearningRate(config_.train, step_ + 1);
  for (auto& group : optimizer_->param_groups()) {
    static_cast<torch::optim::AdamOptions&>(group.options()).lr(lr);
  }
  optimizer_->zero_grad();
  const torch::Tensor images = batch.to(device_, /*non_blocking=*/true);
  const Denoiser denoiser = [this](const torch::Tensor& x, const torch::Tensor& t) {
    return model_->forward(x, t);
  };
  torch::Tensor loss_sum = torch::zeros({}, images.options());
  for (const torch::Tensor& micro : images.chunk(accum, 0)) {
    const DiffusionLoss out = diffusion_.TrainingLoss(denoiser, micro, generator_);
    (out.loss / accum).backward();
    loss_sum += out.loss.detach();
  }
  StepStats stats;
  stats.lr = lr;
  if (config_.train.grad_clip > 0) {
    stats.grad_norm = torch::nn::utils::clip_grad_norm_(parameters_, config_.train.grad_clip);
  } else {
    std::vector<torch::Tensor> norms;
    for (const auto& p : parameters_) {
      if (p.grad().defined()) norms.push_back(p.grad().norm());
    }
    stats.grad_norm = torch::stack(norms).norm().item<double>();
  }
  optimizer_->step();
  ema_->Update();
  ++step_;
  stats.loss = loss_sum.item<double>() / accum;
  return stats;
}

Denoiser EvalDenoiser(UNet& model) {
  model->eval();
  return [model](const torch::Tensor& x, const torch::Tensor& t) mutable {
    return model->forward(x, t);
  };
}

std::map<std::string, torch::Tensor> StateDict(const torch::nn::Module& module) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& item : module.named_parameters()) {
    out[item.key()] = item.value().detach().to(torch::kCPU).contiguous();
  }
  for (const auto& item : module.named_buffers()) {
    out[item.key()] = item.value().detach().to(torch::kCPU).contiguous();
  }
  return out;
}

void SaveTensors(const std::map<std::string, torch::Tensor>& tensors, const std::string& path) {
  c10::Dict<std::string, torch::Tensor> dict;
  for (const auto& [name, tensor] : tensors) dict.insert(name, tensor);
  const std::vector<char> bytes = torch::pickle_save(dict);
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
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)),
                                std::istreambuf_iterator<char>());
  torch::IValue value;
  try {
    value = torch::pickle_load(bytes);
  } catch (const c10::Error& e) {
    throw std::runtime_error(path + ": not a torch.save / pickle_save file: " +
                             e.what_without_backtrace());
  }
  if (!value.isGenericDict()) throw std::runtime_error(path + ": expected a dict of tensors");
  std::map<std::string, torch::Tensor> out;
  for (const auto& item : value.toGenericDict()) {
    if (!item.key().isString() || !item.value().isTensor()) {
      throw std::runtime_error(path + ": expected a dict of str -> tensor");
    }
    out[item.key().toStringRef()] = item.value().toTensor();
  }
  return out;
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
