// The one typed configuration of a training run, loaded from YAML.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace ddpm {

/// The training loss is also reported per quarter of the timesteps [0, T), q0..q3, as
/// improved-diffusion logs it.
constexpr int kTimestepQuartiles = 4;

/// A configuration error. The message names the key (section.key), the file and line where
/// known, and the allowed values.
class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class ScheduleKind { kLinear, kCosine };
enum class Objective { kEps, kX0, kV };
enum class LossKind { kL2, kL1, kHybrid, kVlb };
enum class LossWeighting { kNone, kP2, kMinSnr };
enum class VarianceKind { kFixedLarge, kFixedSmall };
enum class SamplerKind { kDdpm, kDdim, kHeun };
enum class DatasetKind { kShapes, kCifar10, kFolder };
enum class CifarSplit { kTrain, kTest };
enum class Precision { kFp32, kBf16 };
enum class DivergencePolicy { kStop, kRollback };
enum class TimestepSamplerKind { kUniform, kLossSecondMoment };
/// Which logits the Inception Score is computed from: pool3 times the fc weights without the
/// bias (the original TF code's, openai/improved-gan; torch-fidelity's logits_unbiased), or the
/// fc's output with it.
enum class IsLogits { kUnbiased, kBiased };
/// The score by which a run keeps its best checkpoint (eval.select).
enum class EvalSelect { kNone, kFid, kKid, kNll };

/// The UNet of Ho et al. (Appendix B), as in the authors' diffusion_tf/models/unet.py.
struct ModelConfig {
  /// Base channel count; level i has ch * ch_mult[i] channels.
  int ch = 128;
  /// Channel multiplier per resolution level; the image halves between levels.
  std::vector<int> ch_mult = {1, 2, 2, 2};
  /// Residual blocks per level on the way down (the way up has one more).
  int num_res_blocks = 2;
  /// Feature-map sizes (in pixels) at which self-attention follows each res block.
  std::vector<int> attn_resolutions = {16};
  /// Dropout rate inside res blocks.
  double dropout = 0.1;
  /// Height and width of the (square) images.
  int image_size = 32;
  /// Image channels in and out.
  int in_channels = 3;
  /// GroupNorm groups; every level's channel count must divide by it.
  int norm_groups = 32;
  /// Learned variances (Nichol & Dhariwal 2021): twice the output channels, the second half
  /// interpolating the log-variance between beta-tilde_t and beta_t.
  bool learn_sigma = false;
  /// Classes of a class-conditional model (0: unconditional). The UNet adds a learned
  /// embedding of the label to the timestep's, with one more row for "no class" (label
  /// num_classes), the null label of classifier-free guidance (Ho & Salimans 2022).
  int num_classes = 0;
};

/// The forward process, the objective and the loss.
struct DiffusionConfig {
  /// Number of diffusion steps T.
  int timesteps = 1000;
  /// Beta schedule: linear (Ho et al.) or cosine (Nichol & Dhariwal).
  ScheduleKind schedule = ScheduleKind::kLinear;
  /// First beta of the linear schedule.
  double beta_start = 1e-4;
  /// Last beta of the linear schedule.
  double beta_end = 0.02;
  /// Offset s of the cosine schedule.
  double cosine_s = 0.008;
  /// What the network predicts: eps (the paper's L_simple), x0 or v.
  Objective objective = Objective::kEps;
  /// The loss: l2 or l1 between prediction and target (l2 is L_simple), hybrid (L_simple +
  /// vlb_weight x L_vlb, the bound's gradient stopped through the mean; needs
  /// model.learn_sigma), or vlb (the variational bound alone).
  LossKind loss = LossKind::kL2;
  /// lambda of L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal: 0.001).
  double vlb_weight = 0.001;
  /// Per-timestep loss weight: none, p2 (Choi et al. 2022) or min_snr (Hang et al. 2023).
  LossWeighting weighting = LossWeighting::kNone;
  /// P2 weighting exponent gamma: weight = (k + snr)^-gamma.
  double p2_gamma = 1.0;
  /// P2 weighting offset k.
  double p2_k = 1.0;
  /// Min-SNR clamp gamma: weight uses min(snr, gamma).
  double min_snr_gamma = 5.0;
};

