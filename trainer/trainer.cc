#include "trainer/trainer.h"

#include <ATen/autocast_mode.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <stdexcept>

#include "base/random.h"
#include "config/config.h"
#include "trainer/checkpoint_keys.h"
#include "trainer/communicator.h"
#include "trainer/tensor_io.h"

#ifdef DDPM_HAS_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

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

StepValues ReadStepValues(const torch::Tensor& values) {
  const torch::Tensor host = values.to(torch::kCPU, torch::kFloat64).contiguous();
  TORCH_CHECK(host.numel() == kStepValues, "step values: expected ", kStepValues, ", got ",
              host.numel());
  const double* v = host.data_ptr<double>();
  StepValues out;
  out.loss = v[kLossValue];
  out.grad_norm = v[kGradNormValue];
  for (int q = 0; q < kTimestepQuartiles; ++q) {
    out.quartile_loss_sum[q] = v[kQuartileLossValues + q];
    out.quartile_count[q] = v[kQuartileCountValues + q];
  }
  return out;
}

Trainer::Trainer(const Config& config, torch::Device device, int rank, int micro_batches)
    : config_(config),
      device_(device),
      micro_batches_(micro_batches),
      model_(config.model, config.train.seed),
      ema_model_(config.model, config.train.seed),
      diffusion_(config.diffusion, device),
      timestep_sampler_(config.train.timestep_sampler, config.diffusion.timesteps) {
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
  // The model and its EMA share one layout, so that the EMA update is one elementwise pass.
  const bool channels_last = config.train.channels_last;
  params_ = std::make_unique<FlatParameters>(*model_, /*with_grad=*/true, channels_last);
  ema_params_ = std::make_unique<FlatParameters>(*ema_model_, /*with_grad=*/false, channels_last);
  optimizer_ = std::make_unique<FlatAdam>(params_->data(), params_->grad(), config.train.adam_beta1,
                                          config.train.adam_beta2, config.train.adam_eps);
  ema_ = std::make_unique<Ema>(params_->data(), ema_params_->data(), config.train.ema_decay);
  if (config.train.phema_snapshot_every > 0) {
    phema_ = std::make_unique<PowerEma>(params_->data(), config.train.phema_sigma_rels);
  }
  if (config.train.cuda_graphs && !device.is_cuda()) {
    throw ConfigError(
        "train.cuda_graphs: CUDA graphs need a CUDA device, and this run "
        "trains on " +
        device.str() + "; set train.cuda_graphs: false");
  }
#ifndef DDPM_HAS_CUDA
  if (config.train.cuda_graphs) {
    throw ConfigError("train.cuda_graphs: this build's LibTorch has no CUDA");
  }
#endif
}

Trainer::~Trainer() = default;

StepDraw Trainer::DrawTimestepsAndNoise(int64_t step, int64_t first_position, int64_t count,
                                        torch::IntArrayRef shape) const {
  std::vector<int64_t> noise_shape = {count};
  noise_shape.insert(noise_shape.end(), shape.begin(), shape.end());
  // Pinned on a GPU run, so that the copies below do not make the host wait.
  const auto host = torch::TensorOptions().pinned_memory(device_.is_cuda());
  torch::Tensor t = torch::empty({count}, host.dtype(torch::kLong));
  torch::Tensor noise = torch::empty(noise_shape, host.dtype(torch::kFloat32));
  // Until the loss history is full the draw is uniform, through the same calls as the uniform
  // sampler: such a run matches a uniform one up to that step.
  const bool importance = timestep_sampler_.loss_aware();
  const TimestepSampler::Draw distribution =
      importance ? timestep_sampler_.Distribution() : TimestepSampler::Draw{};
  torch::Tensor weight;
  if (importance) weight = torch::empty({count}, host.dtype(torch::kFloat32));
  torch::Tensor u = torch::empty({1}, torch::kFloat64);
  for (int64_t i = 0; i < count; ++i) {
    // One independent CPU stream per sample, drawn in place: randint is random_, randn normal_.
    torch::Generator generator = at::detail::createCPUGenerator(
        StreamSeed(config_.train.seed, static_cast<uint64_t>(step),
                   static_cast<uint64_t>(first_position + i), 0x2545f491ULL));
    if (importance) {
      // The inverse CDF of the loss-aware distribution at a uniform u of the sample's stream.
      u.uniform_(0.0, 1.0, generator);
      const int64_t drawn = distribution.Timestep(u.item<double>());
      t.data_ptr<int64_t>()[i] = drawn;
      weight.data_ptr<float>()[i] = static_cast<float>(distribution.weight[drawn]);
    } else {
      t.narrow(0, i, 1).random_(0, config_.diffusion.timesteps, generator);
    }
    noise[i].normal_(0.0, 1.0, generator);
  }
  StepDraw draw;
  draw.host_t.assign(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + count);
  draw.t = t.to(device_, /*non_blocking=*/true);
  draw.noise = noise.to(device_, /*non_blocking=*/true);
  if (importance) draw.weight = weight.to(device_, /*non_blocking=*/true);
  return draw;
}

