// FID and IS of image sets: of a run's EMA samples during training (every rank samples and
// extracts its share; the moments are all-reduced), and of datasets and sample folders for the
// ddpm_fid tool.
#pragma once

#include <torch/torch.h>

#include <optional>
#include <string>
#include <vector>

#include "config/config.h"
#include "eval/feature_metrics.h"
#include "eval/fid.h"
#include "eval/inception.h"
#include "eval/report.h"
#include "trainer/unet.h"

namespace ddpm {

class Communicator;
class GaussianDiffusion;
class ImageDataset;

/// Inception features of images into FID and IS moments.
class InceptionStatistics {
 public:
  /// total_samples: of the whole set, across ranks (the IS splits depend on it); the IS from
  /// is_logits.
  InceptionStatistics(FidInception model, int64_t total_samples,
                      IsLogits is_logits = IsLogits::kUnbiased, bool keep_features = false);
  /// images: [n, C, H, W] in [-1, 1] (one channel is repeated to three), samples first_index ...
  /// first_index + n - 1 of the set.
  void Add(const torch::Tensor& images, int64_t first_index);
  FeatureMoments& features() { return features_; }
  ScoreMoments& scores() { return scores_; }
  /// The pool3 features added so far, in order, as float32 [n, 2048] (empty unless kept).
  torch::Tensor KeptFeatures() const;

 private:
  FidInception model_;
  bool keep_features_;
  std::vector<torch::Tensor> kept_;
  FeatureMoments features_;
  ScoreMoments scores_;
  IsLogits is_logits_;
};

/// What an evaluation does besides measuring.
struct EvaluateHooks {
  /// Sees every batch of quantized samples ([-1, 1], [n, C, H, W]) with its first sample index
  /// (ddpm_fid checkpoint --also-save; an evaluation job's saved images).
  std::function<void(const torch::Tensor& images, int64_t first)> keep;
  /// Samples first .. first + n - 1 as an earlier attempt kept them (quantized, [-1, 1],
  /// [n, C, H, W]), or an undefined tensor when they must be drawn. Saved 8-bit images read back
  /// to the very values they were measured with, so a resumed evaluation equals a whole one.
  std::function<torch::Tensor(int64_t first, int64_t n)> reuse;
  /// Given on every rank or on none: before each round of batches rank 0's answer is broadcast,
  /// and true ends the evaluation on every rank (EvaluationStopped).
  std::function<bool()> stop;
};

/// An evaluation ended by EvaluateHooks::stop before its moments were summed.
class EvaluationStopped : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A run's evaluation: the network and reference statistics are loaded (and hashed) once.
class RunEvaluator {
 public:
  /// Loads config.eval's weights and reference on device; throws naming the file.
  RunEvaluator(const Config& config, torch::Device device);
  /// Samples this rank's share of eval.num_samples with the EMA model (contiguous shares;
  /// sample i draws from ImageSeed(eval.seed, i) alone), quantizes them to
  /// 8 bits as saved images are, and returns FID and IS from the moments summed over comm.
  /// Throws EvaluationStopped on every rank together when hooks.stop says so.
  /// Evaluates later calls at classifier-free guidance w (eval.guidance; a sweep over scales
  /// keeps the network and reference loaded); throws ConfigError when w is not finite.
  void set_guidance(double w);
  /// The loaded FID Inception network (the memorization report of an evaluation job reuses it).
  FidInception inception() const { return model_; }
  EvalReport Evaluate(const GaussianDiffusion& diffusion, UNet& ema, Communicator& comm,
                      int64_t step,
                      const std::function<void(int64_t done, int64_t share)>& progress,
                      const EvaluateHooks& hooks = {});

 private:
  Config config_;
  torch::Device device_;
  FidInception model_;
  torch::Tensor mu_, sigma_;
  /// The reference's features (KID), and the drawn reference side of PRD with its radii,
  /// computed over the ranks at the first evaluation.
  torch::Tensor reference_features_;
  std::optional<PrdReference> prd_reference_;
  std::string inception_sha256_, reference_sha256_;
};

/// An image set for ddpm_fid: "cifar10:PATH" (the training split), "folder:PATH" (every PNG
/// and JPEG, resized to image_size) or "npz:PATH" (a sample archive in the OpenAI evaluator's
/// format: arr_0, uint8 N x H x W x 3). Throws naming the spec, or the file and what is wrong
/// with it.
std::unique_ptr<ImageDataset> OpenImageSet(const std::string& spec, int image_size);
/// A training set for the memorization report: an image set (cifar10:PATH is the training
/// split), or run:RUN_DIR, the very data set a run trained on (from its checkpoint's config).
std::unique_ptr<ImageDataset> OpenTrainingSet(const std::string& spec, int image_size);

/// Images first .. first + n - 1 of data as a float32 [n, C, H, W] batch in [-1, 1] on device.
torch::Tensor ReadImages(const ImageDataset& data, int64_t first, int64_t n, torch::Device device);

/// Extracts the Inception statistics of every image of data, batch_size at a time, printing
/// progress to stdout; keep_features keeps every image's pool3 features too.
InceptionStatistics MeasureImageSet(const ImageDataset& data, FidInception model, int batch_size,
                                    torch::Device device, const std::string& what,
                                    IsLogits is_logits = IsLogits::kUnbiased,
                                    bool keep_features = false);

/// The reference .npz's Inception features (`features`, [N, 2048]) as float32 on device, for
/// KID and PRD; throws naming the file when it has none (statistics from an older `ddpm_fid
/// stats` or pytorch-fid hold only mu and sigma) or their shape is wrong.
torch::Tensor ReadReferenceFeatures(const std::string& path, torch::Device device);

/// KID and, with prd, precision/recall/density/coverage of sample features against reference
/// features, into report (has_kid, has_prd); the same on every rank of comm. PRD's reference
/// side is min(reference rows, sample rows) reference rows drawn with seed; prd_reference caches
/// it with its radii between calls.
void ScoreFeatures(const torch::Tensor& samples, const torch::Tensor& reference, bool kid, bool prd,
                   uint64_t seed, Communicator& comm, std::optional<PrdReference>* prd_reference,
                   EvalReport* report);

}  // namespace ddpm
