// Does a model copy its training images? Each sample's two nearest training images, exactly,
// in pixel space and in Inception feature space, searched across ranks (each rank reads its
// share of the training set; the candidates are merged), with the criterion of Yoon et al.
// 2023: a sample whose nearest distance is under a third of its second-nearest is a copy.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "eval/feature_metrics.h"
#include "eval/inception.h"

namespace ddpm {

class Communicator;
class ImageDataset;

/// The neighbours of every sample in one space, and what they say.
struct MemorizationSpace {
  /// "pixel" or "feature".
  std::string name;
  NearestTwo neighbours;
  /// nearest / second-nearest per sample ([n] float64; 0 when both are 0: an exact copy of an
  /// image the training set holds twice).
  torch::Tensor ratio;
  /// The share of samples whose ratio is under the threshold.
  double flagged = 0;
  /// Quantiles 0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1 of the nearest distances.
  std::vector<double> quantiles;
};

struct MemorizationOptions {
  /// Yoon et al.'s threshold on nearest / second-nearest.
  double ratio = 1.0 / 3;
  /// Training images per block of the search, and per Inception batch.
  int64_t block = 1000;
  int batch_size = 100;
};

/// The quantile levels of MemorizationSpace::quantiles.
extern const std::vector<double> kDistanceQuantiles;

/// Searches train for each image of samples (the same size and channels; every rank reads all
/// samples and its share of train), in pixel space ([0, 1] per channel, Euclidean over every
/// pixel) and, with inception, in pool3 feature space. The same on every rank. progress(what,
/// done, share) after each block of this rank's share.
std::vector<MemorizationSpace> MeasureMemorization(
    const ImageDataset& samples, const ImageDataset& train, std::optional<FidInception> inception,
    Communicator& comm, torch::Device device, const MemorizationOptions& options,
    const std::function<void(const std::string&, int64_t, int64_t)>& progress = nullptr);

/// The summary: per space, the share of samples flagged and the quantiles of the nearest
/// distances, one line each.
std::string DescribeMemorization(const std::vector<MemorizationSpace>& spaces, double ratio);

/// Writes dir/neighbours.csv, dir/closest_pairs.png (16 pairs, pixel space) and dir/summary.txt
/// (DescribeMemorization), creating dir.
void WriteMemorizationReport(const std::vector<MemorizationSpace>& spaces,
                             const ImageDataset& samples, const ImageDataset& train, double ratio,
                             const std::string& dir);

/// Writes one row per sample: its index and, per space, the nearest and second-nearest
/// training indices and distances and their ratio; atomically.
void WriteNeighboursCsv(const std::vector<MemorizationSpace>& spaces, const std::string& path);

/// A PNG of the count samples nearest to a training image in the first space: each sample
/// beside its nearest training image, four pairs a row, enlarged to about 64 pixels.
void WriteClosestPairs(const MemorizationSpace& space, const ImageDataset& samples,
                       const ImageDataset& train, int count, const std::string& path);

}  // namespace ddpm