std::vector<uint8_t> Trainer::DrawLabelDropout(int64_t step, int64_t first_position,
                                               int64_t count) const {
  std::vector<uint8_t> dropped(count, 0);
  if (config_.model.num_classes == 0 || config_.train.label_dropout <= 0) return dropped;
  for (int64_t i = 0; i < count; ++i) {
    // Its own stream: the timestep and noise streams stay as an unconditional run draws them.
    SplitMix64 rng(StreamSeed(config_.train.seed, static_cast<uint64_t>(step),
                              static_cast<uint64_t>(first_position + i), 0x6c61626cULL));
    dropped[i] = rng.Uniform() < config_.train.label_dropout ? 1 : 0;
  }
  return dropped;
}

void Trainer::UpdateTimestepSampler(const std::vector<int64_t>& host_t, const torch::Tensor& losses,
                                    int64_t first_position) {
  const int64_t count = static_cast<int64_t>(host_t.size());
  const torch::Tensor local = losses.to(torch::kCPU, torch::kFloat64).contiguous();
  std::vector<int64_t> t = host_t;
  std::vector<double> values(local.data_ptr<double>(), local.data_ptr<double>() + count);
  if (ranks_ != nullptr && ranks_->world_size() > 1) {
    // The global batch in position order, every rank's rows summed into zeros: an all-gather
    // that does not care how the batch was split. int64 timesteps are exact in float64.
    const int64_t global = config_.train.batch_size;
    TORCH_CHECK(first_position >= 0 && first_position + count <= global,
                "timestep sampler: positions [", first_position, ", ", first_position + count,
                ") are outside the global batch of ", global);
    torch::Tensor rows = torch::zeros({2, global}, torch::kFloat64);
    const std::vector<double> own_t(host_t.begin(), host_t.end());
    rows[0].narrow(0, first_position, count).copy_(torch::tensor(own_t, torch::kFloat64));
    rows[1].narrow(0, first_position, count).copy_(local);
    ranks_->AllReduce(
        rows, ReduceOp::kSum,
        "all-reduce of the timestep sampler's losses at step " + std::to_string(step_ + 1));
    const torch::Tensor gathered_t = rows[0].to(torch::kLong).contiguous();
    const torch::Tensor gathered_loss = rows[1].contiguous();
    t.assign(gathered_t.data_ptr<int64_t>(), gathered_t.data_ptr<int64_t>() + global);
    values.assign(gathered_loss.data_ptr<double>(), gathered_loss.data_ptr<double>() + global);
  }
  timestep_sampler_.Update(t, values);
}