/// Optimisation and the training loop.
struct TrainConfig {
  /// Optimizer steps to train for.
  int64_t steps = 800000;
  /// Global batch: per-rank batch x world size x grad_accum.
  int batch_size = 128;
  /// Micro-batches accumulated per optimizer step (a coordinator derives it for each group from
  /// dist.max_micro_batch instead). BatchPlan calls these micro_batches.
  int grad_accum = 1;
  /// Peak Adam learning rate.
  double lr = 2e-4;
  /// Steps of linear learning-rate warmup from 0 to lr.
  int64_t warmup_steps = 5000;
  /// Adam beta1.
  double adam_beta1 = 0.9;
  /// Adam beta2.
  double adam_beta2 = 0.999;
  /// Adam epsilon.
  double adam_eps = 1e-8;
  /// How each sample's timestep is drawn: uniform (Ho et al.), or loss_second_moment
  /// (Nichol & Dhariwal, section 3.3: t with probability proportional to sqrt(E[L_t^2]) over
  /// the last 10 losses at t, uniform until every t has them, the loss reweighted by
  /// 1 / (T p_t)). The history comes from the whole global batch and is checkpointed.
  TimestepSamplerKind timestep_sampler = TimestepSamplerKind::kUniform;
  /// Global gradient-norm clip; 0 disables clipping.
  double grad_clip = 1.0;
  /// EMA decay of the weights used for sampling.
  double ema_decay = 0.9999;
  /// Post-hoc EMA (Karras et al. 2024): steps between snapshots of the power-function EMA
  /// profiles into RUN_DIR/phema/ (sharded and checksummed like checkpoints, never pruned),
  /// from which `ddpm_phema` reconstructs the EMA of any length after training; 0: no
  /// profiles are kept.
  int64_t phema_snapshot_every = 0;
  /// The relative standard deviations of the profiles kept (EDM2's defaults), each in
  /// (0, 0.3003] (the largest a power-function profile has).
  std::vector<double> phema_sigma_rels = {0.05, 0.10};
  /// A class-conditional model (model.num_classes > 0): the probability that a sample's label
  /// is replaced by "no class" during training, classifier-free guidance's p_uncond (Ho &
  /// Salimans 2022 use 0.1 or 0.2). Unused by an unconditional model.
  double label_dropout = 0.1;
  /// Seed of parameters, data order, timesteps and noise.
  uint64_t seed = 0;
  /// Steps between log lines.
  int64_t log_every = 100;
  /// Steps between EMA sample grids; 0 writes one only at the end.
  int64_t sample_every = 0;
  /// CPU threads for torch; 0 means OMP_NUM_THREADS if set, else cores / local ranks.
  int threads = 0;
  /// Device: cpu, cuda, or auto (cuda when available).
  std::string device = "auto";
  /// fp32, or bf16: the UNet's forward under bf16 autocast, with the loss, gradients, optimizer
  /// state and EMA in fp32. With fp32 on a GPU, matmuls and convolutions may use TF32.
  Precision precision = Precision::kFp32;
  /// Keep the UNet's convolution weights, its inputs and so its activations in channels_last
  /// (NHWC) memory order, which tensor-core convolutions on GPUs prefer.
  bool channels_last = false;
  /// Capture the whole training step (forward, backward, clipping, Adam, EMA) in one CUDA
  /// graph after a few eager steps, and replay it: no per-kernel launch cost. CUDA only, and a
  /// world of one (data-parallel runs all-reduce from host threads).
  bool cuda_graphs = false;
  /// Steps between checkpoints; 0 saves only at the end (and on Ctrl-C or SIGTERM).
  int64_t checkpoint_every = 5000;
  /// Checkpoints kept in the run directory; older ones are deleted.
  int keep_checkpoints = 3;
  /// Checkpoints in a row that may fail to write (a full disk, an I/O error) before the run
  /// stops naming the error; each failure before that is abandoned cleanly with a warning.
  int max_checkpoint_failures = 3;
  /// A non-finite loss (or a spike, with spike_factor): stop the run before any checkpoint of
  /// those weights, or roll back to the newest good checkpoint and go on past the data that
  /// diverged.
  DivergencePolicy on_divergence = DivergencePolicy::kStop;
  /// Rollbacks a run may make before a divergence stops it.
  int max_rollbacks = 3;
  /// Each rollback multiplies the learning rate by this (1 keeps it).
  double rollback_lr_scale = 1.0;
  /// A logged loss above this times the median of the last logged losses counts as a
  /// divergence too; 0 turns the spike test off.
  double spike_factor = 0;
};

/// The training images.
struct DataConfig {
  /// Dataset: shapes (built in, procedural), cifar10 (official binary) or folder (PNG/JPEG).
  DatasetKind dataset = DatasetKind::kShapes;
  /// cifar10: cifar-10-binary.tar.gz or the folder of data_batch_*.bin; folder: the image folder.
  std::string path;
  /// cifar10: train (data_batch_1..5, 50000 images) or test (test_batch, 10000 images).
  CifarSplit split = CifarSplit::kTrain;
  /// Batches the background loader prepares ahead of the train step.
  int prefetch = 2;
  /// Number of images the shapes dataset generates per epoch.
  int64_t shapes_size = 50000;
  /// Random horizontal flips, as in the paper.
  bool random_flip = true;
};

