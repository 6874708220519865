// One optimizer step of DDPM training: loss, backward, clip, Adam with warmup, EMA.
#pragma once

#include <torch/torch.h>

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "config/config.h"
#include "trainer/communicator.h"
#include "trainer/diffusion.h"
#include "trainer/optimizer.h"
#include "trainer/timestep_sampler.h"
#include "trainer/unet.h"

namespace ddpm {

/// Where each value of StepStats::values sits.
enum StepValue : int64_t {
  /// Mean training loss over the step's micro-batches.
  kLossValue = 0,
  /// Global gradient norm before clipping.
  kGradNormValue = 1,
  /// kTimestepQuartiles values: for each quarter of [0, T) (q0..q3), the sum of this rank's
  /// per-sample losses whose timestep fell in it.
  kQuartileLossValues = 2,
  /// kTimestepQuartiles values: how many of this rank's samples fell in each quarter.
  kQuartileCountValues = 2 + kTimestepQuartiles,
  kStepValues = 2 + 2 * kTimestepQuartiles,
};

/// StepStats::values (or a sum of them) read on the host.
struct StepValues {
  double loss = 0;
  double grad_norm = 0;
  std::array<double, kTimestepQuartiles> quartile_loss_sum{};
  std::array<double, kTimestepQuartiles> quartile_count{};
};

/// Copies values ([kStepValues] float64, any device) to the host: waits for the work that
/// writes them.
StepValues ReadStepValues(const torch::Tensor& values);

/// What one optimizer step measured. The values stay on the step's device, so that a step
/// never waits for the GPU; reading them (loss(), ReadStepValues) waits for the step.
struct StepStats {
  /// Learning rate the step used.
  double lr = 0;
  /// [kStepValues] float64 on the step's device, laid out as StepValue says.
  torch::Tensor values;
  /// The step's mean loss (waits for the step).
  double loss() const { return ReadStepValues(values).loss; }
  /// The step's gradient norm before clipping (waits for the step).
  double grad_norm() const { return ReadStepValues(values).grad_norm; }
};

/// What the last step's gradient exchange cost.
struct CommStats {
  /// Seconds spent in all-reduces, summed over the buckets.
  double allreduce_seconds = 0;
  /// Share of allreduce_seconds that ran while backward was still computing.
  double overlap_fraction = 0;
  /// Seconds the step waited for all-reduces after its backward had ended: what it cost.
  double exposed_seconds = 0;
};

/// The trainer's one handle to the other data-parallel ranks: the gradient average during
/// backward, and the step's own small all-reduces (the timestep sampler's losses). Trainer::Step
/// drives it; comm/'s GradientBuckets is the implementation.
class DataParallel {
 public:
  virtual ~DataParallel() = default;
  /// Ranks in the data-parallel world.
  virtual int world_size() const = 0;
  /// Called before each micro-batch's backward. sync is true on the step's last micro-batch,
  /// whose backward completes the gradients that must be averaged.
  virtual void BeginBackward(bool sync) = 0;
  /// Called after the last backward; returns once the flat gradient holds the average over
  /// ranks.
  virtual void FinishBackward() = 0;
  /// The previous step's exchange.
  virtual CommStats last_stats() const = 0;
  /// Reduces a small host tensor over the ranks in place; what names it in a failure.
  virtual void AllReduce(torch::Tensor& tensor, ReduceOp op, const std::string& what) = 0;
};

/// What a step draws for its samples.
struct StepDraw {
  /// Timesteps [B] (int64) and noise [B, ...] on the step's device.
  torch::Tensor t, noise;
  /// Each loss's importance weight 1 / (T p_t) [B] (float32, device); undefined when t is
  /// uniform.
  torch::Tensor weight;
  /// The timesteps on the host, in position order.
  std::vector<int64_t> host_t;
};

/// The model, its EMA copy, the diffusion, Adam and the step counter of one training process.
class Trainer {
 public:
  /// Builds the model on device, seeded from config.train.seed; rank seeds dropout's stream.
  /// Each step accumulates micro_batches micro-batches (the run's BatchPlan::micro_batches).
  Trainer(const Config& config, torch::Device device, int rank = 0, int micro_batches = 1);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  /// One optimizer step on a batch of images in [-1, 1], split into micro_batches
  /// micro-batches.
  /// Nothing in it waits for the device. With train.cuda_graphs, the first steps run eagerly,
  /// the next is captured into a CUDA graph, and later ones replay it.
  /// The batch holds positions [first_position, first_position + B) of the step's global batch;
  /// each sample's timestep and noise are drawn from (seed, step, position), so they do not
  /// depend on how the global batch is split across ranks and micro-batches.
  /// A class-conditional model (model.num_classes) takes labels [B] (int64, each in
  /// [0, num_classes)); each is replaced by "no class" with probability train.label_dropout,
  /// drawn from (seed, step, position) like the timesteps (DrawLabelDropout).
  StepStats Step(const torch::Tensor& batch, int64_t first_position = 0,
                 const torch::Tensor& labels = {});
  /// Multiplies every later step's learning rate (warmup included) by scale; a divergence
  /// rollback lowers it.
  void set_lr_scale(double scale) { lr_scale_ = scale; }
  double lr_scale() const { return lr_scale_; }
  /// Makes Step average gradients over ranks (null: a world of one), whose losses then also
  /// feed a loss-aware timestep sampler: each step all-reduces the global batch's timesteps and
  /// losses, so that every rank keeps the same history and draws from the same distribution.
  /// Not owned.
  void set_data_parallel(DataParallel* ranks) { ranks_ = ranks; }
  /// What Step draws for the samples at positions [first_position, first_position + count)
  /// of global step `step` (0-based) from the sampler's present distribution: per sample, one
  /// stream seeded by (seed, step, position) gives its timestep, then its noise [...shape].
  StepDraw DrawTimestepsAndNoise(int64_t step, int64_t first_position, int64_t count,
                                 torch::IntArrayRef shape) const;
  /// Which samples at positions [first_position, first_position + count) of global step `step`
  /// train with "no class" (1) instead of their label: each a coin of probability
  /// train.label_dropout from its own stream (seed, step, position), so the choice does not
  /// depend on the ranks or micro-batches. All 0 for an unconditional model.
  std::vector<uint8_t> DrawLabelDropout(int64_t step, int64_t first_position, int64_t count) const;
  /// The timestep sampler (train.timestep_sampler) and its loss history.
  const TimestepSampler& timestep_sampler() const { return timestep_sampler_; }