void Trainer::Compute(const torch::Tensor& images, const torch::Tensor& t,
                      const torch::Tensor& noise, const torch::Tensor& weight,
                      const torch::Tensor& labels, torch::Tensor& values, torch::Tensor& losses) {
  const int accum = micro_batches_;
  params_->grad().zero_();
  // The forward under bf16 autocast when asked; its output, and so the loss, back in fp32.
  const bool bf16 = config_.train.precision == Precision::kBf16;
  const std::vector<torch::Tensor> micro_labels =
      labels.defined() ? labels.chunk(accum, 0) : std::vector<torch::Tensor>(accum);
  const auto micro_images = images.chunk(accum, 0);
  const auto micro_t = t.chunk(accum, 0);
  const auto micro_noise = noise.chunk(accum, 0);
  const std::vector<torch::Tensor> micro_weight =
      weight.defined() ? weight.chunk(accum, 0) : std::vector<torch::Tensor>(accum);
  std::vector<torch::Tensor> sample_losses;
  torch::Tensor loss_sum = torch::zeros({}, images.options());
  // Per quarter of [0, T): the sum of the samples' losses, and how many there were.
  const auto float64 = images.options().dtype(torch::kFloat64);
  torch::Tensor quartile_loss = torch::zeros({kTimestepQuartiles}, float64);
  torch::Tensor quartile_count = torch::zeros({kTimestepQuartiles}, float64);
  for (std::size_t m = 0; m < micro_images.size(); ++m) {
    const torch::Tensor& y = micro_labels[m];
    const Denoiser denoiser = [this, bf16, &y](const torch::Tensor& x, const torch::Tensor& tt) {
      AutocastScope autocast(device_.type(), bf16);
      return model_->forward(x, tt, y).to(torch::kFloat32);
    };
    const DiffusionLoss out = diffusion_.TrainingLoss(denoiser, micro_images[m], micro_t[m],
                                                      micro_noise[m], micro_weight[m]);
    if (losses.defined()) {
      // What the history keeps: each sample's loss as the objective weights it, before the
      // importance weight.
      sample_losses.push_back(config_.diffusion.weighting == LossWeighting::kNone
                                  ? out.per_sample
                                  : out.per_sample * diffusion_.LossWeight(micro_t[m]));
    }
    if (ranks_ != nullptr) ranks_->BeginBackward(m + 1 == micro_images.size());
    (out.loss / accum).backward();
    loss_sum += out.loss.detach();
    const torch::Tensor quartile = (micro_t[m] * kTimestepQuartiles)
                                       .div(diffusion_.timesteps(), "floor")
                                       .clamp_max(kTimestepQuartiles - 1);
    quartile_loss.index_add_(0, quartile, out.per_sample.detach().to(torch::kFloat64));
    quartile_count.index_add_(0, quartile, torch::ones({micro_t[m].size(0)}, float64));
  }
  if (ranks_ != nullptr) ranks_->FinishBackward();
  if (losses.defined()) losses.copy_(torch::cat(sample_losses));
  torch::Tensor grad = params_->grad();
  torch::Tensor grad_norm;
  if (device_.is_cpu()) {
    // On the CPU the clip, Adam and the EMA are one pass over memory (the step is bound by
    // it there), and reading the norm costs nothing.
    torch::NoGradGuard no_grad;
    grad_norm = grad.norm();
    optimizer_->ApplyFusedCpu(ClipCoefficient(grad_norm.item<double>(), config_.train.grad_clip),
                              ema_.get());
  } else {
    grad_norm = ClipGradNorm(grad, config_.train.grad_clip);
    optimizer_->Apply();
    ema_->Update();
  }
  if (phema_) phema_->Update();
  values.copy_(
      torch::cat({(loss_sum / accum).to(torch::kFloat64).reshape({1}),
                  grad_norm.to(torch::kFloat64).reshape({1}), quartile_loss, quartile_count}));
}

#ifdef DDPM_HAS_CUDA
struct Trainer::StepGraph {
  /// Eager steps before the capture, on a side stream: they let cuDNN, cuBLAS and autograd
  /// set up what a capture must not (as torch.cuda.graphs' warm-up does).
  static constexpr int kWarmupSteps = 3;
  at::cuda::CUDAGraph graph;
  torch::Tensor images, t, noise, values;
  /// A class-conditional model's labels (after label dropout).
  torch::Tensor labels;
  /// With a loss-aware timestep sampler: the importance weights and per-sample losses.
  torch::Tensor weight, losses;
  int eager_steps = 0;
  bool captured = false;
};
#else
struct Trainer::StepGraph {
  bool captured = false;
};
#endif

