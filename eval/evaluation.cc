#include "eval/evaluation.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <sstream>

#include "base/errors.h"
#include "base/log.h"
#include "base/sha256.h"
#include "base/text.h"
#include "trainer/checkpoint.h"
#include "trainer/communicator.h"
#include "trainer/data.h"
#include "trainer/diffusion.h"
#include "trainer/trainer.h"

namespace ddpm {
namespace {

using Clock = std::chrono::steady_clock;

// Images as 8-bit files hold them: what FID is measured on.
torch::Tensor Quantize(const torch::Tensor& images) {
  return ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1;
}

}  // namespace

InceptionStatistics::InceptionStatistics(FidInception model, int64_t total_samples,
                                         IsLogits is_logits, bool keep_features)
    : model_(std::move(model)),
      keep_features_(keep_features),
      features_(2048),
      scores_(total_samples, 1008),
      is_logits_(is_logits) {}

void InceptionStatistics::Add(const torch::Tensor& images, int64_t first_index) {
  torch::NoGradGuard no_grad;
  torch::Tensor rgb = images.size(1) == 1 ? images.repeat({1, 3, 1, 1}) : images;
  const InceptionOutput out = model_->forward(rgb.to(torch::kFloat32));
  features_.Add(out.pool3);
  scores_.Add(is_logits_ == IsLogits::kUnbiased ? out.logits_unbiased : out.logits, first_index);
  if (keep_features_) kept_.push_back(out.pool3.to(torch::kFloat32).clone());
}

torch::Tensor InceptionStatistics::KeptFeatures() const {
  if (kept_.empty()) return torch::zeros({0, 2048}, torch::kFloat32);
  return torch::cat(kept_);
}

torch::Tensor ReadReferenceFeatures(const std::string& path, torch::Device device) {
  std::map<std::string, torch::Tensor> arrays = ReadNpz(path);
  const auto found = arrays.find("features");
  if (found == arrays.end()) {
    throw FormatError(
        path +
        ": has no array 'features' (the reference images' Inception pool3 features, float32 "
        "[N, 2048]), which KID and precision/recall need; statistics with only mu and sigma "
        "serve FID alone: make them again with `ddpm_fid stats`, which writes the features too");
  }
  const torch::Tensor& features = found->second;
  if (features.dim() != 2 || features.size(1) != 2048 || features.size(0) < 2) {
    throw FormatError(path + ": features is " + c10::str(features.sizes()) +
                      "; expected [N, 2048] with N >= 2");
  }
  return features.to(device, torch::kFloat32);
}

void ScoreFeatures(const torch::Tensor& samples, const torch::Tensor& reference, bool kid, bool prd,
                   uint64_t seed, Communicator& comm, std::optional<PrdReference>* prd_reference,
                   EvalReport* report) {
  if (kid) {
    KidOptions options;
    options.seed = seed;
    const KidResult result = KernelInceptionDistance(samples, reference, comm, options);
    report->has_kid = true;
    report->kid = result.mean;
    report->kid_std = result.std;
    report->kid_subsets = result.subsets;
    report->kid_subset_size = result.subset_size;
  }
  if (prd) {
    const int64_t count = std::min(reference.size(0), samples.size(0));
    if (!prd_reference->has_value() || (*prd_reference)->features.size(0) != count) {
      SplitMix64 rng(SplitMix64::Mix(seed + 0x5052440000000000ULL));
      std::vector<int64_t> rows = DrawSubset(rng, reference.size(0), count);
      std::sort(rows.begin(), rows.end());
      const torch::Tensor drawn = reference.index_select(
          0,
          torch::tensor(rows, torch::TensorOptions().dtype(torch::kLong)).to(reference.device()));
      *prd_reference = MakePrdReference(drawn, comm);
    }
    const PrdResult result = PrecisionRecallDensityCoverage(**prd_reference, samples, comm);
    report->has_prd = true;
    report->precision = result.precision;
    report->recall = result.recall;
    report->density = result.density;
    report->coverage = result.coverage;
    report->prd_reference_count = result.real_count;
  }
}

RunEvaluator::RunEvaluator(const Config& config, torch::Device device)
    : config_(config),
      device_(device),
      model_(LoadFidInception(config.eval.inception_weights, device)) {
  std::tie(mu_, sigma_) = ReadReferenceStats(config.eval.reference_stats);
  if (mu_.size(0) != 2048) {
    throw FormatError(config.eval.reference_stats + ": mu has " + std::to_string(mu_.size(0)) +
                      " entries; FID's pool3 has 2048");
  }
  if (config.eval.Computes("kid") || config.eval.Computes("prd")) {
    reference_features_ = ReadReferenceFeatures(config.eval.reference_stats, device);
  }
  inception_sha256_ = Sha256File(config.eval.inception_weights);
  reference_sha256_ = Sha256File(config.eval.reference_stats);
}

void RunEvaluator::set_guidance(double w) {
  if (!std::isfinite(w)) {
    throw ConfigError("eval.guidance: must be a finite number, got " + std::to_string(w));
  }
  config_.eval.guidance = w;
}

EvalReport RunEvaluator::Evaluate(const GaussianDiffusion& diffusion, UNet& ema, Communicator& comm,
                                  int64_t step,
                                  const std::function<void(int64_t, int64_t)>& progress,
                                  const EvaluateHooks& hooks) {
  const auto start = Clock::now();
  const EvalConfig& eval = config_.eval;
  const ModelConfig& m = config_.model;
  const int rank = comm.rank(), world = comm.world_size();
  const int64_t first = eval.num_samples * rank / world;
  const int64_t end = eval.num_samples * (rank + 1) / world;
  const bool kid = eval.Computes("kid"), prd = eval.Computes("prd");
  InceptionStatistics stats(model_, eval.num_samples, eval.is_logits, kid || prd);
  SampleConfig sample = config_.sample;
  sample.sampler = eval.sampler;
  sample.steps = eval.steps;
  sample.timesteps.clear();
  // Rounds of one batch per rank; shares differ by at most one image, so the ranks may differ
  // by a round, and a stoppable evaluation runs as many rounds on every rank.
  const int64_t largest = (eval.num_samples + world - 1) / world;
  const int64_t rounds = (largest + eval.batch_size - 1) / eval.batch_size;
  for (int64_t round = 0; round < rounds; ++round) {
    if (hooks.stop) {
      torch::Tensor word = torch::tensor({static_cast<int64_t>(rank == 0 && hooks.stop())});
      comm.Broadcast(word, 0, "broadcast of the evaluation's stop at step " + std::to_string(step));
      if (word.item<int64_t>() != 0) {
        throw EvaluationStopped("the evaluation of step " + std::to_string(step) + " was stopped");
      }
    }
    const int64_t index = first + round * eval.batch_size;
    if (index >= end) continue;
    const int64_t n = std::min<int64_t>(eval.batch_size, end - index);
    torch::Tensor quantized = hooks.reuse ? hooks.reuse(index, n) : torch::Tensor();
    if (!quantized.defined()) {
      // Sample i draws from (eval.seed, i) alone: the same samples on any batch size and world.
      std::vector<uint64_t> seeds;
      for (int64_t i = index; i < index + n; ++i) seeds.push_back(ImageSeed(eval.seed, i));
      NoiseStreams streams(seeds);
      // A conditional model's samples are class-balanced: sample i of class i mod K.
      torch::Tensor labels;
      if (m.num_classes > 0) labels = torch::arange(index, index + n, torch::kLong) % m.num_classes;
      const torch::Tensor images =
          diffusion.Sample(EvalDenoiser(ema, Precision::kFp32, labels, eval.guidance),
                           {n, m.in_channels, m.image_size, m.image_size}, sample, streams);
      quantized = Quantize(images);
      if (hooks.keep) hooks.keep(quantized, index);
    }
    stats.Add(quantized.to(device_), index);
    if (progress) progress(index + n - first, end - first);
  }
  // Sums of every rank's share, in float64; no image or feature leaves its rank.
  comm.AllReduce(stats.features().packed(), ReduceOp::kSum,
                 "all-reduce of the FID moments at step " + std::to_string(step));
  comm.AllReduce(stats.scores().packed(), ReduceOp::kSum,
                 "all-reduce of the Inception Score moments at step " + std::to_string(step));
  const FrechetResult fid =
      FrechetDistance(stats.features().Mean(), stats.features().Covariance(), mu_, sigma_);
  const auto [is_mean, is_std] = stats.scores().Score();
  EvalReport report;
  if (kid || prd) {
    // KID and PRD need every sample's features on every rank: each rank's share, padded to the
    // largest, all-gathered (80 MB at 10k samples), then each rank computes its part of them.
    // On the host: the control communicator (MPI) moves CPU tensors only.
    const torch::Tensor own = stats.KeptFeatures().cpu();
    const torch::Tensor padded = torch::zeros({largest, own.size(1)}, own.options());
    padded.slice(0, 0, own.size(0)).copy_(own);
    const torch::Tensor gathered =
        comm.AllGather(padded, "all-gather of the sample features at step " + std::to_string(step))
            .to(device_);
    std::vector<torch::Tensor> shares;
    for (int r = 0; r < world; ++r) {
      const int64_t count = eval.num_samples * (r + 1) / world - eval.num_samples * r / world;
      shares.push_back(gathered[r].slice(0, 0, count));
    }
    ScoreFeatures(torch::cat(shares), reference_features_, kid, prd, eval.seed, comm,
                  &prd_reference_, &report);
  }
  report.step = step;
  report.fid = fid.fid;
  report.regularized = fid.regularized;
  report.inception_score = is_mean;
  report.inception_score_std = is_std;
  report.num_samples = stats.features().count();
  report.sampler = Name(eval.sampler);
  report.is_logits = Name(eval.is_logits);
  report.guided = m.num_classes > 0;
  report.guidance = eval.guidance;
  report.sampling_steps = sample.ResolvedSteps(config_.diffusion.timesteps);
  report.seed = eval.seed;
  report.inception_sha256 = inception_sha256_;
  report.reference_sha256 = reference_sha256_;
  report.seconds = SecondsSince(start);
  return report;
}

namespace {

// The images of a sample archive in the OpenAI evaluator's format: arr_0, uint8 [N, H, W, C]
// with H = W and C 3 (or 1).
class NpzImageSet : public ImageDataset {
 public:
  explicit NpzImageSet(const std::string& path) : path_(path) {
    std::map<std::string, torch::Tensor> arrays = ReadNpz(path);
    const auto found = arrays.find("arr_0");
    if (found == arrays.end()) {
      throw FormatError(path + ": no array arr_0 (the images, uint8 N x H x W x 3)");
    }
    const torch::Tensor& images = found->second;
    if (images.scalar_type() != torch::kUInt8) {
      throw FormatError(path + ": arr_0 is " + std::string(c10::toString(images.scalar_type())) +
                        "; sample archives hold uint8 pixels");
    }
    if (images.dim() != 4 || images.size(1) != images.size(2) ||
        (images.size(3) != 3 && images.size(3) != 1) || images.size(0) < 1) {
      std::ostringstream shape;
      shape << images.sizes();
      throw FormatError(path + ": arr_0 has shape " + shape.str() +
                        "; sample archives hold N x H x W x 3 (or 1) with H = W and N >= 1");
    }
    // Stored NHWC; Read hands out CHW.
    pixels_ = images.permute({0, 3, 1, 2}).contiguous();
  }
  int64_t size() const override { return pixels_.size(0); }
  int image_size() const override { return static_cast<int>(pixels_.size(2)); }
  int channels() const override { return static_cast<int>(pixels_.size(1)); }
  void Read(int64_t index, uint8_t* chw) const override {
    const torch::Tensor image = pixels_[index];
    std::memcpy(chw, image.data_ptr<uint8_t>(), image.numel());
  }
  std::string Describe() const override {
    return "sample archive " + path_ + ": " + std::to_string(size()) + " images of " +
           std::to_string(image_size()) + "x" + std::to_string(image_size());
  }