  UNet& model() { return model_; }
  UNet& ema_model() { return ema_model_; }
  const GaussianDiffusion& diffusion() const { return diffusion_; }
  /// Optimizer steps taken so far.
  int64_t step() const { return step_; }
  torch::Device device() const { return device_; }
  const FlatParameters& parameters() const { return *params_; }
  /// Whether steps replay a captured CUDA graph now.
  bool graph_captured() const;

  /// Everything a bitwise-exact resume needs: weights, EMA, Adam moments, step and this rank's
  /// dropout RNG state ("rng/default"), as CPU copies.
  std::map<std::string, torch::Tensor> State() const;
  /// The same names as State(), but weights, EMA and moments are views of the live buffers on
  /// the device: valid until the next Step. What a checkpoint copies its slice from.
  std::map<std::string, torch::Tensor> StateViews() const;
  /// The post-hoc EMA profiles (train.phema_snapshot_every > 0), else null.
  const PowerEma* power_ema() const { return phema_.get(); }
  /// A snapshot of the post-hoc EMA profiles: views of the live buffers under
  /// checkpoint_keys::PhemaPrefix(k), with kPhemaSigmaRels and kStep (empty without them).
  std::map<std::string, torch::Tensor> PhemaViews() const;
  /// Restores State(); throws naming origin if a tensor is missing or has the wrong shape.
  void LoadState(const std::map<std::string, torch::Tensor>& state, const std::string& origin);

 private:
  Config config_;
  torch::Device device_;
  int micro_batches_;
  UNet model_;
  UNet ema_model_;
  GaussianDiffusion diffusion_;
  std::unique_ptr<FlatParameters> params_;
  std::unique_ptr<FlatParameters> ema_params_;
  std::unique_ptr<FlatAdam> optimizer_;
  std::unique_ptr<Ema> ema_;
  std::unique_ptr<PowerEma> phema_;
  DataParallel* ranks_ = nullptr;
  TimestepSampler timestep_sampler_;
  int64_t step_ = 0;
  double lr_scale_ = 1.0;
  /// The captured step and its static buffers (train.cuda_graphs on a CUDA build).
  struct StepGraph;
  std::unique_ptr<StepGraph> graph_;

  /// The step's work on device tensors: zeroes the gradients, runs forward and backward over
  /// the micro-batches (each loss times weight when it is defined), clips, applies the staged
  /// Adam update and the EMA, and writes the step's values into values and, when it is
  /// defined, each sample's loss into losses. Never waits for the device, so it can be
  /// captured.
  void Compute(const torch::Tensor& images, const torch::Tensor& t, const torch::Tensor& noise,
               const torch::Tensor& weight, const torch::Tensor& labels, torch::Tensor& values,
               torch::Tensor& losses);
  /// Feeds the step's per-sample losses (this rank's, at first_position) to the timestep
  /// sampler, after gathering the global batch's across ranks. Waits for the step.
  void UpdateTimestepSampler(const std::vector<int64_t>& host_t, const torch::Tensor& losses,
                             int64_t first_position);
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

/// A denoiser that takes labels: [B] int64, a class or null_label ("no class").
using LabelledDenoiser = std::function<torch::Tensor(
    const torch::Tensor& x_t, const torch::Tensor& t, const torch::Tensor& y)>;

/// Classifier-free guidance (Ho & Salimans 2022) of labels [B] at scale w, in the convention
///   eps = eps(x, t, no class) + w (eps(x, t, y) - eps(x, t, no class)),
/// so w = 1 is the conditional model and w = 0 the unconditional one (their single pass, so
/// exactly), and w > 1 guides. Otherwise the conditional and unconditional halves run as one
/// batch of 2B. Only the first `channels` output channels are guided; learned variances (the
/// rest) are the conditional pass's, as GLIDE and improved-diffusion do.
Denoiser GuidedDenoiser(LabelledDenoiser model, torch::Tensor labels, int64_t null_label, double w,
                        int64_t channels);

/// A Denoiser that runs module in eval mode (no dropout); with bf16, under bf16 autocast and
/// returning fp32. A class-conditional model samples labels [B] with guidance w
/// (GuidedDenoiser), or "no class" when labels is undefined.
Denoiser EvalDenoiser(UNet& model, Precision precision = Precision::kFp32,
                      const torch::Tensor& labels = {}, double guidance = 1.0);

/// The labels of the images at indices of a job of total images over classes (empty: undefined,
/// no labels): contiguous blocks, class classes[i * |classes| / total] for image i, so that a
/// grid of |classes| rows shows one class per row.
torch::Tensor BlockLabels(const std::vector<int>& classes, const std::vector<int64_t>& indices,
                          int64_t total);
/// sample.classes, or every class of a conditional model when it lists none; empty for an
/// unconditional model.
std::vector<int> ClassesToSample(const Config& config);

}  // namespace ddpm