bool Trainer::graph_captured() const { return graph_ != nullptr && graph_->captured; }

StepStats Trainer::Step(const torch::Tensor& batch, int64_t first_position,
                        const torch::Tensor& labels) {
  const int accum = micro_batches_;
  TORCH_CHECK(batch.size(0) % accum == 0, "batch of ", batch.size(0),
              " images does not split into ", accum, " micro-batches");
  const int classes = config_.model.num_classes;
  torch::Tensor y;
  if (classes > 0) {
    TORCH_CHECK(labels.defined() && labels.dim() == 1 && labels.size(0) == batch.size(0),
                "a class-conditional model (model.num_classes ", classes, ") trains on one label ",
                "per image; got ", labels.defined() ? labels.sizes() : torch::IntArrayRef{});
    y = labels.to(torch::kLong).to(torch::kCPU).clone();
    TORCH_CHECK(y.min().item<int64_t>() >= 0 && y.max().item<int64_t>() < classes,
                "labels outside [0, ", classes, ")");
    // Classifier-free guidance's training (Ho & Salimans 2022): some labels become "no class".
    const std::vector<uint8_t> dropped = DrawLabelDropout(step_, first_position, y.size(0));
    for (int64_t i = 0; i < y.size(0); ++i) {
      if (dropped[i] != 0) y.data_ptr<int64_t>()[i] = classes;
    }
    y = y.to(device_, /*non_blocking=*/true);
  } else {
    TORCH_CHECK(!labels.defined(), "labels given to an unconditional model (model.num_classes 0)");
  }
  model_->train();
  StepStats stats;
  stats.lr = WarmupLearningRate(config_.train, step_ + 1) * lr_scale_;
  const auto memory_format = config_.train.channels_last ? torch::MemoryFormat::ChannelsLast
                                                         : torch::MemoryFormat::Contiguous;
  const torch::Tensor images = batch.to(device_, /*non_blocking=*/true).contiguous(memory_format);
  // Every sample's timestep and noise for the whole batch; the micro-batches take slices.
  StepDraw draw =
      DrawTimestepsAndNoise(step_, first_position, images.size(0), images.sizes().slice(1));
  const torch::Tensor& t = draw.t;
  const torch::Tensor noise = draw.noise.contiguous(memory_format);
  // A loss-aware sampler learns from every step's per-sample losses, which makes the step wait
  // for the device once (to read them) and, on several ranks, all-reduce them.
  const bool learns = timestep_sampler_.uses_losses();
  optimizer_->Prepare(stats.lr);
  if (phema_) phema_->Prepare(step_ + 1);
  if (!config_.train.cuda_graphs) {
    stats.values = torch::empty({kStepValues}, images.options().dtype(torch::kFloat64));
    torch::Tensor losses;
    if (learns) losses = torch::empty({images.size(0)}, images.options().dtype(torch::kFloat64));
    Compute(images, t, noise, draw.weight, y, stats.values, losses);
    if (learns) UpdateTimestepSampler(draw.host_t, losses, first_position);
    ++step_;
    return stats;
  }
#ifdef DDPM_HAS_CUDA
  if (ranks_ != nullptr) {
    throw ConfigError(
        "train.cuda_graphs: the captured step supports a world of one; the gradient buckets' "
        "all-reduces are driven from host threads, which a CUDA graph cannot capture. Set "
        "train.cuda_graphs: false for data-parallel runs");
  }
  if (graph_ == nullptr) {
    graph_ = std::make_unique<StepGraph>();
    graph_->images = torch::empty_like(images);
    graph_->t = torch::empty_like(t);
    graph_->noise = torch::empty_like(noise);
    if (y.defined()) graph_->labels = torch::empty_like(y);
    graph_->values = torch::empty({kStepValues}, images.options().dtype(torch::kFloat64));
    if (learns) {
      // The captured step always takes importance weights; ones while the draw is uniform.
      graph_->weight = torch::ones({images.size(0)}, images.options());
      graph_->losses = torch::empty({images.size(0)}, images.options().dtype(torch::kFloat64));
    }
  }
  StepGraph& g = *graph_;
  TORCH_CHECK(images.sizes() == g.images.sizes(),
              "train.cuda_graphs: the batch shape changed from ", g.images.sizes(), " to ",
              images.sizes(), "; a captured step has static shapes");
  g.images.copy_(images, /*non_blocking=*/true);
  g.t.copy_(t, /*non_blocking=*/true);
  g.noise.copy_(noise, /*non_blocking=*/true);
  if (y.defined()) g.labels.copy_(y, /*non_blocking=*/true);
  if (learns) {
    if (draw.weight.defined()) {
      g.weight.copy_(draw.weight, /*non_blocking=*/true);
    } else {
      g.weight.fill_(1.0f);
    }
  }
  if (g.captured) {
    g.graph.replay();
  } else {
    // Warm-up and capture run on a side stream ordered after the inputs' copies; the current
    // stream waits for it afterwards.
    const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device_.index());
    const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, device_.index());
    at::cuda::CUDAEvent ready;
    ready.record(current);
    ready.block(side);
    {
      c10::cuda::CUDAStreamGuard guard(side);
      if (g.eager_steps < StepGraph::kWarmupSteps) {
        Compute(g.images, g.t, g.noise, g.weight, g.labels, g.values, g.losses);
        ++g.eager_steps;
      } else {
        // Autocast's cache of bf16 weights would outlive the capture's memory pool.
        const bool cache = at::autocast::is_autocast_cache_enabled();
        at::autocast::set_autocast_cache_enabled(false);
        g.graph.capture_begin();
        Compute(g.images, g.t, g.noise, g.weight, g.labels, g.values, g.losses);
        g.graph.capture_end();
        at::autocast::set_autocast_cache_enabled(cache);
        g.captured = true;
        // A capture records the work without running it.
        g.graph.replay();
      }
    }
    at::cuda::CUDAEvent done;
    done.record(side);
    done.block(current);
  }
  // A copy: the next replay overwrites the static values.
  stats.values = g.values.clone();
  if (learns) UpdateTimestepSampler(draw.host_t, g.losses, first_position);
  ++step_;
  return stats;
