// Scores of two feature sets beyond FID: the Kernel Inception Distance (Binkowski et al. 2018),
// precision and recall (Kynkaanniemi et al. 2019), density and coverage (Naeem et al. 2020), and
// the exact two nearest neighbours of each sample in a training set (the memorization test of
// Yoon et al. 2023). Every function takes the communicator of the ranks that call it together:
// each rank computes its share (KID's subsets, rows of the distance matrices, a slice of the
// training set) and the shares are summed or merged, so every rank returns the same numbers.
// Distances and kernels are computed in float64, block by block.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "base/random.h"

namespace ddpm {

class Communicator;

/// The m distinct indices of [0, n) that a partial Fisher-Yates shuffle draws from rng: for
/// i = 0 .. m - 1, swap position i with i + rng.Below(n - i), and take positions 0 .. m - 1.
std::vector<int64_t> DrawSubset(SplitMix64& rng, int64_t n, int64_t m);

/// KID: the mean and standard deviation over subsets of the unbiased MMD^2.
struct KidResult {
  double mean = 0;
  /// Population standard deviation over the subsets (as torch-fidelity reports it).
  double std = 0;
  int subsets = 0;
  /// Points of each set per subset: min(1000, fake rows, real rows).
  int64_t subset_size = 0;
};

/// KID's protocol (torch-fidelity's defaults).
struct KidOptions {
  int subsets = 100;
  int64_t max_subset_size = 1000;
  /// Subset s draws its fake indices and then its real indices (DrawSubset) from one
  /// SplitMix64(seed) stream, subsets in order.
  uint64_t seed = 0;
};

/// The unbiased MMD^2 with the cubic kernel k(x, y) = (x.y / d + 1)^3 between fake [n, d] and
/// real [m, d] features, over options.subsets subsets of min(max_subset_size, n, m) rows of each
/// (drawn without replacement): (sum_{i!=j} k(x_i, x_j) + sum_{i!=j} k(y_i, y_j)) / (s (s - 1))
/// - 2 sum_{i,j} k(x_i, y_j) / s^2. An exact copy scores 0 in expectation and may score below 0.
/// Subset s is computed on rank s mod world; the same features must be given on every rank.
KidResult KernelInceptionDistance(const torch::Tensor& fake, const torch::Tensor& real,
                                  Communicator& comm, const KidOptions& options = {});

/// Distance of every row of points [n, d] to its k-th nearest other row (the (k + 1)-th
/// smallest distance, the row itself included), for each k of ks: [n, ks.size()], float64.
/// Rows are split over the ranks; the same points must be given on every rank.
torch::Tensor NearestNeighbourRadii(const torch::Tensor& points, const std::vector<int>& ks,
                                    Communicator& comm);

/// Precision and recall with k = 3 neighbours, density and coverage with k = 5, as in Naeem et
/// al.'s reference code: a point is inside a ball when its distance is strictly less than the
/// radius, a tie (a duplicate point) being outside even where rounding splits it (1e-9 relative).
struct PrdResult {
  double precision = 0;
  double recall = 0;
  double density = 0;
  double coverage = 0;
  int64_t real_count = 0;
  int64_t fake_count = 0;
  static constexpr int kPrecisionRecallK = 3;
  static constexpr int kDensityCoverageK = 5;
};

/// The real side of precision, recall, density and coverage: its features and their radii
/// (k = 3 and k = 5), computed once and reused for every evaluation of a run.
struct PrdReference {
  torch::Tensor features;
  /// [n, 2]: the k = 3 and k = 5 radii.
  torch::Tensor radii;
};
/// Computes real's radii over the ranks.
PrdReference MakePrdReference(const torch::Tensor& real, Communicator& comm);

/// precision: the share of fake rows inside some real ball (k = 3); recall: the share of real
/// rows inside some fake ball (k = 3); density: the mean over fake rows of the number of real
/// balls (k = 5) holding it, divided by 5; coverage: the share of real balls (k = 5) holding a
/// fake row. Fake rows and real rows are split over the ranks.
PrdResult PrecisionRecallDensityCoverage(const PrdReference& real, const torch::Tensor& fake,
                                         Communicator& comm);

/// Each query's two nearest training rows (Euclidean), exactly.
struct NearestTwo {
  /// [n, 2] float64: nearest, second nearest.
  torch::Tensor distance;
  /// [n, 2] int64: their indices in the training set.
  torch::Tensor index;
};

/// The two nearest rows of a training set of train_size rows to every row of queries [n, d]
/// (float64 distances). Rank r reads only its share [train_size * r / world,
/// train_size * (r + 1) / world) through read(first, count) ([count, d] on queries' device),
/// in blocks of block rows; the shares' candidates are merged, ties going to the lower index,
/// so the answer does not depend on the number of ranks. progress(done, share) after each block.
NearestTwo FindNearestTwo(const torch::Tensor& queries,
                          const std::function<torch::Tensor(int64_t first, int64_t count)>& read,
                          int64_t train_size, Communicator& comm, int64_t block = 2048,
                          const std::function<void(int64_t, int64_t)>& progress = nullptr);

}  // namespace ddpm
