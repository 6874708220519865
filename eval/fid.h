// FID and Inception Score from sufficient statistics that ranks sum (all-reduce) in float64, so
// no rank gathers images or features; the Frechet distance; reference statistics in the .npz
// layout of pytorch-fid and TTUR.
#pragma once

#include <torch/torch.h>

#include <map>
#include <string>

namespace ddpm {

/// Count, sum and sum of outer products of feature vectors, in float64. Summing two of them
/// (element by element, as an all-reduce does) gives the statistics of the union.
class FeatureMoments {
 public:
  explicit FeatureMoments(int64_t dim);
  /// Adds the rows of features [n, dim].
  void Add(const torch::Tensor& features);
  /// All the statistics in one float64 tensor [1 + dim + dim * dim], to all-reduce with a sum.
  torch::Tensor& packed() { return packed_; }
  int64_t count() const;
  /// The mean [dim].
  torch::Tensor Mean() const;
  /// The unbiased covariance [dim, dim] (as numpy.cov), from the sums.
  torch::Tensor Covariance() const;

 private:
  int64_t dim_;
  torch::Tensor packed_;
};

/// The Inception Score's sufficient statistics with the standard 10 splits: sample i of n
/// belongs to split s when s * n / splits <= i < (s + 1) * n / splits (integer division, as the
/// original code slices). Per split: count, sum of p(y|x), and sum of p log p.
class ScoreMoments {
 public:
  ScoreMoments(int64_t total_samples, int classes, int splits = 10);
  /// Adds the logits [n, classes] of samples first_index .. first_index + n - 1.
  void Add(const torch::Tensor& logits, int64_t first_index);
  /// Every split's statistics in one float64 tensor, to all-reduce with a sum.
  torch::Tensor& packed() { return packed_; }
  /// exp(E_x KL(p(y|x) || p(y))) per split: its mean and (population) standard deviation.
  std::pair<double, double> Score() const;

 private:
  int64_t total_;
  int classes_;
  int splits_;
  torch::Tensor packed_;
};

/// The Frechet distance between two Gaussians, and how it was computed.
struct FrechetResult {
  double fid = 0;
  /// Whether eps * I had to be added to both covariances (the product's square root was not
  /// finite, or a covariance was not positive semi-definite beyond rounding).
  bool regularized = false;
  double eps = 0;
};

/// ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)) in float64, where
/// tr(sqrt(S1 S2)) = tr(sqrt(sqrt(S1) S2 sqrt(S1))) through eigendecompositions of symmetric
/// matrices (exact for rank-deficient covariances too).
FrechetResult FrechetDistance(const torch::Tensor& mu1, const torch::Tensor& sigma1,
                              const torch::Tensor& mu2, const torch::Tensor& sigma2,
                              double eps = 1e-6);

/// Reads the arrays of a .npz (numpy's zip of .npy files, stored or deflated) as tensors:
/// float64, float32, int64 and uint8, C or Fortran order. Throws naming the file and array.
std::map<std::string, torch::Tensor> ReadNpz(const std::string& path);
/// Writes arrays as an uncompressed .npz that numpy.load reads (atomically: .tmp, then rename).
void WriteNpz(const std::string& path, const std::map<std::string, torch::Tensor>& arrays);

/// mu [d] and sigma [d, d] from a reference .npz, checked; float64.
std::pair<torch::Tensor, torch::Tensor> ReadReferenceStats(const std::string& path);

}  // namespace ddpm