#else
  throw std::logic_error("train.cuda_graphs without CUDA: the constructor refuses this");
#endif
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
  add(checkpoint_keys::kModelPrefix, params_->data());
  add(checkpoint_keys::kEmaPrefix, ema_params_->data());
  add(checkpoint_keys::kAdamExpAvgPrefix, optimizer_->exp_avg());
  add(checkpoint_keys::kAdamExpAvgSqPrefix, optimizer_->exp_avg_sq());
  state[checkpoint_keys::kAdamSteps] = Int64Tensor(optimizer_->steps());
  state[checkpoint_keys::kStep] = Int64Tensor(step_);
  if (phema_) state.merge(PhemaViews());
  // The device's default generator: dropout draws from it. Timesteps and noise need no state
  // beyond a loss-aware sampler's history.
  state[checkpoint_keys::kRng] = GeneratorState(at::globalContext().defaultGenerator(device_));
  if (timestep_sampler_.uses_losses()) {
    const int64_t rows = timestep_sampler_.timesteps();
    state[checkpoint_keys::kTimestepLossHistory] =
        torch::tensor(timestep_sampler_.history(), torch::kFloat64)
            .reshape({rows, TimestepSampler::kHistory});
    state[checkpoint_keys::kTimestepLossCounts] =
        torch::tensor(timestep_sampler_.counts(), torch::kLong);
  }
  return state;
}