/// How sample grids are drawn.
struct SampleConfig {
  /// Sampler: ddpm (ancestral, T steps), ddim, or heun (Karras et al. 2022, Algorithm 1, or
  /// Algorithm 2 with churn > 0, on sigma = sqrt(1/abar - 1) of the trained timesteps).
  SamplerKind sampler = SamplerKind::kDdpm;
  /// Variance of the ancestral sampler: fixedlarge (beta_t) or fixedsmall (beta-tilde).
  VarianceKind variance = VarianceKind::kFixedLarge;
  /// Sampler steps: for ddim its S; for ddpm, fewer than T respaces the ancestral sampler onto
  /// that many evenly strided timesteps (Nichol & Dhariwal, section 4); for heun its N (2N - 1
  /// network evaluations). 0: the sampler's default, all T for ddpm (the paper), 100 for ddim,
  /// 18 for heun (EDM's CIFAR-10 setting).
  int steps = 0;
  /// ddpm only: an explicit increasing list of timesteps in [0, T) to respace onto (overrides
  /// steps).
  std::vector<int> timesteps;
  /// DDIM eta: 0 is deterministic, 1 matches the ancestral posterior variance.
  double eta = 0.0;
  /// Clip the predicted x0 to [-1, 1] at every step (ddpm and ddim; heun follows the ODE as
  /// EDM does, unclipped).
  bool clip_x0 = true;
  /// heun: EDM's S_churn, the stochasticity of Algorithm 2 (0: the deterministic Algorithm 1),
  /// applied at every step (S_tmin 0, S_tmax infinite).
  double churn = 0.0;
  /// heun: EDM's S_noise, the scale of the noise churn adds.
  double s_noise = 1.0;
  /// Images per sample grid.
  int num_images = 64;

  /// The sampler's steps with 0 resolved: T for ddpm, 100 for ddim, 18 for heun (never more
  /// than T).
  int ResolvedSteps(int diffusion_timesteps) const;
  /// Seed of the sampler's noise.
  uint64_t seed = 0;
  /// A class-conditional model's classes to sample, in contiguous blocks of images (one row per
  /// class in a grid of as many rows); empty: every class.
  std::vector<int> classes;
  /// Classifier-free guidance scale w: eps = eps_uncond + w (eps_cond - eps_uncond); 1 is the
  /// conditional model, 0 the unconditional one, larger guides harder (Ho & Salimans 2022).
  double guidance = 1.0;
};

/// FID and Inception Score of EMA samples during training (Heusel et al. 2017; Salimans et al.
/// 2016), on the protocol of Ho et al.: 50k samples against the training set's statistics.
struct EvalConfig {
  /// Steps between evaluations, and one at the last step; 0: never.
  int64_t every = 0;
  /// Samples per evaluation, split over the ranks (the paper: 50000).
  int64_t num_samples = 50000;
  /// Images per sampling forward pass and per Inception batch, on each rank.
  int batch_size = 100;
  /// Sampler of the evaluation: ddpm (the paper's ancestral sampler), ddim or heun.
  SamplerKind sampler = SamplerKind::kDdpm;
  /// Sampler steps, as sample.steps: 0 is all T for ddpm (the paper), 100 for ddim, 18 for
  /// heun; fewer than T respaces ddpm.
  int steps = 0;
  /// Seed of the evaluation's noise: sample i draws from (seed, i) on any world size.
  uint64_t seed = 1;
  /// A class-conditional model's guidance scale (sample.guidance's convention); its samples
  /// are class-balanced, sample i of class i mod model.num_classes.
  double guidance = 1.0;
  /// The FID Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth (re-saved
  /// by PyTorch 1.6 or later) or a TorchScript module of the same network.
  std::string inception_weights;
  /// The reference statistics: a .npz with mu and sigma (pytorch-fid and TTUR's layout), as
  /// `ddpm_fid stats` writes or as published for CIFAR-10.
  std::string reference_stats;
  /// The Inception Score's logits: unbiased (the original TF code's, so that IS stands beside
  /// the paper's 9.46) or biased (the fc's output, as pytorch-fid-based tools compute it).
  IsLogits is_logits = IsLogits::kUnbiased;
  /// Steps between evaluations of the variational bound (the NLL of Ho et al., Table 1) in
  /// bits/dim on held-out images, and one at the last step; 0: never. Held out: CIFAR-10's
  /// other split (test when training on train), shapes drawn with a seed training never uses;
  /// a folder has no held-out split, so its own images are used and the report says so.
  int64_t nll_every = 0;
  /// Held-out images of each bound evaluation, split over the ranks in batches of batch_size.
  int64_t nll_images = 1000;
  /// Timesteps per image: 0 = all T (the paper's bound); K = t = 0 and a stratified unbiased
  /// estimate from K - 1 more.
  int nll_timesteps = 0;
  /// The scores of each sample evaluation: fid and is (always computed: they cost nothing
  /// beyond the Inception pass), kid (Binkowski et al.; the reference .npz must hold the
  /// reference `features`) and prd (precision and recall, k = 3; density and coverage, k = 5;
  /// against min(reference size, num_samples) reference features drawn with eval.seed).
  std::vector<std::string> metrics = {"fid", "is"};
  /// The score whose best checkpoint the run keeps (the `best` pointer, never pruned): fid,
  /// kid or nll (lower is better for each); none keeps no best.
  EvalSelect select = EvalSelect::kNone;
  /// With select: the run stops, COMPLETED, once this many evaluations in a row have not
  /// improved on the best; 0 never stops early.
  int patience = 0;
  /// Whether metric ("kid", "prd") is among metrics.
  bool Computes(const std::string& metric) const;
};