 private:
  std::string path_;
  torch::Tensor pixels_;
};

}  // namespace

std::unique_ptr<ImageDataset> OpenImageSet(const std::string& spec, int image_size) {
  const size_t colon = spec.find(':');
  const std::string kind = spec.substr(0, colon),
                    path = colon == std::string::npos ? "" : spec.substr(colon + 1);
  if (colon != std::string::npos && !path.empty()) {
    if (kind == "cifar10") return std::make_unique<Cifar10Dataset>(path, CifarSplit::kTrain);
    if (kind == "folder") return std::make_unique<ImageFolderDataset>(path, image_size, 3);
    if (kind == "npz") return std::make_unique<NpzImageSet>(path);
  }
  throw std::invalid_argument("image set '" + spec +
                              "' is not cifar10:PATH, folder:PATH or npz:PATH");
}

std::unique_ptr<ImageDataset> OpenTrainingSet(const std::string& spec, int image_size) {
  if (spec.rfind("run:", 0) == 0 && spec.size() > 4) {
    const CheckpointDir::Loaded loaded = LoadCheckpointAt(
        spec.substr(4),
        [](const std::string& message) { LogWarning("ddpm: warning: %s\n", message.c_str()); });
    return MakeDataset(ConfigFromCheckpoint(loaded.tensors, loaded.path));
  }
  return OpenImageSet(spec, image_size);
}

torch::Tensor ReadImages(const ImageDataset& data, int64_t first, int64_t n, torch::Device device) {
  std::vector<int64_t> indices(n);
  for (int64_t i = 0; i < n; ++i) indices[i] = first + i;
  const std::vector<uint8_t> bytes = ReadBatch(data, indices, {});
  return torch::from_blob(const_cast<uint8_t*>(bytes.data()),
                          {n, data.channels(), data.image_size(), data.image_size()}, torch::kUInt8)
                 .to(device)
                 .to(torch::kFloat32) /
             127.5 -
         1;
}

InceptionStatistics MeasureImageSet(const ImageDataset& data, FidInception model, int batch_size,
                                    torch::Device device, const std::string& what,
                                    IsLogits is_logits, bool keep_features) {
  const auto start = Clock::now();
  InceptionStatistics stats(std::move(model), data.size(), is_logits, keep_features);
  for (int64_t first = 0; first < data.size(); first += batch_size) {
    const int64_t n = std::min<int64_t>(batch_size, data.size() - first);
    stats.Add(ReadImages(data, first, n, device), first);
    const int64_t done = first + n;
    const double rate = done / std::max(SecondsSince(start), 1e-9);
    LogInfo("%s: %lld/%lld images, %.1f images/s, eta %.0fs\n", what.c_str(),
            static_cast<long long>(done), static_cast<long long>(data.size()), rate,
            (data.size() - done) / rate);
  }
  return stats;
}

}  // namespace ddpm