std::map<std::string, torch::Tensor> Trainer::PhemaViews() const {
  std::map<std::string, torch::Tensor> state;
  if (!phema_) return state;
  for (std::size_t k = 0; k < phema_->profiles().size(); ++k) {
    for (auto& [name, tensor] : params_->Views(phema_->profiles()[k])) {
      state[checkpoint_keys::PhemaPrefix(k) + name] = tensor;
    }
  }
  state[checkpoint_keys::kPhemaSigmaRels] = torch::tensor(phema_->sigma_rels(), torch::kFloat64);
  state[checkpoint_keys::kStep] = Int64Tensor(step_);
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
  params_->Flatten(state, checkpoint_keys::kModelPrefix, flat, origin);
  flat = ema_params_->data();
  ema_params_->Flatten(state, checkpoint_keys::kEmaPrefix, flat, origin);
  params_->Flatten(state, checkpoint_keys::kAdamExpAvgPrefix, optimizer_->exp_avg(), origin);
  params_->Flatten(state, checkpoint_keys::kAdamExpAvgSqPrefix, optimizer_->exp_avg_sq(), origin);
  optimizer_->set_steps(RequireTensor(state, checkpoint_keys::kAdamSteps, origin).item<int64_t>());
  step_ = RequireTensor(state, checkpoint_keys::kStep, origin).item<int64_t>();
  if (phema_) {
    // The profiles average from step 1: they cannot start part-way through a run.
    const auto saved = state.find(checkpoint_keys::kPhemaSigmaRels);
    if (saved == state.end()) {
      throw CheckpointError(origin +
                            " holds no post-hoc EMA profiles (it was trained with "
                            "train.phema_snapshot_every: 0), and profiles must average "
                            "from step 1; resume with train.phema_snapshot_every: 0, or "
                            "start a new run");
    }
    const torch::Tensor sigmas = saved->second.to(torch::kCPU, torch::kFloat64).contiguous();
    const std::vector<double> saved_sigmas(sigmas.data_ptr<double>(),
                                           sigmas.data_ptr<double>() + sigmas.numel());
    if (saved_sigmas != phema_->sigma_rels()) {
      auto list = [](const std::vector<double>& v) {
        std::string out;
        for (double x : v) out += (out.empty() ? "" : ", ") + c10::str(x);
        return "[" + out + "]";
      };
      throw CheckpointError(origin + " keeps post-hoc EMA profiles of sigma_rel " +
                            list(saved_sigmas) + ", this config asks for " +
                            list(phema_->sigma_rels()) +
                            " (train.phema_sigma_rels); resume with the checkpoint's");
    }
    for (std::size_t k = 0; k < phema_->profiles().size(); ++k) {
      params_->Flatten(state, checkpoint_keys::PhemaPrefix(k), phema_->profiles()[k], origin);
    }
  }
  torch::Generator default_generator = at::globalContext().defaultGenerator(device_);
  SetGeneratorState(default_generator, RequireTensor(state, checkpoint_keys::kRng, origin));
  if (timestep_sampler_.uses_losses()) {
    // A checkpoint of a uniform run has no history: it fills again from the next steps.
    const auto history = state.find(checkpoint_keys::kTimestepLossHistory);
    const auto counts = state.find(checkpoint_keys::kTimestepLossCounts);
    if (history == state.end() || counts == state.end()) {
      timestep_sampler_ = TimestepSampler(timestep_sampler_.kind(), timestep_sampler_.timesteps());
      return;
    }
    const torch::Tensor h = history->second.to(torch::kCPU, torch::kFloat64).contiguous();
    const torch::Tensor c = counts->second.to(torch::kCPU, torch::kLong).contiguous();
    try {
      timestep_sampler_.Restore(
          std::vector<double>(h.data_ptr<double>(), h.data_ptr<double>() + h.numel()),
          std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel()), origin);
    } catch (const std::invalid_argument& error) {
      throw CheckpointError(error.what());
    }
  }
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
  const auto own = checkpoint.find(checkpoint_keys::RngOfRank(rank));
  if (own != checkpoint.end()) {
    state[checkpoint_keys::kRng] = own->second;
  } else {
    const int64_t step = RequireTensor(checkpoint, checkpoint_keys::kStep, origin).item<int64_t>();
    state[checkpoint_keys::kRng] = DerivedGeneratorState(device, seed, rank, step);
  }
  return state;
}

