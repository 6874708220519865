// The variational bound of a model on a dataset in bits/dim (Ho et al. Table 1's NLL): every
// rank takes a contiguous share of the images, the float64 sums are all-reduced, and the
// report says whether it is the full bound or a stratified estimate. Written as CSV (the term
// of each timestep) and as a PNG plot of bits/dim against t.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "config/config.h"
#include "trainer/unet.h"

namespace ddpm {

class Communicator;
class GaussianDiffusion;
class ImageDataset;

/// What ddpm_nll measures; every field is the same on every rank.
struct BoundOptions {
  /// Images of the dataset to use, from the first (0: all of them).
  int64_t num_images = 0;
  /// Timesteps evaluated per image: 0 = all T (the paper's bound), else t = 0 and a stratified
  /// unbiased estimate from num_timesteps - 1 more.
  int num_timesteps = 0;
  /// p's variance where the model does not learn it.
  VarianceKind variance = VarianceKind::kFixedLarge;
  /// Seeds the strata and, with each image batch's first index, its noise.
  uint64_t seed = 0;
  /// Images per forward pass.
  int batch_size = 64;
};

/// The bound summed over the images of all ranks, in bits/dim. Ranks take whole batches of
/// batch_size images, so the result does not depend on the number of ranks.
struct BoundReport {
  int64_t images = 0;
  int timesteps_in_all = 0;        // T
  std::vector<int64_t> timesteps;  // evaluated, ascending
  std::vector<double> weights;     // timesteps each stands for
  std::vector<double> term_means;  // mean L_t over images, per evaluated t
  double prior_mean = 0;           // mean L_T
  double total_mean = 0;           // the bound: prior + sum of weighted terms
  double total_std_error = 0;      // standard error of total_mean over images
  bool full() const { return static_cast<int>(timesteps.size()) == timesteps_in_all; }
};

/// Measures the bound of model on data under options; progress(done, share) counts this rank's
/// image-timestep evaluations. Throws std::invalid_argument naming the option when it is bad.
BoundReport MeasureBound(const GaussianDiffusion& diffusion, UNet& model, const ImageDataset& data,
                         const BoundOptions& options, Communicator& comm, torch::Device device,
                         const std::function<void(int64_t done, int64_t share)>& progress);

/// The seed of held-out shapes (ddpm_nll's shapes:N, the bound during training): training draws
/// its shapes from train.seed.
inline constexpr uint64_t kHeldOutShapesSeed = 0x5eedf00dULL;

/// The images the bound is measured on during training, and what they are.
struct HeldOutImages {
  std::unique_ptr<ImageDataset> data;
  /// "cifar10 test", "shapes held-out", "folder PATH (the training images)".
  std::string description;
};
/// config.eval.nll_images images that training does not see where the dataset has them:
/// CIFAR-10's other split, shapes from kHeldOutShapesSeed; a folder's own images otherwise.
/// Throws ConfigError naming eval.nll_images when the split has fewer.
HeldOutImages OpenHeldOut(const Config& config);

/// Writes t, weight, bits_per_dim rows (and the prior as t = T), atomically.
void WriteBoundCsv(const BoundReport& report, const std::string& path);
/// Draws bits/dim of each evaluated t (log scale) against t as a PNG, atomically.
void WriteBoundPlot(const BoundReport& report, const std::string& path);

}  // namespace ddpm