/// Data-parallel training across ranks.
struct DistConfig {
  /// Size of a gradient all-reduce bucket, in MiB (PyTorch DDP's default is 25).
  double bucket_mb = 25;
  /// Seconds a collective may take before the job reports it stuck and aborts.
  double timeout_seconds = 600;
  /// Ranks the run must train on; 0: any group whose size divides train.batch_size.
  int world_size = 0;
  /// Most images a rank takes in one micro-batch (what fits in its memory); a coordinator
  /// accumulates micro-batches to keep train.batch_size. 0: no limit.
  int max_micro_batch = 0;

  /// timeout_seconds as a duration.
  std::chrono::milliseconds timeout() const {
    return std::chrono::milliseconds(std::llround(timeout_seconds * 1000));
  }
};

/// The largest relative standard deviation a power-function EMA profile has (EDM2's
/// sqrt((g + 1) / ((g + 2)^2 (g + 3))) at its peak, g = (sqrt(5) - 3) / 2), about 0.300283:
/// train.phema_sigma_rels and ddpm_phema's --sigma-rel lie in (0, MaxPhemaSigmaRel()].
double MaxPhemaSigmaRel();

/// A whole run.
struct Config {
  ModelConfig model;
  DiffusionConfig diffusion;
  TrainConfig train;
  DataConfig data;
  SampleConfig sample;
  EvalConfig eval;
  DistConfig dist;

  /// Checks every cross-field constraint; throws ConfigError naming the keys. The batch must
  /// have a plan (PlanBatch) on dist.world_size ranks, or on world_size when that is 0.
  void Validate(int world_size = 1) const;
  /// The resolved config as a two-column table, one key per row.
  std::string ToTable() const;
  /// The resolved config as YAML that LoadConfigString reads back to an equal config.
  std::string ToYaml() const;
};

/// eval.sampler's steps with 0 resolved (as SampleConfig::ResolvedSteps): what an evaluation
/// reports.
int EvalSamplerSteps(const Config& config);

/// Loads a config file, applies DDPM_<SECTION>_<KEY> environment overrides, and validates it.
Config LoadConfigFile(const std::string& path);
/// Loads a config from YAML text; origin names it in errors. Environment overrides apply when
/// apply_env is true.
Config LoadConfigString(const std::string& yaml, const std::string& origin = "<string>",
                        bool apply_env = false);

/// Whether yaml sets nothing at all: empty, only comments, or an empty mapping (a YAML syntax
/// error is not "nothing": the loader reports it).
bool ConfigYamlSetsNothing(const std::string& yaml);

/// Sets one key ("section.key") from YAML text, with the loader's checks; origin names the
/// source in errors. Call Validate() after the last change.
void SetConfigKey(Config& config, const std::string& key, const std::string& yaml_value,
                  const std::string& origin);

/// Name of an enum value as written in YAML, e.g. "fixedlarge".
const char* Name(ScheduleKind v);
const char* Name(Objective v);
const char* Name(LossKind v);
const char* Name(LossWeighting v);
const char* Name(VarianceKind v);
const char* Name(SamplerKind v);
const char* Name(DatasetKind v);
const char* Name(CifarSplit v);
const char* Name(Precision v);
const char* Name(DivergencePolicy v);
const char* Name(TimestepSamplerKind v);
const char* Name(IsLogits v);
const char* Name(EvalSelect v);

}  // namespace ddpm