std::map<std::string, torch::Tensor> WeightsFromState(
    const std::map<std::string, torch::Tensor>& state, const std::string& which) {
  if (which != "model" && which != "ema") {
    throw std::invalid_argument("WeightsFromState: which is model or ema, got '" + which + "'");
  }
  const std::string prefix =
      which == "model" ? checkpoint_keys::kModelPrefix : checkpoint_keys::kEmaPrefix;
  std::map<std::string, torch::Tensor> out;
  for (const auto& [name, tensor] : state) {
    if (name.rfind(prefix, 0) == 0) out[name.substr(prefix.size())] = tensor;
  }
  return out;
}

Denoiser GuidedDenoiser(LabelledDenoiser model, torch::Tensor labels, int64_t null_label, double w,
                        int64_t channels) {
  TORCH_CHECK(std::isfinite(w), "guidance scale ", w, " is not finite");
  if (w == 1.0) {
    return [model, labels](const torch::Tensor& x, const torch::Tensor& t) {
      return model(x, t, labels.to(x.device()));
    };
  }
  const torch::Tensor none = torch::full_like(labels, null_label);
  if (w == 0.0) {
    return [model, none](const torch::Tensor& x, const torch::Tensor& t) {
      return model(x, t, none.to(x.device()));
    };
  }
  return [model, labels, none, w, channels](const torch::Tensor& x, const torch::Tensor& t) {
    const int64_t n = x.size(0);
    const torch::Tensor both =
        model(torch::cat({x, x}), torch::cat({t, t}), torch::cat({labels, none}).to(x.device()));
    const torch::Tensor conditional = both.narrow(0, 0, n);
    const torch::Tensor unconditional = both.narrow(0, n, n);
    const torch::Tensor eps_c = conditional.narrow(1, 0, channels);
    const torch::Tensor eps_u = unconditional.narrow(1, 0, channels);
    torch::Tensor guided = eps_u + w * (eps_c - eps_u);
    if (conditional.size(1) == channels) return guided;
    return torch::cat({guided, conditional.narrow(1, channels, conditional.size(1) - channels)}, 1);
  };
}

Denoiser EvalDenoiser(UNet& model, Precision precision, const torch::Tensor& labels,
                      double guidance) {
  model->eval();
  LabelledDenoiser forward;
  if (precision == Precision::kFp32) {
    forward = [model](const torch::Tensor& x, const torch::Tensor& t,
                      const torch::Tensor& y) mutable { return model->forward(x, t, y); };
  } else {
    forward = [model](const torch::Tensor& x, const torch::Tensor& t,
                      const torch::Tensor& y) mutable {
      AutocastScope autocast(x.device().type(), true);
      return model->forward(x, t, y).to(torch::kFloat32);
    };
  }
  if (!labels.defined()) {
    return [forward](const torch::Tensor& x, const torch::Tensor& t) {
      return forward(x, t, torch::Tensor());
    };
  }
  const ModelConfig& m = model->config();
  TORCH_CHECK(m.num_classes > 0, "labels given to an unconditional model (model.num_classes 0)");
  return GuidedDenoiser(forward, labels.to(torch::kLong), m.num_classes, guidance, m.in_channels);
}

torch::Tensor BlockLabels(const std::vector<int>& classes, const std::vector<int64_t>& indices,
                          int64_t total) {
  if (classes.empty()) return {};
  const auto n = static_cast<int64_t>(indices.size());
  torch::Tensor labels = torch::empty({n}, torch::kLong);
  const auto k = static_cast<int64_t>(classes.size());
  for (int64_t i = 0; i < n; ++i) {
    labels.data_ptr<int64_t>()[i] = classes[static_cast<std::size_t>(indices[i] * k / total)];
  }
  return labels;
}

std::vector<int> ClassesToSample(const Config& config) {
  if (config.model.num_classes == 0 || !config.sample.classes.empty()) return config.sample.classes;
  std::vector<int> all(config.model.num_classes);
  for (int k = 0; k < config.model.num_classes; ++k) all[k] = k;
  return all;
}

}  // namespace ddpm
